"""Capture rows -> training examples -> batches (padded, or packed) with the teacher's top-k per completion token.

An example is prompt_ids + completion_ids (truncated to max_seq_len). Only completion tokens are
learned (and of those, where a capture stores a `role_mask`, only the model-written ones): the student's logits at position p-1 are compared with the teacher's top-k for the token
at position p. Batches carry those positions flattened, so the loss sees [N, V] logits and [N, k]
teacher entries, and the prompt never enters the loss.

`collate` gives one padded row per example; `collate_packed` puts several examples in one row
(first-fit, longest first, rows no longer than the longest example) with position ids that restart at
each example, so transformers' masks keep them apart (block-diagonal causal attention): the same
logits at the learned positions, without computing padding (about half of a random batch's tokens).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class Example:
    input_ids: np.ndarray  # [L] int64
    prompt_len: int
    topk_ids: np.ndarray | None  # [T, k] int64 for the kept completion tokens
    topk_logprobs: np.ndarray | None  # [T, k] float32
    tail_logprob: np.ndarray | None  # [T] float32
    loss_mask: np.ndarray | None = None  # [T] bool: which completion tokens are learned (None: all)


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, L]
    attention_mask: torch.Tensor  # [B, L]
    rows: torch.Tensor  # [N] batch index of each learned position
    cols: torch.Tensor  # [N] position whose logits predict the target
    targets: torch.Tensor  # [N] completion token ids
    topk_ids: torch.Tensor | None  # [N, k]
    topk_logprobs: torch.Tensor | None  # [N, k]
    tail_logprob: torch.Tensor | None  # [N]
    position_ids: torch.Tensor | None = None  # [B, L] packed rows only (then attention_mask only marks real tokens)

    @property
    def n_targets(self) -> int:
        return int(self.targets.numel())


def examples_from_capture(capture, split: str | None = "train", max_seq_len: int = 512) -> list[Example]:
    """Read a capture's rows of one split into examples (rows with no completion are skipped)."""
    out = []
    for row in capture.rows(split=split):
        prompt = np.asarray(row["prompt_ids"], dtype=np.int64)
        completion = np.asarray(row["completion_ids"], dtype=np.int64)
        if len(completion) == 0 or len(prompt) >= max_seq_len:
            continue
        keep = min(len(completion), max_seq_len - len(prompt))
        topk = row.get("topk")
        mask = row.get("role_mask")  # agent captures: 1 = written by the model, 0 = tool output / template
        out.append(
            Example(
                input_ids=np.concatenate([prompt, completion[:keep]]),
                prompt_len=len(prompt),
                topk_ids=None if topk is None else topk.ids[:keep],
                topk_logprobs=None if topk is None else topk.logprobs[:keep],
                tail_logprob=None if topk is None else topk.tail_logprob[:keep],
                loss_mask=None if mask is None else np.asarray(mask[:keep], dtype=bool),
            )
        )
    return out


def collate(examples: list[Example], pad_id: int) -> Batch:
    """One row per example, padded to the longest."""
    return _batch(examples, pad_id, [(b, 0) for b in range(len(examples))], max(len(e.input_ids) for e in examples))


def collate_packed(examples: list[Example], pad_id: int) -> Batch:
    """Examples packed into as few rows as first-fit (longest first) gives, each row at most as long as the
    longest example; the learned positions (and their top-k) stay in the examples' order, as in `collate`."""
    lengths = [len(e.input_ids) for e in examples]
    capacity = max(lengths)
    fills: list[int] = []
    place: list[tuple[int, int]] = [(0, 0)] * len(examples)
    for i in sorted(range(len(examples)), key=lambda j: -lengths[j]):
        row = next((r for r, f in enumerate(fills) if f + lengths[i] <= capacity), len(fills))
        if row == len(fills):
            fills.append(0)
        place[i] = (row, fills[row])
        fills[row] += lengths[i]
    return _batch(examples, pad_id, place, max(fills), packed=True)


