"""What `potstill serve`'s completion routes share: admission, exact metering, and the responses.

A completion request goes through `Service` in three steps, after `check_key_logprobs` (403 when
it asks for more log-probs than its key may receive, in any form, `asked_logprobs`) and
`check_caps` (400), which cost nothing and charge nothing:

1. `Service.charge` -- before any tokenising or chat templating: the key's concurrency cap
   (429), the bounded pending queue (503) and its rate limits (429, `Retry-After`), charged
   for one request and `max_tokens` + 1 tokens;
2. `Service.admit` -- after tokenising: the context length (400) and the prompt's tokens added to
   the charge (429 if they do not fit; the request stays counted);
3. `respond` -- the batcher decodes it; the response is JSON or an SSE stream.

Each admitted request has a `Ticket`, closed exactly once whatever its fate: it settles the
charge to the tokens actually delivered (for a stream: those sent before the client left), frees
the key's concurrency slot, and fills the log row (`tokens_out`, the partial or whole
`completion`, `error_type` `client_closed` / `deadline_exceeded`). A departed client's job is
marked abandoned, so the batcher stops decoding its row at the next step. The middleware runs
the ticket's close after the app returns, so a stream cut while a chunk was being sent is
settled too.
"""

from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from typing import Any

import anyio
from fastapi import Request, Response
from fastapi.responses import StreamingResponse

from potstill.guard.batcher import DONE, Batcher, Job
from potstill.guard.openai_api import (
    SSE_DONE,
    APIError,
    ChatRequest,
    Detokenizer,
    RequestBase,
    StreamChunks,
    TokenText,
    chat_logprobs,
    completion_body,
    completion_logprobs,
    safe_prefix,
)
from potstill.guard.ratelimit import RateLimited, RateLimiter, Reservation


def _rate_error(err: RateLimited) -> APIError:
    return APIError(429, str(err), type=err.limit, code="rate_limit_exceeded",
                    headers={"Retry-After": str(err.retry_after)})


class Ticket:
    """One admitted request's accounting; `close` runs once (idempotent)."""

    def __init__(self, svc: Admission, request: Request, reservation: Reservation, max_tokens: int):
        self.svc, self.row, self.reservation = svc, request.state.qlog, reservation
        self.key_id = request.state.key.key_id
        self.max_tokens = max_tokens
        self.job: Job | None = None
        self.started = False  # handed to the decoder (or the upstream): from here the row reports tokens
        self.prompt_tokens = 0
        self.used = 0  # completion tokens delivered (charged)
        self.text: str | None = None
        self.ids: list[int] | None = None  # the served token ids (kept in the log for detection)
        self.finished = False  # the response went out whole
        self.closed = False
        request.state.cleanup = [self.close]  # the middleware calls it after the app returns

    def close(self, error_type: str | None = "client_closed") -> None:
        """Settle: charge `used` completion tokens, free the key's slot, fill the log row."""
        if self.closed:
            return
        self.closed = True
        if self.job is not None and not self.job.future.done():
            self.job.abandoned = True  # the batcher stops decoding this row
        if not self.finished and error_type and self.started:
            self.row["error_type"] = error_type
        self.svc.limiter.settle(self.reservation, self.prompt_tokens + self.used)
        self.svc.release(self.key_id)
        self.svc.open.discard(self)
        if self.started:
            self.row["tokens_out"] = self.used
            self.row["completion"] = self.text
            self.row["completion_ids"] = self.ids


def check_caps(cfg, req: RequestBase, top_k: int, max_tokens: int | None) -> None:
    """The server's caps every completion route applies before any work: n, best_of, top_logprobs, max_tokens."""
    if (req.n or 1) != 1:
        raise APIError(400, "Only n=1 is supported.", param="n")
    if getattr(req, "best_of", None) not in (None, 1):
        raise APIError(400, "Only best_of=1 is supported.", param="best_of")
    if top_k > cfg.max_top_logprobs:
        raise APIError(400, f"top_logprobs must be <= {cfg.max_top_logprobs}.", param="top_logprobs")
    if max_tokens is not None and max_tokens > cfg.max_tokens_cap:
        raise APIError(400, f"max_tokens={max_tokens} is above this server's cap of {cfg.max_tokens_cap}.",
                       param="max_tokens")


