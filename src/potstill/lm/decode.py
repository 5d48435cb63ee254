"""One batched decoding run with continuous refill: the state of every row and the loop that drives it.

`Engine.complete_ids` (engine.py) builds a `DecodeRun` and calls `run()`. The loop alternates two
named steps: `_admit` prefills waiting prompts and merges them into the running batch's KV slab
(kvslab.py), and `_step` decodes one token for every live row; `_consume` samples from each row's
logits (after the logits processor, e.g. a watermark) and records ids, log-probs and top-k: those of the
distribution sampled from, or, with a `report_processor`, of `report_processor(contexts, raw logits)`
(the watermark's served-log-prob policy: guard/watermark.py `Watermark.report_processor`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

from potstill.lm.kvslab import SlabCache, keep_freed_memory
from potstill.lm.sampling import SAMPLE_TOP, sample
from potstill.lm.tokens import row_seed
from potstill.lm.types import Completion, LogitsProcessor, SamplingParams

if TYPE_CHECKING:
    from potstill.lm.engine import Engine

Feed = Callable[[int], list[tuple[list[int], int, SamplingParams]]]


class DecodeRun:
    """Rows being decoded together; see `Engine.complete_ids` for the meaning of every argument."""

    def __init__(
        self,
        engine: Engine,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        seeds: list[int] | None,
        logits_processor: LogitsProcessor | None,
        on_token: Callable[[int, int], None] | None,
        include_eos: bool,
        row_params: list[SamplingParams] | None,
        feed: Feed | None,
        on_done: Callable[[int, Completion], None] | None,
        report_processor: LogitsProcessor | None = None,
    ):
        n = len(prompt_ids)
        self.engine = engine
        self.prompt_ids = list(prompt_ids)
        self.params = params
        self.rp = list(row_params) if row_params is not None else [params] * n
        seeds = seeds if seeds is not None else [row_seed(params.seed, i) for i in range(n)]
        self.gens = [np.random.default_rng(s) for s in seeds]
        self.one_group = row_params is None and feed is None
        self.processor, self.on_token, self.on_done, self.feed = logits_processor, on_token, on_done, feed
        self.report = report_processor
        self.include_eos = include_eos
        self.k = params.top_logprobs
        self.eos = torch.tensor(engine.eos_ids, device=engine.device)
        self.contexts = [list(p) for p in prompt_ids]
        self.out_ids: list[list[int]] = [[] for _ in range(n)]
        self.out_lp: list[list[float]] = [[] for _ in range(n)]
        self.out_tk_ids: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.out_tk_lp: list[list[np.ndarray]] = [[] for _ in range(n)]
        self.finish = ["length"] * n

    # ---- sampling one token per row --------------------------------------------------------------
    def _next_tokens(self, rows: list[int], logits, logprobs, top) -> torch.Tensor:
        if self.one_group:
            return sample(logits, logprobs, self.params, [self.gens[i] for i in rows], top)
        # rows grouped by their sampling params, each group sampled as if alone
        next_tok = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        groups: dict[tuple[float, float], list[int]] = {}
        for b, i in enumerate(rows):
            groups.setdefault((self.rp[i].temperature, self.rp[i].top_p), []).append(b)
        for (temp, top_p), bs in groups.items():
            idx = torch.tensor(bs, device=logits.device)
            sub = SamplingParams(max_new_tokens=1, temperature=temp, top_p=top_p)
            next_tok[idx] = sample(logits[idx], logprobs[idx], sub, [self.gens[rows[b]] for b in bs],
                                   (top[0][idx], top[1][idx]))
        return next_tok

    def _consume(self, rows: list[int], logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:
        """Sample one token for each row from its logits; return the positions of rows still going."""
        k = self.k
        raw = logits.float()
        logits = raw.clone() if self.report is not None else raw  # a processor may write in place
        if self.processor is not None:
            logits = self.processor([self.contexts[i] for i in rows], logits)
        logprobs = torch.log_softmax(logits, dim=-1)
        top = logprobs.topk(min(max(k, SAMPLE_TOP), logprobs.shape[1]), dim=-1)  # sorted: capture and sampler
        next_tok = self._next_tokens(rows, logits, logprobs, top)
        if self.report is not None:  # log-probs reported from another distribution than the one sampled
            logprobs = torch.log_softmax(self.report([self.contexts[i] for i in rows], raw), dim=-1)
            top = logprobs.topk(min(k, logprobs.shape[1]), dim=-1) if k else top
        chosen = logprobs.gather(1, next_tok[:, None])[:, 0].tolist()
        if k:
            tk_lp, tk_ids = top[0][:, :k].cpu().numpy(), top[1][:, :k].cpu().numpy()
        toks = next_tok.tolist()
        is_eos = torch.isin(next_tok, self.eos).tolist()
        keep = []
        for b, i in enumerate(rows):
            if is_eos[b]:
                self.finish[i] = "stop"
                if not self.include_eos:
                    continue
            else:
                self.contexts[i].append(toks[b])
            self.out_ids[i].append(toks[b])
            self.out_lp[i].append(chosen[b])
            if k:
                self.out_tk_ids[i].append(tk_ids[b])
                self.out_tk_lp[i].append(tk_lp[b])
            if is_eos[b]:
                continue
            if self.rp[i].stop and self.engine._hits_stop(self.out_ids[i], self.rp[i].stop):
                self.finish[i] = "stop"
            elif len(self.out_ids[i]) < self.rp[i].max_new_tokens:
                keep.append(b)
        if self.on_done is not None:
            kept = set(keep)
            for b, i in enumerate(rows):
                if b not in kept:
                    self.on_done(i, self.result(i))
        if self.on_token is not None:  # (tokens sampled this step, rows that finished)
            self.on_token(len(rows), len(rows) - len(keep))
        return keep, next_tok

    def result(self, i: int) -> Completion:
        ids, k, rp = self.out_ids[i], self.k, self.rp[i]
        text = self.engine.tokenizer.decode(ids, skip_special_tokens=True)
        if rp.stop and self.finish[i] == "stop":
            text, ids, cut = self.engine._trim_stop(text, ids, rp.stop)
        else:
            cut = len(ids)
        t = len(ids)
        return Completion(
            prompt_ids=list(self.prompt_ids[i]),
            completion_ids=ids,
            text=text,
            finish_reason=self.finish[i],
            sampled_logprob=np.asarray(self.out_lp[i][:cut], dtype=np.float32),
            topk_ids=np.asarray(self.out_tk_ids[i][:t], dtype=np.int64).reshape(t, k) if k else None,
            topk_logprobs=np.asarray(self.out_tk_lp[i][:t], dtype=np.float32).reshape(t, k) if k else None,
        )

    def _add_fed(self, free: int) -> list[int]:
        """Rows handed in by `feed` at a refill point; they get the next indices."""
        new = []
        for ids, seed, row in self.feed(free) if free > 0 else ():
            new.append(len(self.prompt_ids))
            self.prompt_ids.append(list(ids))
            self.rp.append(row)
            self.gens.append(np.random.default_rng(seed))
            self.contexts.append(list(ids))
            for lst in (self.out_ids, self.out_lp, self.out_tk_ids, self.out_tk_lp):
                lst.append([])
            self.finish.append("length")
        return new

    # ---- the loop ----------------------------------------------------------------------------------
    def run(self, batch_size: int | None, prefill_tokens: int, share_prefix: bool, memory: int | None) -> list[Completion]:
        e, n = self.engine, len(self.prompt_ids)
        # shortest prompts first: rows prefilled together have similar lengths, so little padding
        self.queue = sorted(range(n), key=lambda i: len(self.prompt_ids[i]))
        # a sliding window counts positions, the prefill's mask columns: padding between a shared prefix and a
        # prompt's own tokens would hide prefix tokens the window reaches, so long prompts are prefilled whole
        window = e.sliding_window
        share_prefix = share_prefix and not (window and max(map(len, self.prompt_ids)) > window)
        self.prefix = e._shared_prefix(self.prompt_ids) if share_prefix else None
        self.prefix_ids = self.prompt_ids[0][: self.prefix[0]] if self.prefix else None
        self.max_len = max(map(len, self.prompt_ids)) + self.params.max_new_tokens
        cap = batch_size or n
        self.cap = e._rows_that_fit(min(cap, n) if self.feed is None else cap, self.max_len, prefill_tokens, memory)
        self.prefill_tokens = prefill_tokens
        keep_freed_memory()
        self.live: list[int] = []
        self.slab: SlabCache | None = None
        self.attn = self.step_ids = None
        while True:
            if self.feed is not None and not self.queue:  # a waiting (too long) row first lets the batch drain
                self.queue = sorted(self._add_fed(self.cap - len(self.live)), key=lambda i: len(self.prompt_ids[i]))
            if not (self.queue or self.live):
                break
            free = self.cap - len(self.live)
            if self.queue and (not self.live or free >= max(1, self.cap // 4) or free >= len(self.queue)):
                self._admit(free)
                if not self.live:
                    continue
            self._step()
        return [self.result(i) for i in range(len(self.prompt_ids))]

    def _admit(self, free: int) -> None:
        """Prefill up to `free` waiting prompts and merge the rows still going into the running batch."""
        e, p = self.engine, self.prompt_ids
        taken, self.queue = self.queue[:free], self.queue[free:]
        # a much longer prompt would widen every live row's cache: it waits for a batch of its own
        width = self.attn.shape[1] if self.live else len(p[taken[0]])
        fits = [i for i in taken if len(p[i]) <= max(2 * width, width + 64)]
        self.queue, taken = taken[len(fits) :] + self.queue, fits
        for group in prefill_groups(taken, [len(p[i]) for i in taken], self.prefill_tokens):
            pre = self.prefix
            shared = pre if pre and all(len(p[i]) > pre[0] and p[i][: pre[0]] == self.prefix_ids for i in group) else None
            new_cache, new_attn, logits = e._prefill([p[i] for i in group], shared)
            keep, toks = self._consume(group, logits)
            if not keep:
                continue
            if len(keep) < len(group):
                idx = torch.tensor(keep, device=e.device)
                new_cache.batch_select_indices(idx)
                new_attn, toks = new_attn[idx], toks[idx]
            if self.slab is None:
                self.slab = SlabCache(new_cache, new_attn, min(self.cap, len(keep) + len(self.queue)), self.max_len,
                                      window=e.sliding_window)
                self.attn, self.step_ids = new_attn, toks[:, None]
            else:
                self.attn = self.slab.add_rows(new_cache, self.attn, new_attn)
                self.step_ids = torch.cat([self.step_ids, toks[:, None]])
            self.live = self.live + [group[b] for b in keep]

    def _step(self) -> None:
        """One decoding step for every live row; finished rows leave the slab."""
        slab = self.slab
        slab.row_capacity = min(self.cap, len(self.live) + len(self.queue))  # rows a new buffer must hold from here on
        attn = torch.cat([self.attn, self.attn.new_ones((len(self.live), 1))], dim=1)
        pos = attn.sum(-1, keepdim=True) - 1
        out = self.engine.model(input_ids=self.step_ids, attention_mask=slab.step_mask(attn), position_ids=pos,
                                cache=slab.cache, use_cache=True)
        slab.advance()
        keep, toks = self._consume(self.live, out.logits[:, -1, :])
        if not keep:
            self.live, self.slab, self.attn, self.step_ids = [], None, None, None
            return
        if len(keep) < len(self.live):
            order = slab.keep_rows(keep)  # finished rows' slots refilled from the end: a new row order
            idx = torch.tensor(order, device=self.engine.device)
            attn, toks, self.live = slab.trim_left(attn[idx]), toks[idx], [self.live[b] for b in order]
        self.attn, self.step_ids = attn, toks[:, None]


def prefill_groups(rows: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Split rows (sorted by length) into prefill groups of at most `budget` padded tokens."""
    groups: list[list[int]] = []
    for row, length in zip(rows, lengths, strict=True):
        if groups and (len(groups[-1]) + 1) * length <= budget:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups
