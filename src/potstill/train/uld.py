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
  losses.py; 0 when the student puts the teacher's probability on every mapped string). The map
  is not injective (SentencePiece "▁the" / "the" can both spell the student's "the"): teacher
  entries of a row that map to one student id are merged into one bucket (`merge_mapped`).

Temperature: as in losses.py, each side is bucketed at T=1 and the bucket distributions are then
tempered the same way, so equal buckets give 0 at any T.

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
    temper_buckets,
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
    """ULD with an explicit tail bucket: [A, V], [A, k], [A] -> [A] (see the module docstring).

    Each side is bucketed at T=1 (the teacher's n stored entries + tail; the student's n largest
    probabilities + the rest) and both bucket distributions are tempered the same way
    (`temper_buckets`), so a student whose sorted head and tail equal the teacher's is at 0 for any T.
    """
    k = t_logprobs.shape[-1]
    # renormalised over stored entries + tail (quantisation can leave them off one by a little)
    p = teacher_bucket_logprobs(t_logprobs, t_tail, temperature).exp()
    p_head = p[:, :k].sort(dim=-1, descending=True).values  # padding (p = 0) sorts last
    n = stored_slots(t_logprobs).sum(dim=-1, keepdim=True)  # [A, 1] stored entries per row
    z = logits.float()
    kk = min(k, z.shape[-1])
    top = z.detach().topk(kk, dim=-1).indices
    if kk < k:  # a student vocab smaller than k: its missing ranks have probability 0
        top = F.pad(top, (0, k - kk))
    live = torch.arange(k, device=z.device)[None, :] < n
    valid = live & (torch.arange(k, device=z.device)[None, :] < kk)
    q = student_bucket_logprobs(z, top, temperature, valid=valid).exp()  # [A, k+1]: ranks < n + the rest
    head = torch.where(live, (p_head - q[:, :k]).abs(), 0.0).sum(dim=-1)
    return head + (p[:, k] - q[:, k]).abs()


def merge_mapped(
    t_bucket_logprobs: torch.Tensor, mapped_ids: torch.Tensor, live: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge teacher entries that map to the same student id: [A, k] log-probs, ids, live -> (log-probs, first).

    A vocabulary map is not injective ("▁the" and "the", "<0x0A>" and "\n" can spell the same
    bytes), so one student id may stand for several teacher entries of a row. The first such slot
    gets the log of their summed mass and is the only one kept (`first`, [A, k] bool); the others
    become -inf and are left out on the student side too, so the student's mass for the id is
    counted once.
    """
    k = mapped_ids.shape[-1]
    same = (mapped_ids[:, :, None] == mapped_ids[:, None, :]) & live[:, :, None] & live[:, None, :]
    earlier = torch.ones(k, k, dtype=torch.bool, device=mapped_ids.device).tril(-1)  # [i, j]: j < i
    first = live & ~(same & earlier).any(dim=-1)
    merged = torch.logsumexp(torch.where(same, t_bucket_logprobs[:, None, :], NEG_INF), dim=-1)
    return torch.where(first, merged, NEG_INF), first


def mapped_kl(
    logits: torch.Tensor,
    t_logprobs: torch.Tensor,
    t_tail: torch.Tensor,
    mapped_ids: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher || student) over {mapped tokens} + {other}: [A, V], [A, k], [A], [A, k] -> [A].

    Teacher entries mapping to the same student id are merged first (`merge_mapped`). Both sides are
    bucketed at T=1 and then tempered the same way (`temper_buckets`).
    """
    k = t_logprobs.shape[-1]
    p = teacher_bucket_logprobs(t_logprobs, t_tail)  # [A, k+1] at T=1
    live = (mapped_ids >= 0) & stored_slots(t_logprobs)
    p_mapped, first = merge_mapped(p[:, :k], mapped_ids, live)
    # teacher "other" = its unmapped stored entries + its tail; all -inf gives -inf (no grad on the teacher)
    p_other = torch.logsumexp(torch.cat([torch.where(live, NEG_INF, p[:, :k]), p[:, k:]], dim=-1), dim=-1)
    p_buckets = temper_buckets(torch.cat([p_mapped, p_other[:, None]], dim=-1), temperature)
    q_buckets = student_bucket_logprobs(logits, mapped_ids.clamp_min(0), temperature, valid=first)
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
    loss = ce.sum() if w == 1.0 else (1.0 - w) * kd + w * ce.sum()  # weight 0: left out (0 * inf is NaN)
    return {"loss_sum": loss, "count": n, "kd_sum": float(kd.detach()), "ce_sum": float(ce.detach().sum()), "aligned": a}