def _batch(examples: list[Example], pad_id: int, place: list[tuple[int, int]], width: int,
           packed: bool = False) -> Batch:
    n = max(r for r, _ in place) + 1
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    mask = torch.zeros((n, width), dtype=torch.long)
    positions = torch.zeros((n, width), dtype=torch.long) if packed else None
    ends = [0] * n
    rows, cols, targets = [], [], []
    for e, (b, at) in zip(examples, place, strict=True):
        length = len(e.input_ids)
        input_ids[b, at : at + length] = torch.from_numpy(e.input_ids)
        mask[b, at : at + length] = 1
        if packed:  # positions restart at each example
            positions[b, at : at + length] = torch.arange(length)
            ends[b] = max(ends[b], at + length)
        learned = np.arange(length - e.prompt_len) if e.loss_mask is None else np.flatnonzero(e.loss_mask)
        rows.append(torch.full((len(learned),), b, dtype=torch.long))
        cols.append(torch.from_numpy(at + e.prompt_len - 1 + learned))
        targets.append(torch.from_numpy(e.input_ids[e.prompt_len + learned]))
    if packed:  # a row's padding is one more "sequence" of its own (its positions restart at 0 too)
        for b, end in enumerate(ends):
            positions[b, end:] = torch.arange(width - end)
    has_topk = all(e.topk_ids is not None for e in examples)
    if has_topk:
        k = max(e.topk_ids.shape[1] for e in examples)
        ids = np.concatenate([_pad_k(_learned(e, e.topk_ids), k, 0) for e in examples])
        lps = np.concatenate([_pad_k(_learned(e, e.topk_logprobs), k, -np.inf) for e in examples])
        tails = np.concatenate([_learned(e, e.tail_logprob) for e in examples])
    return Batch(
        input_ids=input_ids,
        attention_mask=mask,
        rows=torch.cat(rows),
        cols=torch.cat(cols),
        targets=torch.cat(targets),
        topk_ids=torch.from_numpy(ids) if has_topk else None,
        topk_logprobs=torch.from_numpy(lps.astype(np.float32)) if has_topk else None,
        tail_logprob=torch.from_numpy(tails.astype(np.float32)) if has_topk else None,
        position_ids=positions,
    )


def _learned(e: Example, a: np.ndarray) -> np.ndarray:
    return a if e.loss_mask is None else a[e.loss_mask]


def _pad_k(a: np.ndarray, k: int, fill) -> np.ndarray:
    if a.shape[1] == k:
        return a
    out = np.full((a.shape[0], k), fill, dtype=a.dtype)
    out[:, : a.shape[1]] = a
    return out


def batch_order(n_examples: int, batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Deterministic shuffled batches for one epoch (same seed + epoch -> same batches, so resume is exact)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    perm = torch.randperm(n_examples, generator=g).tolist()
    return [perm[i : i + batch_size] for i in range(0, n_examples, batch_size)]


def micro_batches(n_examples: int, batch_size: int, seed: int):
    """Endless stream of (epoch, index list) micro-batches, epoch after epoch."""
    epoch = 0
    while True:
        for idx in batch_order(n_examples, batch_size, seed, epoch):
            yield epoch, idx
        epoch += 1


def student_logits(model, batch: Batch, with_aux: bool = False):
    """Logits [N, V] at the learned positions only (the LM head runs on those rows alone).

    with_aux=True returns (logits, aux): aux is a mixture-of-experts student's router load-balancing
    loss (a scalar, students/moe.py), None for a dense student.
    """
    inner = getattr(model, "model", None)
    head = getattr(model, "lm_head", None)
    # MoE students (students/moe.py): ask for the router logits to build the load-balancing loss
    moe = with_aux and getattr(model.config, "router_aux_loss_coef", None) is not None
    extra = {"output_router_logits": True} if moe else {}
    positions = getattr(batch, "position_ids", None)
    if positions is not None:  # packed rows: the positions keep the examples apart (no cache, no 2-D mask)
        extra.update(position_ids=positions, use_cache=False)
    mask = batch.attention_mask if positions is None else None
    if inner is not None and head is not None:
        out = inner(input_ids=batch.input_ids, attention_mask=mask, **extra)
        logits = head(out.last_hidden_state[batch.rows, batch.cols])
    else:
        out = model(input_ids=batch.input_ids, attention_mask=mask, **extra)
        logits = out.logits[batch.rows, batch.cols]
    if not with_aux:
        return logits
    if not moe:
        return logits, None
    import sys

    balance = sys.modules[type(model).__module__].load_balancing_loss_func  # Mixtral/Qwen2-MoE/OLMoE all have one
    cfg = model.config
    n_experts = getattr(cfg, "num_local_experts", None) or cfg.num_experts
    aux = balance(out.router_logits, n_experts, cfg.num_experts_per_tok, batch.attention_mask)
    return logits, aux
