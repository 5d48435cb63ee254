"""The batcher of `potstill serve`: groups concurrent requests and decodes each group at once.

`Batcher.submit(job)` queues a `Job` (one admitted request). A background task collects jobs for
`batch_window_ms` (and while a batch is decoding), takes the oldest live jobs up to
`max_batch_size` rows and `max_batch_tokens`, and runs one `teacher.complete_ids` call for them
in a single worker thread, so the event loop stays free. Rows keep their own sampling params
inside the batch (temperature, top-p, stop strings, max_tokens: `row_params`) and sample from
their own seed, so requests sampled differently share a batch and a completion does not depend
on which batch it joined. `_Tap`, the batch's logits processor, wraps the watermark processor
(when configured), streams each row's new token ids to its job, counts each row's decoded
tokens, and ends a row whose job was abandoned (client gone, deadline passed) by forcing EOS at
the next step. Rows are then cut to their own `top_logprobs`, and each job's future gets its
`Completion` (or an `APIError`).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from potstill.guard.openai_api import APIError
from potstill.lm.types import Completion, SamplingParams

if TYPE_CHECKING:
    from potstill.guard.serve import ServeConfig

log = logging.getLogger(__name__)

DONE = object()
"""Put on a streaming job's token queue after its last tokens."""


@dataclass(eq=False)
class Job:
    """One admitted request waiting for (or in) a batch."""

    prompt_ids: list[int]
    max_tokens: int
    top_k: int
    temperature: float
    top_p: float
    stop: tuple[str, ...]
    seed: int
    future: asyncio.Future
    tokens: asyncio.Queue | None = None  # streaming: lists of new token ids, then DONE
    abandoned: bool = False  # the client left or the deadline passed: its row stops at the next step
    decoded: int = 0  # completion tokens decoded so far (updated by the decode thread)
    started: bool = False  # taken into a batch
    submitted: float = field(default_factory=time.monotonic)

    def row_params(self) -> SamplingParams:
        """This row's own sampling params inside a shared batch."""
        return SamplingParams(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_logprobs=0, stop=list(self.stop))


class _Tap:
    """Logits processor wrapper that sees each row's tokens as they are generated.

    complete_ids passes one context list object per row (prompt + tokens so far) at every step;
    the first time a list is seen it is matched to the first unmatched job with that prompt
    (rows enter in order), then by identity. It streams new tokens to the event loop and records
    which rows ran past their own max_tokens (-> finish_reason "length").
    """

    def __init__(self, jobs: list[Job], inner, loop: asyncio.AbstractEventLoop, eos: int):
        self.jobs, self.inner, self.loop, self.eos = jobs, inner, loop, eos
        self.rows: dict[int, int] = {}
        self.unmatched = list(range(len(jobs)))
        self.sent = [len(j.prompt_ids) for j in jobs]
        self.reached = [False] * len(jobs)

    def add(self, job: Job) -> None:
        """A job joining the running batch (its row comes after the current ones)."""
        self.unmatched.append(len(self.sent))
        self.sent.append(len(job.prompt_ids))
        self.reached.append(False)

    def _row(self, ctx: list[int]) -> int | None:
        b = self.rows.get(id(ctx))
        if b is None:
            for j, cand in enumerate(self.unmatched):
                p = self.jobs[cand].prompt_ids
                if len(ctx) >= len(p) and ctx[: len(p)] == p:
                    b = self.rows[id(ctx)] = self.unmatched.pop(j)
                    break
        return b

    def __call__(self, contexts, logits):
        if self.inner is not None:
            logits = self.inner(contexts, logits)
        for r, ctx in enumerate(contexts):
            b = self._row(ctx)
            if b is None:
                continue
            job = self.jobs[b]
            end = len(job.prompt_ids) + job.max_tokens
            job.decoded = min(len(ctx), end) - len(job.prompt_ids)
            if len(ctx) >= end:
                self.reached[b] = True
            if job.tokens is not None and self.sent[b] < min(len(ctx), end):
                new = ctx[self.sent[b] : min(len(ctx), end)]
                self.sent[b] += len(new)
                self.loop.call_soon_threadsafe(job.tokens.put_nowait, new)
            if job.abandoned or len(ctx) >= end:  # done with this row: EOS ends it at this step
                logits[r] = float("-inf")
                logits[r, self.eos] = 0.0
        return logits


