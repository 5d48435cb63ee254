"""Cross-tokenizer distillation losses: pure functions on a teacher's stored top-k from ANOTHER vocabulary.

When teacher and student tokenizers differ, a teacher id means nothing to the student's logits,
so the bucket losses of losses.py do not apply. Two terms work without a shared vocabulary; both
are computed at positions where the two tokenizations share a boundary (train/xtok.py aligns
them), so teacher and student predict the next token after the same text:

- `uld_loss`: Universal Logit Distillation (Boizard, El Haddad, Hudelot, Colombo, "Towards
  Cross-Tokenizer Distillation: the Universal Logit Distillation Loss for LLMs", arXiv:2402.12030,
  2024; TMLR 2025). ULD is the closed-form
  Wasserstein-1 distance between the two next-token distributions under a cost that ignores
  which token is which: the L1 distance between the probability vectors sorted in decreasing
  order (zero-padded to the same length). A capture keeps only the teacher's top-k plus the tail
  mass, so the tail is handled explicitly: with n the teacher's stored entries at a position,

      uld = sum_{r < n} |p_(r) - q_(r)| + |sum_{r >= n} p_(r) - sum_{r >= n} q_(r)|

  p_(r), q_(r) the r-th largest teacher / student probabilities. The first sum is exact ULD on
  the ranks the teacher stored; the second compares the tail masses as one bucket. By the
  triangle inequality it is a lower bound of the full-vocabulary ULD, equal to it when the
  teacher's tail is empty (all entries stored) -- `tests/test_xtok.py` checks both against a
  dense reference. It is 0 iff the sorted heads and the tail masses agree; values lie in [0, 2].
- `mapped_kl`: an exact-vocabulary term on the teacher's top-k entries whose token string is
  also ONE student token (`mapped_ids`, built in xtok.py from the two vocabularies' bytes). The
  vocabulary is partitioned into those mapped tokens plus one "other" bucket, on each side, and
  the loss is the forward KL between the two bucket distributions (the same bucket machinery as
  losses.py; 0 when the student puts the teacher's probability on every mapped string).

Shapes: A aligned positions, V student vocabulary, k stored teacher entries.
- logits [A, V] student logits (any float dtype; maths in float32)
- t_logprobs [A, k] teacher top-k log-probs, -inf for padding slots; t_tail [A] teacher tail log-prob
- mapped_ids [A, k] int64: the student id spelling the same bytes as each teacher entry, -1 when none
- each function returns [A] float32.

`xtok_loss` sums them over a batch and mixes in the student's CE on its own tokenization.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from potstill.train.losses import (
    NEG_INF,
    ce_loss,
    forward_kl,
    stored_slots,
    student_bucket_logprobs,
    teacher_bucket_logprobs,
)

#: Cross-tokenizer loss kinds (`--loss`): ULD alone, or ULD + the exact-vocabulary KL on mapped tokens.
XTOK_LOSSES = ("uld", "uld_kl")


@dataclass
class XtokLossConfig:
    """What `xtok_loss` computes (saved in the student's provenance)."""

    kind: str = "uld"
    """uld: ULD on aligned positions; uld_kl: ULD + mapped_kl on the same positions."""
    temperature: float = 1.0
    """Softens both sides before ULD / mapped KL (CE always at T=1); the KL term is scaled by T^2."""
    ce_weight: float = 0.5
    """loss = (1 - ce_weight) * KD + ce_weight * CE over the student's own tokens, in [0, 1]."""
    text_only: bool = False
    """The capture has no top-k (text-only teacher): CE on the student's tokenization only."""

    def __post_init__(self) -> None:
        if self.kind not in XTOK_LOSSES:
            raise ValueError(f"cross-tokenizer loss must be one of {', '.join(XTOK_LOSSES)}; got {self.kind!r}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature!r}")
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {self.ce_weight!r}")


def uld_loss(logits: torch.Tensor, t_logprobs: torch.Tensor, t_tail: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """ULD with an explicit tail bucket: [A, V], [A, k], [A] -> [A] (see the module docstring)."""
    k = t_logprobs.shape[-1]
    # renormalised over stored entries + tail (quantisation can leave them off one by a little)
    p = teacher_bucket_logprobs(t_logprobs, t_tail, temperature).exp()
    p_head = p[:, :k].sort(dim=-1, descending=True).values  # padding (p = 0) sorts last
    n = stored_slots(t_logprobs).sum(dim=-1, keepdim=True)  # [A, 1] stored entries per row
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    kk = min(k, z.shape[-1])
    q_head = torch.softmax(z, dim=-1).topk(kk, dim=-1).values
    if kk < k:  # a student vocab smaller than k: its missing ranks have probability 0
        q_head = F.pad(q_head, (0, k - kk))
    live = torch.arange(k, device=z.device)[None, :] < n
    head = torch.where(live, (p_head - q_head).abs(), 0.0).sum(dim=-1)
    t_rest = 1.0 - torch.where(live, p_head, 0.0).sum(dim=-1)
    s_rest = 1.0 - torch.where(live, q_head, 0.0).sum(dim=-1)
    return head + (t_rest - s_rest).abs()


def mapped_kl(
    logits: torch.Tensor,
    t_logprobs: torch.Tensor,
    t_tail: torch.Tensor,
    mapped_ids: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher || student) over {mapped tokens} + {other}: [A, V], [A, k], [A], [A, k] -> [A]."""
    k = t_logprobs.shape[-1]
    p = teacher_bucket_logprobs(t_logprobs, t_tail, temperature)  # [A, k+1]
    live = (mapped_ids >= 0) & stored_slots(t_logprobs)
    p_mapped = torch.where(live, p[:, :k], NEG_INF)
    # teacher "other" = its unmapped stored entries + its tail; all -inf gives -inf (no grad on the teacher)
    p_other = torch.logsumexp(torch.cat([torch.where(live, NEG_INF, p[:, :k]), p[:, k:]], dim=-1), dim=-1)
    p_buckets = torch.cat([p_mapped, p_other[:, None]], dim=-1)
    q_buckets = student_bucket_logprobs(logits, mapped_ids.clamp_min(0), temperature, valid=live)
    return forward_kl(p_buckets, q_buckets)


def xtok_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    kd_pos: torch.Tensor,
    t_logprobs: torch.Tensor | None,
    t_tail: torch.Tensor | None,
    mapped_ids: torch.Tensor | None,
    cfg: XtokLossConfig,
) -> dict:
    """Summed cross-tokenizer loss over a batch.

    logits [N, V] at the student's learned positions, target_ids [N] (the student's tokens of the
    teacher's text), kd_pos [A] rows of `logits` aligned with a teacher position, t_logprobs [A, k],
    t_tail [A], mapped_ids [A, k] (the three None for a text-only capture).

    Returns {"loss_sum", "count" (N), "kd_sum", "ce_sum", "aligned" (A)} like `distill_loss`:
    loss_sum = ce_weight * sum_N CE + (1 - ce_weight) * sum_A KD; divide by the step's N.
    """
    n = logits.shape[0]
    if target_ids.shape != (n,):
        raise ValueError(f"target_ids must be [N]={n}, got {tuple(target_ids.shape)}")
    z = logits.float()
    ce = ce_loss(z, target_ids)
    if cfg.text_only or t_logprobs is None:  # nothing to distil from: CE only
        return {"loss_sum": ce.sum(), "count": n, "kd_sum": 0.0, "ce_sum": float(ce.detach().sum()), "aligned": 0}
    w = cfg.ce_weight
    a = int(kd_pos.numel())
    kd = z.sum() * 0.0  # keeps the graph when no position is aligned
    if a:
        za = z[kd_pos]
        per = uld_loss(za, t_logprobs, t_tail, cfg.temperature)
        if cfg.kind == "uld_kl":
            per = per + mapped_kl(za, t_logprobs, t_tail, mapped_ids, cfg.temperature) * cfg.temperature**2
        kd = per.sum()
    loss = (1.0 - w) * kd + w * ce.sum()
    return {"loss_sum": loss, "count": n, "kd_sum": float(kd.detach()), "ce_sum": float(ce.detach().sum()), "aligned": a}
