"""The batched decode and teacher-forcing engine over a local causal LM, whatever role the model plays.

`Engine(model, tokenizer)` decodes tokenised prompts with a KV cache written in place (kvslab.py):
batched with left padding, rows that finish leave the batch and waiting prompts take their slots,
prompts that start alike share one prefill of the common part (decode.py). Each row samples from
its own generator (sampling.py), seeded from the run seed and the row's id, so a completion does
not depend on which batch it landed in. `score_ids` teacher-forces given completions at prefill
speed. Teachers (`teachers/hf.py`), evaluation, on-policy sampling, detection and the server all
decode through it.

    engine = Engine(model, tokenizer)
    out = engine.complete_ids([tokenizer.encode("Hi")], SamplingParams(max_new_tokens=16))
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import numpy as np
import torch

from potstill.errors import PotstillError
from potstill.lm.attention import use_decode_attention
from potstill.lm.decode import DecodeRun, Feed
from potstill.lm.kvslab import available_memory, kv_bytes_per_token, rows_that_fit, sliding_window
from potstill.lm.tokens import chat_ids, pad_token_id
from potstill.lm.types import Completion, LogitsProcessor, SamplingParams

log = logging.getLogger(__name__)


class Engine:
    """A local causal LM that decodes and teacher-forces token ids in batches, with top-k log-probs."""

    def __init__(self, model, tokenizer, name: str = "model"):
        self.model = model.eval()
        use_decode_attention(model)  # CPU: single-query attention as matmuls (see attention.py)
        self.tokenizer = tokenizer
        self.name = name
        self.device = next(model.parameters()).device
        self.eos_ids = self._eos_ids()
        self.pad_id = pad_token_id(tokenizer, fallback=self.eos_ids[0])
        self._kv_token_bytes: int | None = None
        self.sliding_window = sliding_window(model)
        self.quantized: dict | None = None  # int8's record once lm/quantize.py has quantised the model

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

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return chat_ids(self.tokenizer, messages)

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
        feed: Feed | None = None,
        on_done: Callable[[int, Completion], None] | None = None,
        report_processor: LogitsProcessor | None = None,
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
        as row i finishes. The returned list holds every row, fed ones included. With `report_processor`,
        the log-probs recorded (sampled token's and top-k) are those of `report_processor(contexts, raw
        logits)` rather than of the distribution sampled from (a watermark's served-log-prob policy).
        """
        if not prompt_ids:
            return []
        run = DecodeRun(self, prompt_ids, params, seeds, logits_processor, on_token, include_eos, row_params, feed, on_done,
                        report_processor)
        return run.run(batch_size, prefill_tokens, share_prefix, memory)

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
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache() if self.sliding_window else None  # a window would crop a long prefix's keys
        out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=cache, use_cache=True,
                         logits_to_keep=1)
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
        cache = DynamicCache() if self.sliding_window else None  # full layers: the slab masks the window
        if prefix:
            b = len(prompts)
            cache = DynamicCache(ddp_cache_data=[(k.expand(b, -1, -1, -1), v.expand(b, -1, -1, -1))
                                                 for k, v in prefix[1]])
        out = self.model(input_ids=ids, attention_mask=attn, position_ids=pos, cache=cache, use_cache=True,
                         logits_to_keep=1)
        return out.cache, attn, out.logits[:, -1, :]

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
        for chunk, logprobs_at in self.forced_logprobs(prompt_ids, completion_ids, batch_size, max_batch_tokens):
            targets = torch.tensor([t for i in chunk for t in completion_ids[i]], dtype=torch.long)
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

    def forced_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]], batch_size: int = 16,
                        max_batch_tokens: int = 8192):
        """Teacher forcing's batches: yield (the row indices of a batch, an iterator of (offset, log-probs
        [n, V] float32) over their completion positions, row after row). Rows are length-sorted and
        right-padded into batches of at most `batch_size` rows and `max_batch_tokens` padded tokens."""
        n = len(prompt_ids)
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
            yield chunk, self._position_logprobs(ids.to(self.device), attn.to(self.device), rows, cols)

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


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0