LOGPROB_EXTENSIONS = ("n_probs", "top_n_tokens", "prompt_logprobs")
"""Request fields outside OpenAI's API that return log-probs (llama.cpp, TGI, vLLM): a gateway forwards them."""
UNBOUNDED = 1 << 31
"""What a log-prob field whose value is not a count asks for (refused unless the key takes the server's cap)."""


def asked_logprobs(req: RequestBase, body: dict[str, Any], chat: bool) -> tuple[int, str] | None:
    """(how many top log-probs the request asks for, the field asking most), or None for text only.

    0 means the sampled tokens' log-probs alone. Chat: `logprobs`/`top_logprobs`; completions:
    `logprobs` (set at all); both: the `LOGPROB_EXTENSIONS` in the raw body (`body`)."""
    asks: list[tuple[int, str]] = []
    if chat and (req.logprobs or req.top_logprobs):
        asks.append((req.top_logprobs or 0, "top_logprobs" if req.top_logprobs else "logprobs"))
    elif not chat and req.logprobs is not None:
        asks.append((req.logprobs, "logprobs"))
    for name in LOGPROB_EXTENSIONS:
        v = body.get(name)
        if v is None or v is False or (v == 0 and name != "prompt_logprobs"):
            continue  # prompt_logprobs=0 still returns each prompt token's own log-prob
        asks.append((v if type(v) is int and v >= 0 else UNBOUNDED, name))
    return max(asks) if asks else None


def check_key_logprobs(request: Request, req: RequestBase, chat: bool) -> None:
    """403 (before any work) when the request asks for more log-probs than its key may receive
    (`KeyRecord.max_top_logprobs`: 0 = text only, None = the server's cap, checked by `check_caps`)."""
    allowed = request.state.key.max_top_logprobs
    asked = asked_logprobs(req, request.state.body, chat)
    if allowed is None or asked is None or (allowed > 0 and asked[0] <= allowed):
        return
    n, field = asked
    may = "no log-probs (text only)" if allowed == 0 else f"at most {allowed} top log-probs"
    wants = f"{n} top log-probs" if 0 < n < UNBOUNDED else "log-probs"
    raise APIError(403, f"This API key may receive {may}; the request asks for {wants} ({field}). "
                        "The server's owner grants log-probs per key.", param=field, code="logprobs_not_allowed")


class Admission:
    """Per-key concurrency, the pending bound and the rate limits: `charge` hands out Tickets."""

    def __init__(self, cfg, limiter: RateLimiter):
        self.cfg, self.limiter = cfg, limiter
        self.inflight: dict[str, int] = {}  # key id -> requests in flight
        self.open: set[Ticket] = set()  # admitted requests not yet answered
        self.charging = 0  # requests waiting for the limiter

    def release(self, key_id: str) -> None:
        n = self.inflight.get(key_id, 0) - 1
        if n > 0:
            self.inflight[key_id] = n
        else:
            self.inflight.pop(key_id, None)

    async def charge(self, request: Request, max_tokens: int) -> Ticket:
        """Concurrency, queue and rate limits, before any tokenising: a Ticket, or 429/503."""
        if not request.app.state.querylog.health()["ok"]:  # fail closed: no model work that cannot be logged
            raise APIError(503, "The query log is unavailable; try again later.", type="server_error",
                           code="log_unavailable", headers={"Retry-After": "5"})
        key = request.state.key
        cap = self.cfg.max_concurrent_per_key
        if cap is not None and self.inflight.get(key.key_id, 0) >= cap:
            raise APIError(429, f"Too many concurrent requests for this key (limit {cap}); retry when one finishes.",
                           type="requests", code="concurrency_limit_exceeded", headers={"Retry-After": "1"})
        if self.queued() >= self.cfg.max_pending:
            raise APIError(503, "The server is at capacity; retry shortly.", type="server_error",
                           code="server_overloaded", headers={"Retry-After": "1"})
        self.inflight[key.key_id] = self.inflight.get(key.key_id, 0) + 1  # held while the limiter decides
        self.charging += 1
        try:
            reservation = await self.limit(self.limiter.acquire, key.key_id, max_tokens + 1, key.rpm, key.tpm)
        except BaseException:
            self.release(key.key_id)
            raise
        finally:
            self.charging -= 1
        ticket = Ticket(self, request, reservation, max_tokens)
        self.open.add(ticket)
        return ticket

    async def limit(self, fn, *args):
        """Call the limiter: in a worker thread when it waits on a database (the event loop never blocks)."""
        try:
            if getattr(self.limiter, "blocking", False):
                return await anyio.to_thread.run_sync(fn, *args)
            return fn(*args)
        except RateLimited as err:
            raise _rate_error(err) from None

    def queued(self) -> int:
        """Admitted requests still waiting (the gateway: all in flight upstream)."""
        return len(self.open) + self.charging