class Batcher:
    """Collects concurrent jobs and decodes them together in one worker thread; new jobs join the running batch."""

    def __init__(self, teacher, cfg: ServeConfig, processor=None):
        # reads cfg.batch_window_ms, cfg.max_batch_size and cfg.max_batch_tokens
        self.teacher, self.cfg, self.processor = teacher, cfg, processor
        self.pending: deque[Job] = deque()
        self.stats = {"batches": 0, "rows": 0, "max_rows": 0, "joined": 0, "tokens": 0, "stopped": 0}
        self._lock = threading.Lock()  # pending is taken from by the decode thread too (rows joining)
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="potstill-decode")

    def start(self) -> None:
        if self._task is None or self._task.done():
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        with self._lock:
            left, self.pending = list(self.pending), deque()
        for job in left:
            self._finish(job, error=APIError(503, "server shutting down", "server_error"))
        self._executor.shutdown(wait=True)

    async def submit(self, job: Job) -> None:
        self.start()
        with self._lock:
            self.pending.append(job)
        self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            while not self.pending:
                self._wake.clear()
                await self._wake.wait()
            wait = self.cfg.batch_window_ms / 1000 - (time.monotonic() - self.pending[0].submitted)
            if wait > 0 and len(self.pending) < self.cfg.max_batch_size:
                await asyncio.sleep(wait)
            batch = self._take(self.cfg.max_batch_size, self.cfg.max_batch_tokens, loop)
            if not batch:
                continue
            self.stats["batches"] += 1
            jobs: list[Job] = []
            try:
                await loop.run_in_executor(self._executor, self._decode, batch, jobs, loop)
            except Exception as err:  # a decoding failure fails this batch, not the server
                log.exception("decode failed for a batch of %d", len(jobs))
                for job in jobs:
                    self._finish(job, error=APIError(500, f"decoding failed: {type(err).__name__}", "server_error"))

    def _take(self, rows: int, budget: int, loop, top_k: int | None = None, first_free: bool = True) -> list[Job]:
        """Up to `rows` live pending jobs within `budget` tokens (the first one always, if `first_free`),
        oldest first; with `top_k`, only jobs asking for at most that many log-probs."""
        batch, dropped = [], []
        with self._lock:
            rest: deque[Job] = deque()
            for j in self.pending:
                if j.abandoned or j.future.cancelled():
                    dropped.append(j)
                    continue
                cost = len(j.prompt_ids) + j.max_tokens
                fits = len(batch) < rows and (cost <= budget or (first_free and not batch))
                if fits and (top_k is None or j.top_k <= top_k):
                    j.started = True
                    batch.append(j)
                    budget -= cost
                else:
                    rest.append(j)
            self.pending = rest
        for j in dropped:  # nobody waits for them any more
            loop.call_soon_threadsafe(self._drop, j)
        return batch

    @staticmethod
    def _drop(job: Job) -> None:
        job.future.cancel()
        if job.tokens is not None:
            job.tokens.put_nowait(DONE)

    def _decode(self, batch: list[Job], jobs: list[Job], loop) -> None:
        """Decode `batch` (worker thread); jobs arriving meanwhile join it while rows are free.

        `jobs` (row index -> job) grows as rows join; each job's future is set as its row ends.
        """
        jobs.extend(batch)
        k = max(j.top_k for j in batch)
        params = SamplingParams(max_new_tokens=max(j.max_tokens for j in batch), top_logprobs=k)
        tap = _Tap(jobs, self.processor, loop, self.teacher.eos_ids[0])
        budget = [sum(len(j.prompt_ids) + j.max_tokens for j in batch)]
        finished: set[int] = set()

        def feed(free: int) -> list[tuple[list[int], int, SamplingParams]]:
            new = self._take(free, self.cfg.max_batch_tokens - budget[0], loop, top_k=k, first_free=False)
            for j in new:
                jobs.append(j)
                tap.add(j)
                budget[0] += len(j.prompt_ids) + j.max_tokens
            self.stats["joined"] += len(new)
            self.stats["rows"] += len(new)
            self._count(len(jobs) - len(finished))
            return [(j.prompt_ids, j.seed, j.row_params()) for j in new]

        def on_done(i: int, c: Completion) -> None:
            job = jobs[i]
            finished.add(i)
            budget[0] -= len(job.prompt_ids) + job.max_tokens
            self.stats["tokens"] += len(c.completion_ids)
            self.stats["stopped"] += job.abandoned
            loop.call_soon_threadsafe(self._finish, job, self._fit(c, job, tap.reached[i]))

        self.stats["rows"] += len(batch)
        self._count(len(batch))
        self.teacher.complete_ids([j.prompt_ids for j in batch], params, seeds=[j.seed for j in batch],
                                  logits_processor=tap, row_params=[j.row_params() for j in batch], feed=feed,
                                  on_done=on_done, batch_size=self.cfg.max_batch_size)
        for i, job in enumerate(jobs):  # a row that never ended (should not happen): fail it, never hang
            if i not in finished:
                loop.call_soon_threadsafe(self._finish, job, None,
                                          APIError(500, "decoding ended without this row", "server_error"))
        jobs.clear()

    def _count(self, live: int) -> None:
        self.stats["max_rows"] = max(self.stats["max_rows"], live)

    def _fit(self, c: Completion, job: Job, reached: bool) -> Completion:
        """Cut a row decoded under the batch's params down to its own max_tokens and top-k."""
        ids, text, finish = c.completion_ids, c.text, c.finish_reason
        if reached and not job.stop:
            finish = "length"
            if len(ids) > job.max_tokens:
                ids = ids[: job.max_tokens]
                text = self.teacher.tokenizer.decode(ids, skip_special_tokens=True)
        t, k = len(ids), job.top_k
        return Completion(
            prompt_ids=c.prompt_ids,
            completion_ids=ids,
            text=text,
            finish_reason=finish,
            sampled_logprob=None if c.sampled_logprob is None else c.sampled_logprob[:t],
            topk_ids=c.topk_ids[:t, :k] if k and c.topk_ids is not None else None,
            topk_logprobs=c.topk_logprobs[:t, :k] if k and c.topk_logprobs is not None else None,
        )

    @staticmethod
    def _finish(job: Job, result: Completion | None = None, error: Exception | None = None) -> None:
        if not job.future.done():
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)
        if job.tokens is not None:
            job.tokens.put_nowait(DONE)
