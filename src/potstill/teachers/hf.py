"""Local transformers teacher: batched decoding with a KV cache, top-k log-probs from the same logits.

`HFTeacher.load(spec)` accepts "embedded", a model directory (safetensors) or a `.gguf` file
(converted once and cached, see embedded.py). Decoding is batched with left padding in a KV cache
written in place (kvslab.py); rows that finish leave the batch and waiting prompts take their
slots, so the batch only pays for live rows. Prompts that start alike (a chat template's system
turn) share one prefill of the common part. Each completion samples from its own generator,
seeded from the run seed and the row's id, so a completion does not depend on which batch it
landed in.

    teacher = HFTeacher.load("embedded")
    out = teacher.complete([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=16))
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from potstill.errors import PotstillError
from potstill.lm.loading import cpu_has_bf16 as _cpu_has_bf16  # noqa: F401  (re-exported, old name)
from potstill.lm.loading import pick_dtype, resolve_model_dir  # noqa: F401  (re-exported)
from potstill.lm.tokens import chat_ids, pad_token_id, row_seed, tokenizer_hash  # noqa: F401  (re-exported)
from potstill.teachers.base import Completion, LogitsProcessor, SamplingParams
from potstill.teachers.kvslab import (
    SlabCache,
    available_memory,
    keep_freed_memory,
    kv_bytes_per_token,
    rows_that_fit,
)
from potstill.utils import sha256_file, sha256_text

log = logging.getLogger(__name__)


class HFTeacher:
    """A local causal LM that answers prompts with completions and top-k log-probs."""

    def __init__(self, model, tokenizer, name: str, model_dir: Path | None = None):
        self.model = model.eval()
        from potstill.teachers.attention import use_decode_attention

        use_decode_attention(model)  # CPU: single-query attention as matmuls (see attention.py)
        self.tokenizer = tokenizer
        self.name = name
        self.model_dir = model_dir
        self.device = next(model.parameters()).device
        self.eos_ids = self._eos_ids()
        self.pad_id = pad_token_id(tokenizer, fallback=self.eos_ids[0])
        self._kv_token_bytes: int | None = None

    @classmethod
    def load(cls, spec: str, dtype: str = "float32", device: str | None = None) -> HFTeacher:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = resolve_model_dir(spec)
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        tok = AutoTokenizer.from_pretrained(model_dir)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=pick_dtype(dtype)).to(device)
        name = "SmolLM2-135M-Instruct" if spec == "embedded" else Path(spec).name
        return cls(model, tok, name=name, model_dir=model_dir)

    def _eos_ids(self) -> list[int]:
        ids = set()
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        for x in [eos, self.tokenizer.eos_token_id]:
            if isinstance(x, int):
                ids.add(x)
            elif isinstance(x, list):
                ids.update(x)
        if not ids:
            raise PotstillError(f"{self.name}: model has no EOS token")
        return sorted(ids)

    # ---- identity -------------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        weights = None
        if self.model_dir is not None:
            files = sorted(Path(self.model_dir).glob("*.safetensors"))
            weights = sha256_text("".join(sha256_file(f) for f in files)) if files else None
        vocab = self.tokenizer.get_vocab()
        return {
            "name": self.name,
            "backend": "hf",
            "weights_sha256": weights,
            "tokenizer_sha256": tokenizer_hash(self.tokenizer),
            "chat_template_sha256": sha256_text(self.tokenizer.chat_template or ""),
            "vocab_size": max(len(vocab), self.model.config.vocab_size),
        }

    # ---- prompts ----------------------------------------------------------------------------
    def encode_chat(self, messages: list[dict]) -> list[int]:
        return chat_ids(self.tokenizer, messages)

    def complete(
        self,
        prompts: list[list[dict]],
        params: SamplingParams,
        seeds: list[int] | None = None,
        logits_processor: LogitsProcessor | None = None,
    ) -> list[Completion]:
        return self.complete_ids([self.encode_chat(m) for m in prompts], params, seeds, logits_processor)

    # ---- decoding ---------------------------------------------------------------------------
    @torch.no_grad()
    def complete_ids(
        self,
        prompt_ids: list[list[int]],
        params: SamplingParams,
        seeds: list[int] | None = None,
        logits_processor: LogitsProcessor | None = None,
        on_token: Callable[[int, int], None] | None = None,
        batch_size: int | None = None,
        include_eos: bool = False,
        prefill_tokens: int = 8192,
        share_prefix: bool = True,
        memory: int | None = None,
        row_params: list[SamplingParams] | None = None,
        feed: Callable[[int], list[tuple[list[int], int, SamplingParams]]] | None = None,
        on_done: Callable[[int, Completion], None] | None = None,
    ) -> list[Completion]:
        """Decode tokenised prompts, `batch_size` rows at a time with continuous refill.

        With `include_eos`, a completion that stops on EOS keeps that token (and its top-k) as its
        last completion token, so a student trained on it learns when to stop; the text never
        shows it.

        When rows finish, waiting prompts are prefilled and merged into the running batch (their
        KV cache left-padded to the batch's length), so the batch stays full. `seeds[i]` seeds row
        i's sampler, so a row's completion does not depend on its batch-mates. Prompts enter
        shortest first, prefilled in groups of at most `prefill_tokens` padded tokens (one long
        prompt must not pad a whole batch to its length), and cache columns that no live row
        uses any more are cut off. With `share_prefix`, the prompts' common leading tokens are
        prefilled once and their keys and values copied into every row. The batch is lowered
        (with a warning) where its KV cache would not fit in `memory` bytes (default: what the device
        has free). `row_params[i]`, when given, is row i's own temperature, top-p, stop strings and
        max_new_tokens (at most `params.max_new_tokens`), so requests sampled differently share a
        batch (the server's batcher); `params` keeps `top_logprobs`. With `feed`, rows join the running
        batch: at each refill point `feed(free_rows)` returns new `(prompt_ids, seed, row_params)` rows
        (at most `free_rows`; they get the next indices), and `on_done(i, completion)` is called as soon
        as row i finishes. The returned list holds every row, fed ones included.
        """
        if not prompt_ids:
            return []
        n = len(prompt_ids)
        prompt_ids = list(prompt_ids)
        rp = list(row_params) if row_params is not None else [params] * n
        seeds = seeds if seeds is not None else [row_seed(params.seed, i) for i in range(n)]
        gens = [np.random.default_rng(s) for s in seeds]
        cap = batch_size or n
        k = params.top_logprobs
        dev = self.device
        eos = torch.tensor(self.eos_ids, device=dev)

        contexts = [list(p) for p in prompt_ids]
        out_ids: list[list[int]] = [[] for _ in range(n)]
        out_lp: list[list[float]] = [[] for _ in range(n)]
        out_tk_ids: list[list[np.ndarray]] = [[] for _ in range(n)]
        out_tk_lp: list[list[np.ndarray]] = [[] for _ in range(n)]
        finish = ["length"] * n

        def consume(rows: list[int], logits: torch.Tensor) -> tuple[list[int], torch.Tensor]:
            """Sample one token for each row from its logits; return the positions of rows still going."""
            logits = logits.float()
            if logits_processor is not None:
                logits = logits_processor([contexts[i] for i in rows], logits)
            logprobs = torch.log_softmax(logits, dim=-1)
            top = logprobs.topk(min(max(k, SAMPLE_TOP), logprobs.shape[1]), dim=-1)  # sorted: capture and sampler
            if row_params is None and feed is None:
                next_tok = self._sample(logits, logprobs, params, [gens[i] for i in rows], top)
            else:  # rows grouped by their sampling params, each group sampled as if alone
                next_tok = torch.empty(len(rows), dtype=torch.long, device=logits.device)
                groups: dict[tuple[float, float], list[int]] = {}
                for b, i in enumerate(rows):
                    groups.setdefault((rp[i].temperature, rp[i].top_p), []).append(b)
                for (temp, top_p), bs in groups.items():
                    idx = torch.tensor(bs, device=logits.device)
                    sub = SamplingParams(max_new_tokens=1, temperature=temp, top_p=top_p)
                    next_tok[idx] = self._sample(logits[idx], logprobs[idx], sub, [gens[rows[b]] for b in bs],
                                                 (top[0][idx], top[1][idx]))
            chosen = logprobs.gather(1, next_tok[:, None])[:, 0].tolist()
            if k:
                tk_lp, tk_ids = top[0][:, :k].cpu().numpy(), top[1][:, :k].cpu().numpy()
            toks = next_tok.tolist()
            is_eos = torch.isin(next_tok, eos).tolist()
            keep = []
            for b, i in enumerate(rows):
                if is_eos[b]:
                    finish[i] = "stop"
                    if include_eos:
                        out_ids[i].append(toks[b])
                        out_lp[i].append(chosen[b])
                        if k:
                            out_tk_ids[i].append(tk_ids[b])
                            out_tk_lp[i].append(tk_lp[b])
                    continue
                out_ids[i].append(toks[b])
                out_lp[i].append(chosen[b])
                contexts[i].append(toks[b])
                if k:
                    out_tk_ids[i].append(tk_ids[b])
                    out_tk_lp[i].append(tk_lp[b])
                if rp[i].stop and self._hits_stop(out_ids[i], rp[i].stop):
                    finish[i] = "stop"
                elif len(out_ids[i]) < rp[i].max_new_tokens:
                    keep.append(b)
            if on_done is not None:
                kept = set(keep)
                for b, i in enumerate(rows):
                    if b not in kept:
                        on_done(i, result(i))
            if on_token is not None:  # (tokens sampled this step, rows that finished)
                on_token(len(rows), len(rows) - len(keep))
            return keep, next_tok

        def result(i: int) -> Completion:
            ids = out_ids[i]
            text = self.tokenizer.decode(ids, skip_special_tokens=True)
            if rp[i].stop and finish[i] == "stop":
                text, ids, cut = self._trim_stop(text, ids, rp[i].stop)
            else:
                cut = len(ids)
            t = len(ids)
            return Completion(
                prompt_ids=list(prompt_ids[i]),
                completion_ids=ids,
                text=text,
                finish_reason=finish[i],
                sampled_logprob=np.asarray(out_lp[i][:cut], dtype=np.float32),
                topk_ids=np.asarray(out_tk_ids[i][:t], dtype=np.int64).reshape(t, k) if k else None,
                topk_logprobs=np.asarray(out_tk_lp[i][:t], dtype=np.float32).reshape(t, k) if k else None,
            )

        def add_fed(free: int) -> list[int]:
            new = []
            for ids, seed, row in feed(free) if free > 0 else ():
                new.append(len(prompt_ids))
                prompt_ids.append(list(ids))
                rp.append(row)
                gens.append(np.random.default_rng(seed))
                contexts.append(list(ids))
                for lst in (out_ids, out_lp, out_tk_ids, out_tk_lp):
                    lst.append([])
                finish.append("length")
            return new

        # shortest prompts first: rows prefilled together have similar lengths, so little padding
        queue = sorted(range(n), key=lambda i: len(prompt_ids[i]))
        prefix = self._shared_prefix(prompt_ids) if share_prefix else None
        prefix_ids = prompt_ids[0][: prefix[0]] if prefix else None
        max_len = max(map(len, prompt_ids)) + params.max_new_tokens
        cap = self._rows_that_fit(min(cap, n) if feed is None else cap, max_len, prefill_tokens, memory)
        keep_freed_memory()
        live: list[int] = []
        slab: SlabCache | None = None
        attn = step_ids = None
        while True:
            if feed is not None and not queue:  # a waiting (too long) row first lets the batch drain
                queue = sorted(add_fed(cap - len(live)), key=lambda i: len(prompt_ids[i]))
            if not (queue or live):
                break
            free = cap - len(live)
            if queue and (not live or free >= max(1, cap // 4) or free >= len(queue)):
                taken, queue = queue[:free], queue[free:]
                # a much longer prompt would widen every live row's cache: it waits for a batch of its own
                width = attn.shape[1] if live else len(prompt_ids[taken[0]])
                fits = [i for i in taken if len(prompt_ids[i]) <= max(2 * width, width + 64)]
                queue, taken = taken[len(fits) :] + queue, fits
                for group in _prefill_groups(taken, [len(prompt_ids[i]) for i in taken], prefill_tokens):
                    shared = prefix if prefix and all(
                        len(prompt_ids[i]) > prefix[0] and prompt_ids[i][: prefix[0]] == prefix_ids for i in group
                    ) else None
                    new_cache, new_attn, logits = self._prefill([prompt_ids[i] for i in group], shared)
                    keep, toks = consume(group, logits)
                    if not keep:
                        continue
                    if len(keep) < len(group):
                        idx = torch.tensor(keep, device=dev)
                        new_cache.batch_select_indices(idx)
                        new_attn, toks = new_attn[idx], toks[idx]
                    if slab is None:
                        slab = SlabCache(new_cache, new_attn, min(cap, len(keep) + len(queue)), max_len)
                        attn, step_ids = new_attn, toks[:, None]
                    else:
                        attn = slab.add_rows(new_cache, attn, new_attn)
                        step_ids = torch.cat([step_ids, toks[:, None]])
                    live = live + [group[b] for b in keep]
                if not live:
                    continue
            slab.row_capacity = min(cap, len(live) + len(queue))  # rows a new buffer must hold from here on
            attn = torch.cat([attn, attn.new_ones((len(live), 1))], dim=1)
            pos = attn.sum(-1, keepdim=True) - 1
            out = self.model(input_ids=step_ids, attention_mask=slab.step_mask(attn), position_ids=pos,
                             cache=slab.cache, use_cache=True)
            slab.advance()
            keep, toks = consume(live, out.logits[:, -1, :])
            if not keep:
                live, slab, attn, step_ids = [], None, None, None
                continue
            if len(keep) < len(live):
                order = slab.keep_rows(keep)  # finished rows' slots refilled from the end: a new row order
                idx = torch.tensor(order, device=dev)
                attn, toks, live = slab.trim_left(attn[idx]), toks[idx], [live[b] for b in order]
            step_ids = toks[:, None]

        return [result(i) for i in range(len(prompt_ids))]

    def _rows_that_fit(self, rows: int, max_len: int, prefill_tokens: int, memory: int | None) -> int:
        """`rows`, or fewer where a batch of them would not have room for its KV cache."""
        memory = memory if memory is not None else available_memory(self.device)
        if memory is None:
            return rows
        if self._kv_token_bytes is None:  # measured on a one-token forward: any cache layout, any dtype
            ids = torch.tensor([[self.pad_id]], device=self.device)
            self._kv_token_bytes = kv_bytes_per_token(self.model(input_ids=ids, use_cache=True).cache)
        fit = rows_that_fit(rows, max_len, self._kv_token_bytes, memory, prefill_tokens)
        if fit < rows:
            log.warning("batch lowered from %d to %d rows: %d rows x %d tokens of KV cache (%.0f KiB a token) "
                        "would not fit in %.1f GiB free on %s", rows, fit, rows, max_len,
                        self._kv_token_bytes / 1024, memory / 2**30, self.device)
        return fit

    def _shared_prefix(self, prompts: list[list[int]], min_tokens: int = 8):
        """The prompts' common leading tokens (a chat template's system turn, n samples of one prompt)
        and their KV cache, computed once; None when shorter than `min_tokens`. Every prompt keeps at
        least one token of its own, whose logits start its completion."""
        if len(prompts) < 2:
            return None
        common = os.path.commonprefix([list(p) for p in prompts])[: min(map(len, prompts)) - 1]
        if len(common) < min_tokens:
            return None
        ids = torch.tensor([common], device=self.device)
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1)
        return len(common), [(layer.keys, layer.values) for layer in out.cache.layers]

    def _prefill(self, prompts: list[list[int]], prefix=None):
        """Forward over new prompts: (their cache, attention mask, last-position logits).

        Rows are `[shared prefix][left padding][own tokens]`: the prefix's keys and values are copied
        from `_shared_prefix` instead of recomputed, and the mask hides the padding in between.
        """
        from transformers.cache_utils import DynamicCache

        p = prefix[0] if prefix else 0
        own = [q[p:] for q in prompts]
        width = max(len(q) for q in own)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(prompts), p + width), dtype=torch.long)
        attn[:, :p] = 1
        for i, q in enumerate(own):
            ids[i, width - len(q) :] = torch.tensor(q)
            attn[i, p + width - len(q) :] = 1
        ids, attn = ids.to(self.device), attn.to(self.device)
        pos = (attn.cumsum(-1) - 1).clamp(min=0)[:, p:]
        cache = None
        if prefix:
            b = len(prompts)
            cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
                                                 for k, v in prefix[1]])
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.cache, attn, out.logits[:, -1, :]

    @staticmethod
    def _sample(logits, logprobs, params: SamplingParams, gens: list[np.random.Generator], top=None) -> torch.Tensor:
        """Inverse-CDF sampling with one uniform per row from the row's own generator.

        The CDF runs over the tokens in order of probability: first the `top` candidates (the
        sorted top-k the capture takes anyway), then the rest of the vocabulary. A row whose draw
        lands in the top candidates (nearly all) never touches the other ~V entries; only rows
        whose draw falls in the tail, or whose top-p nucleus reaches past the candidates, take a
        cumulative sum over the full vocabulary. Exact for any temperature and top-p.
        """
        if params.temperature == 0:
            return logits.argmax(-1)
        if logprobs is None:
            logprobs = torch.log_softmax(logits, dim=-1)
        if top is None:
            top = logprobs.topk(min(SAMPLE_TOP, logprobs.shape[1]), dim=-1)
        top_ids = top[1]
        if params.temperature == 1.0:
            scaled_lp = logprobs
        else:
            scaled = logits / params.temperature
            scaled_lp = scaled - torch.logsumexp(scaled, dim=-1, keepdim=True)
        top_p = scaled_lp.gather(1, top_ids).exp()  # [B, K], descending
        cum = top_p.cumsum(-1)
        r = torch.tensor([g.random() for g in gens], dtype=cum.dtype, device=cum.device)
        last = top_ids.shape[1] - 1
        if params.top_p < 1.0:
            kept = (cum - top_p) < params.top_p  # the nucleus: tokens whose preceding mass is under top_p
            cum = (top_p * kept).cumsum(-1)
            pick = torch.searchsorted(cum, (r * cum[:, -1])[:, None], right=True)[:, 0]
            pick = torch.minimum(pick, kept.sum(-1) - 1)
            slow = cum[:, -1] < params.top_p  # the nucleus reaches past the candidates
        else:
            pick = torch.searchsorted(cum, r[:, None], right=True)[:, 0]
            slow = pick > last  # the draw falls in the tail
        out = top_ids.gather(1, pick.clamp(max=last)[:, None])[:, 0]
        rows = slow.nonzero()[:, 0]
        if len(rows):
            out[rows] = _sample_rows(scaled_lp[rows].exp(), top_ids[rows], r[rows], params.top_p)
        return out

    def _hits_stop(self, ids: list[int], stops: list[str]) -> bool:
        tail = self.tokenizer.decode(ids[-16:], skip_special_tokens=True)
        return any(s in tail for s in stops)

    def _trim_stop(self, text: str, ids: list[int], stops: list[str]) -> tuple[str, list[int], int]:
        cut = min((text.find(s) for s in stops if s in text), default=-1)
        if cut < 0:
            return text, ids, len(ids)
        text = text[:cut]
        # keep the shortest token prefix whose decoding covers the trimmed text
        for j in range(len(ids) + 1):
            if len(self.tokenizer.decode(ids[:j], skip_special_tokens=True)) >= len(text):
                return text, ids[:j], j
        return text, ids, len(ids)

    # ---- teacher forcing ---------------------------------------------------------------------
    @torch.no_grad()
    def score_ids(
        self,
        prompt_ids: list[list[int]],
        completion_ids: list[list[int]],
        k: int = 20,
        batch_size: int = 16,
        on_rows: Callable[[int, int], None] | None = None,
        max_batch_tokens: int = 8192,
    ) -> list[Completion]:
        """Teacher forcing at prefill speed: for each (prompt, completion) pair, the teacher's top-k and
        the log-prob of the given token at every completion position, as a Completion.

        Sequences are length-sorted and right-padded into batches of at most `batch_size` rows and
        `max_batch_tokens` padded tokens; one forward pass per batch. The output head runs only on
        the completion positions (not on the prompt), in chunks, so memory stays bounded by
        chunk x vocab instead of batch x length x vocab.
        """
        n = len(prompt_ids)
        results: list[Completion | None] = [None] * n
        order = sorted(range(n), key=lambda i: len(prompt_ids[i]) + len(completion_ids[i]))
        start = 0
        while start < n:
            chunk = [order[start]]
            while start + len(chunk) < n and len(chunk) < batch_size:
                nxt = order[start + len(chunk)]
                width = len(prompt_ids[nxt]) + len(completion_ids[nxt])  # sorted: the widest so far
                if width * (len(chunk) + 1) > max_batch_tokens:
                    break
                chunk.append(nxt)
            start += len(chunk)
            seqs = [list(prompt_ids[i]) + list(completion_ids[i]) for i in chunk]
            width = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
            attn = torch.zeros((len(seqs), width), dtype=torch.long)
            rows, cols = [], []
            for b, (i, seq) in enumerate(zip(chunk, seqs, strict=True)):
                ids[b, : len(seq)] = torch.tensor(seq)
                attn[b, : len(seq)] = 1
                p, c = len(prompt_ids[i]), len(completion_ids[i])
                rows += [b] * c
                cols += range(p - 1, p + c - 1)  # logits at position t predict token t + 1
            targets = torch.tensor([t for i in chunk for t in completion_ids[i]], dtype=torch.long)
            logprobs_at = self._position_logprobs(ids.to(self.device), attn.to(self.device), rows, cols)
            tk_ids, tk_lp, chosen = [], [], []
            for s, lp in logprobs_at:
                if k:
                    v, t = lp.topk(k, dim=-1)
                    tk_ids.append(t.cpu())
                    tk_lp.append(v.cpu())
                chosen.append(lp.gather(1, targets[s : s + len(lp), None].to(lp.device))[:, 0].cpu())
            chosen_all = torch.cat(chosen).numpy() if chosen else np.zeros(0, np.float32)
            tk_ids_all = torch.cat(tk_ids).numpy() if k and tk_ids else None
            tk_lp_all = torch.cat(tk_lp).numpy() if k and tk_lp else None
            offset = 0
            for i in chunk:
                c = len(completion_ids[i])
                sl = slice(offset, offset + c)
                offset += c
                results[i] = Completion(
                    prompt_ids=list(prompt_ids[i]),
                    completion_ids=list(completion_ids[i]),
                    text=self.tokenizer.decode(completion_ids[i], skip_special_tokens=True),
                    finish_reason="reference",
                    sampled_logprob=chosen_all[sl].astype(np.float32),
                    topk_ids=tk_ids_all[sl].astype(np.int64) if tk_ids_all is not None else None,
                    topk_logprobs=tk_lp_all[sl].astype(np.float32) if tk_lp_all is not None else None,
                )
            if on_rows is not None:  # (tokens scored, rows done)
                on_rows(len(targets), len(chunk))
        return results  # type: ignore[return-value]

    def _position_logprobs(self, ids, attn, rows: list[int], cols: list[int], chunk: int = 2048):
        """Yield (offset, log-probs [n, V] float32) for the (row, col) positions, `chunk` at a time.

        The body runs once; the output head runs only where asked. Models whose logits are not just
        the head of the last hidden state (final soft-capping, logit scaling) take the full forward.
        """
        cfg = self.model.config
        base = getattr(self.model, self.model.base_model_prefix, None)
        head = self.model.get_output_embeddings()
        plain = base is not None and head is not None and not any(
            getattr(cfg, a, None) for a in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale")
        )
        r, c = torch.tensor(rows, dtype=torch.long), torch.tensor(cols, dtype=torch.long)
        if plain:
            hidden = base(input_ids=ids, attention_mask=attn).last_hidden_state[r, c]
            for s in range(0, len(rows), chunk):
                yield s, torch.log_softmax(head(hidden[s : s + chunk]).float(), dim=-1)
        else:
            logits = self.model(input_ids=ids, attention_mask=attn).logits[r, c]
            for s in range(0, len(rows), chunk):
                yield s, torch.log_softmax(logits[s : s + chunk].float(), dim=-1)

    def score(self, sequences: list[list[int]], k: int = 20, batch_size: int = 16) -> list[tuple[np.ndarray, np.ndarray]]:
        """Top-k (ids, log-probs) of the next token at every position but the last of each sequence
        ([L - 1, k] each): `score_ids` with the first token as the prompt."""
        outs = self.score_ids([s[:1] for s in sequences], [s[1:] for s in sequences], k, batch_size)
        return [(o.topk_ids, o.topk_logprobs) for o in outs]


SAMPLE_TOP = 64  # sampling candidates taken with the capture's top-k (see HFTeacher._sample)


def _sample_rows(probs: torch.Tensor, top_ids: torch.Tensor, r: torch.Tensor, top_p: float) -> torch.Tensor:
    """The slow path of `_sample` for the rows [S, V] that need it, each at its uniform draw `r` [S]:
    with top-p, the nucleus over the fully sorted vocabulary; else the CDF over the candidates
    [S, K] then over the rest of the vocabulary. One batched pass, no per-row Python."""
    if top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        kept = sorted_p.cumsum(-1) - sorted_p < top_p
        cdf = (sorted_p * kept).cumsum(-1)
        idx = torch.searchsorted(cdf, (r * cdf[:, -1])[:, None], right=True)[:, 0]
        return order.gather(1, torch.minimum(idx, kept.sum(-1) - 1)[:, None])[:, 0]
    cdf = probs.scatter(1, top_ids, 0.0).cumsum(-1)
    u = (r - probs.gather(1, top_ids).sum(-1)).clamp(min=0.0)
    idx = torch.searchsorted(cdf, u[:, None], right=True)[:, 0]
    return idx.clamp(max=cdf.shape[1] - 1)


def _prefill_groups(rows: list[int], lengths: list[int], budget: int) -> list[list[int]]:
    """Split rows (sorted by length) into prefill groups of at most `budget` padded tokens."""
    groups: list[list[int]] = []
    for row, length in zip(rows, lengths, strict=True):
        if groups and (len(groups[-1]) + 1) * length <= budget:
            groups[-1].append(row)
        else:
            groups.append([row])
    return groups


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