class Service(Admission):
    """The teacher, limits, batcher and token texts the routes share."""

    def __init__(self, teacher, cfg, limiter: RateLimiter, processor, report_processor=None):
        super().__init__(cfg, limiter)
        self.teacher = teacher
        self.name = cfg.model_name or teacher.name
        self.batcher = Batcher(teacher, cfg, processor, report_processor)
        self.tokens = TokenText(teacher.tokenizer)
        config = teacher.model.config
        self.context = int(getattr(config, "max_position_embeddings", None) or 2048)
        self.vocab = int(getattr(config, "vocab_size", None) or len(teacher.tokenizer))
        tok = teacher.tokenizer
        self.start_id = next(i for i in (tok.bos_token_id, tok.eos_token_id, teacher.pad_id) if i is not None)

    # ---- checks that need no model work ------------------------------------------------------
    def check(self, req: RequestBase, top_k: int, max_tokens: int | None) -> None:
        check_caps(self.cfg, req, top_k, max_tokens)
        if getattr(req, "echo", False):
            raise APIError(400, "echo is not supported.", param="echo")
        if getattr(req, "suffix", None):
            raise APIError(400, "suffix is not supported.", param="suffix")
        for p in ("presence_penalty", "frequency_penalty"):
            if getattr(req, p):
                raise APIError(400, f"{p} is not supported (must be 0).", param=p)
        if req.logit_bias:
            raise APIError(400, "logit_bias is not supported.", param="logit_bias")

    def queued(self) -> int:
        """Admitted requests not yet decoding (tokenising, or waiting for a batch)."""
        return sum(t.job is None or not t.job.started for t in self.open) + self.charging

    async def admit(self, ticket: Ticket, req: RequestBase, prompt_ids: list[int], max_tokens: int | None, top_k: int) -> Job:
        """After tokenising: context length (400), the prompt's tokens charged (429); the Job."""
        if not prompt_ids:
            prompt_ids = [self.start_id]
        if any(t >= self.vocab for t in prompt_ids):
            raise APIError(400, f"prompt token ids must be < {self.vocab}.", param="prompt")
        room = self.context - len(prompt_ids)
        if max_tokens is None:
            max_tokens = min(ticket.max_tokens, room)
        if max_tokens < 1 or len(prompt_ids) + max_tokens > self.context:
            raise APIError(
                400,
                f"This model's context is {self.context} tokens; the prompt has {len(prompt_ids)} and "
                f"max_tokens is {max(max_tokens, 0)}.",
                param="messages" if isinstance(req, ChatRequest) else "prompt",
                code="context_length_exceeded",
            )
        ticket.row["tokens_in"] = len(prompt_ids)
        await self.limit(self.limiter.resize, ticket.reservation, len(prompt_ids) + max_tokens)
        ticket.prompt_tokens = len(prompt_ids)
        temperature = 1.0 if req.temperature is None else float(req.temperature)
        top_p = 1.0 if req.top_p is None else max(float(req.top_p), 1e-9)
        seed = secrets.randbits(63) if req.seed is None else req.seed & ((1 << 63) - 1)
        loop = asyncio.get_running_loop()
        ticket.started = True
        ticket.job = Job(prompt_ids, max_tokens, top_k, temperature, top_p, req.stops(), seed, loop.create_future(),
                         tokens=asyncio.Queue() if req.stream else None)
        return ticket.job

    def remaining(self, job: Job) -> float:
        return max(0.0, job.submitted + self.cfg.request_timeout_s - time.monotonic())


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def wait_or_leave(request: Request, work: asyncio.Future, timeout: float) -> str:
    """Wait for `work`, the client leaving or `timeout` seconds: "done", "gone" or "timeout"."""
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({work, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    return "done" if work in done else "gone" if gone in done else "timeout"


def _deadline_error() -> APIError:
    return APIError(504, "The request ran past this server's deadline (request_timeout_s); retry with fewer "
                         "max_tokens.", type="server_error", code="deadline_exceeded")


async def respond(svc: Service, request: Request, req: RequestBase, ticket: Ticket, *, chat: bool,
                  prompt_text: str) -> Any:
    """Decode the admitted job and answer: the whole completion as JSON, or an SSE stream."""
    job = ticket.job
    wants_lp = bool(req.logprobs) if chat else req.logprobs is not None
    head = {"id": f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", "created": int(time.time()),
            "model": svc.name, "system_fingerprint": None}
    await svc.batcher.submit(job)
    if not req.stream:
        outcome = await wait_or_leave(request, job.future, svc.remaining(job))
        if not job.future.done():  # the client left, or the deadline passed: stop decoding, charge what ran
            ticket.used = job.decoded
            if outcome == "gone":
                ticket.close("client_closed")
                return Response(status_code=499)
            ticket.close("deadline_exceeded")
            raise _deadline_error()
        try:
            c = job.future.result()
        except BaseException:
            ticket.close(None)  # a decoding error: nothing delivered
            raise
        ticket.used, ticket.text, ticket.finished = len(c.completion_ids), c.text, True
        ticket.ids = list(c.completion_ids)
        ticket.close(None)
        lp = None
        if wants_lp:
            lp = chat_logprobs(svc.tokens, c) if chat else completion_logprobs(svc.tokens, c, len(prompt_text))
        return completion_body(head, c, chat=chat, logprobs=lp)
    return StreamingResponse(_events(svc, req, ticket, head, chat, wants_lp, prompt_text),
                             media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _events(svc: Service, req: RequestBase, ticket: Ticket, head: dict, chat: bool, wants_lp: bool,
                  prompt_text: str):
    job, tokenizer = ticket.job, svc.teacher.tokenizer
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    chunks = StreamChunks(head, chat=chat, include_usage=include_usage)
    chunk = chunks.delta
    error = None
    try:
        if chat:
            yield chunk(None, first=True)
        detok, streamed, sent, got = Detokenizer(tokenizer), "", "", []
        while True:
            try:
                item = await asyncio.wait_for(job.tokens.get(), svc.remaining(job))
            except TimeoutError:
                error = "deadline_exceeded"
                yield _deadline_error().sse()
                yield SSE_DONE
                return
            if item is DONE:
                break
            if wants_lp:
                continue  # log-prob chunks are built from the finished completion below
            got.extend(item)
            streamed += detok.add(item)
            safe = safe_prefix(streamed, job.stop)
            if len(safe) > len(sent):
                ticket.used, ticket.text, ticket.ids = len(got), safe, list(got)
                yield chunk(safe[len(sent):])
                sent = safe
        try:
            c = job.future.result()
        except APIError as err:
            error = err.log_type
            yield err.sse()
            yield SSE_DONE
            return
        if wants_lp:
            detok = Detokenizer(tokenizer)
            offset = len(prompt_text)
            for i, tid in enumerate(c.completion_ids):
                piece = detok.add([tid])
                if len(sent) + len(piece) > len(c.text):
                    piece = c.text[len(sent):]
                lp = (chat_logprobs(svc.tokens, c, i, i + 1) if chat
                      else completion_logprobs(svc.tokens, c, offset, i, i + 1))
                offset += len(lp["tokens"][0]) if not chat else 0
                ticket.used, ticket.text, ticket.ids = i + 1, sent + piece, list(c.completion_ids[: i + 1])
                yield chunk(piece, lp=lp)
                sent += piece
        ticket.used, ticket.text, ticket.ids = len(c.completion_ids), c.text, list(c.completion_ids)
        rest = c.text[len(sent):] if c.text.startswith(sent) else ""
        if rest:
            yield chunk(rest)
        yield chunk(None, finish=c.finish_reason)
        if include_usage:
            yield chunks.usage_chunk(c)
        yield SSE_DONE
        ticket.finished = True
    finally:
        if error is not None:
            ticket.finished = True
            ticket.row["error_type"] = error
        ticket.close("client_closed")
