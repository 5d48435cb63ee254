"""Distillation losses on a teacher's stored top-k, with an explicit tail bucket.

A capture keeps, per completion token, the teacher's top-k ids and log-probs plus the log of the
mass left over (the tail). Teacher and student are compared over the same k+1 buckets: the k
stored ids, and one bucket for "every other token". This is an exact partition of the
vocabulary, so every divergence below is a true divergence between two distributions (zero when
teacher == student), not a soft cross-entropy.

Temperature. Both sides are bucketed at T=1 first (b_j = p_j for a stored id, b_tail = the mass
of every other id), then the SAME map tempers each bucket distribution:
temper_T(b)_j = b_j^(1/T) / sum_i b_i^(1/T) (`temper_buckets`). So
- teacher == student gives the same buckets, hence exactly zero loss at every T and k;
- the divergence is zero only when the student's T=1 bucket masses equal the teacher's (tempering
  is a bijection of the simplex), so the minimiser does not move with T;
- k = V (empty tail) is Hinton's dense tempered KD, softmax(z/T) on both sides, exactly;
- within the stored ids the ratios are Hinton's (p_i/p_j)^(1/T); only the tail differs: dense
  tempering would weight it by sum_{j unstored} p_j^(1/T) (unknown from a capture; for T > 1 it
  is larger than tail^(1/T)), while here it is tempered as one token. Tempering the student over
  the full vocabulary and the teacher over buckets (the old code) mixed the two and was biased
  (a student equal to the teacher was ~2 nats/token off at T=4, and the fit at T=2 moved the
  student's T=1 tail mass from 0.44 to 0.002).

Shapes: N flattened completion positions, V vocabulary, k stored entries, B = k+1 buckets.
- student logits [N, V] (any float dtype; all maths runs in float32)
- topk_ids [N, k] int64, topk_logprobs [N, k], tail_logprob [N]
- bucket log-probs p (teacher), q (student) [N, B]; divergences return [N] per position.

Padding slots (a token kept fewer than k entries) have id 0 and log-prob -inf. A slot is "stored"
when its teacher log-prob is finite; every other slot is probability 0 on both sides and the
student's mass for its id stays in the tail bucket (id 0 may also be a real stored id).

Run the tests: `.venv/bin/python -m pytest -q tests/test_losses.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.checkpoint import checkpoint

NEG_INF = float("-inf")


# -- buckets ---------------------------------------------------------------------------------


def stored_slots(topk_logprobs: torch.Tensor) -> torch.Tensor:
    """[N, k] bool: slots that hold a real teacher entry (finite log-prob), i.e. not padding."""
    return topk_logprobs > NEG_INF


def student_bucket_logprobs(
    logits: torch.Tensor,
    topk_ids: torch.Tensor,
    temperature: float = 1.0,
    *,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Student log-probs over the k+1 buckets: [N, V] logits, [N, k] ids -> [N, k+1] float32.

    At T=1 bucket j < k is log_softmax(logits)[topk_ids[:, j]] and bucket k is the log of the mass
    of every id not stored, computed stably as logsumexp(rest) - logsumexp(all) (never
    log(1 - sum p)); then `temper_buckets(., T)`, as for the teacher (see the module docstring).
    `valid` [N, k] bool marks the stored slots (default: all; pass `stored_slots(topk_logprobs)`
    when the rows may hold padding): other slots get -inf and their ids stay in the tail. Stored
    ids within a row are assumed distinct. The tail is -inf when the stored ids cover the vocab.
    """
    z = logits.float()
    lse = torch.logsumexp(z, dim=-1, keepdim=True)
    if valid is None:
        valid = torch.ones_like(topk_ids, dtype=torch.bool)
    kept = torch.where(valid, z.gather(-1, topk_ids) - lse, NEG_INF)
    # Mark stored ids with a bool scatter: padding slots write into a spare column V that is
    # dropped, so a padding id 0 never hides a real id 0's mass (and no atomics are needed).
    with torch.no_grad():
        n, v = z.shape
        hit = torch.zeros(n, v + 1, dtype=torch.bool, device=z.device)
        hit.scatter_(-1, torch.where(valid, topk_ids, v), True)
        hit = hit[:, :v]
    rest = z.masked_fill(hit, NEG_INF)
    has_rest = rest.detach().amax(dim=-1, keepdim=True) > NEG_INF
    # logsumexp over an all--inf row is -inf but its gradient is NaN: feed such rows zeros instead.
    lse_rest = torch.logsumexp(torch.where(has_rest, rest, 0.0), dim=-1, keepdim=True)
    tail = torch.where(has_rest, lse_rest - lse, NEG_INF)
    return temper_buckets(torch.cat([kept, tail], dim=-1), temperature)


def temper_buckets(log_b: torch.Tensor, temperature: float) -> torch.Tensor:
    """Temper a bucket distribution: log_softmax(log_b / T), [.., B] -> [.., B]; -inf stays -inf.

    Applied to both sides' T=1 buckets, so teacher == student stays exactly zero at every T. log_b
    need not be normalised (it is renormalised here); at T=1 it is returned as given.
    """
    if temperature == 1.0:
        return log_b
    return torch.log_softmax(log_b / temperature, dim=-1)


def teacher_bucket_logprobs(
    topk_logprobs: torch.Tensor,
    tail_logprob: torch.Tensor,
    temperature: float = 1.0,
    *,
    vocab_size: int | None = None,
    tail_floor: float = 0.0,
) -> torch.Tensor:
    """Teacher log-probs over the k+1 buckets: [N, k] and [N] -> [N, k+1] float32.

    The result is log_softmax([topk_logprobs, tail_logprob] / T): renormalised over the buckets
    (stored entries + tail may miss one by quantisation error), and tempered by `temper_buckets`
    with the tail as ONE bucket, exactly as the student's buckets are. Dense tempering would
    need sum_i p_i^(1/T) over the unstored ids, unknown from a capture; see the module docstring
    for what this approximates. At T=1, or when the tail is empty, it is the dense distribution.

    With `vocab_size`, the tail is made consistent with the partition: -inf when the stored slots
    cover the whole vocab (the bucket is empty), and at least log(tail_floor) otherwise. A stored
    tail of exactly 0 (-inf) is a rounding artefact (softmax is never 0) that would make rkl
    infinite; the floor keeps it finite. Rows with no finite bucket give NaN: avoid them.
    """
    lp = topk_logprobs.float()
    tail = tail_logprob.float()
    if vocab_size is not None:
        has_rest = stored_slots(lp).sum(dim=-1) < vocab_size
        floor = math.log(tail_floor) if tail_floor > 0 else NEG_INF
        tail = torch.where(has_rest, tail.clamp_min(floor), NEG_INF)
    return temper_buckets(torch.log_softmax(torch.cat([lp, tail[..., None]], dim=-1), dim=-1), temperature)


# -- divergences on bucket log-probs: p teacher, q student, [N, B] -> [N] -----------------------


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) = sum a * (log a - log b), with 0 * log 0 = 0 and no NaN in values or gradients.

    Entries with a == 0 are replaced by zeros *before* the arithmetic (a torch.where after it would
    still send NaN gradients through -inf - -inf). a > 0 where b == 0 gives +inf, as it should.
    """
    live = log_a.exp() > 0
    a = torch.where(live, log_a, 0.0)
    b = torch.where(live, log_b, 0.0)
    return torch.where(live, a.exp() * (a - b), 0.0).sum(dim=-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b), elementwise, safe where both are 0 and for w in {0, 1}."""
    if w == 1.0:
        return log_a
    if w == 0.0:
        return log_b
    live = (log_a > NEG_INF) | (log_b > NEG_INF)
    a = torch.where(live, log_a, 0.0) + math.log(w)
    b = torch.where(live, log_b, 0.0) + math.log1p(-w)
    return torch.where(live, torch.logaddexp(a, b), NEG_INF)


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def forward_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(p || q): mean-seeking; the student must cover every bucket the teacher uses."""
    return _kl(p, q)


def reverse_kl(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """KL(q || p): mode-seeking; the student is punished for mass where the teacher has little."""
    return _kl(q, p)


def jsd(p: torch.Tensor, q: torch.Tensor, beta: float = 0.5) -> torch.Tensor:
    """Generalised JSD as in GKD/TRL: beta * KL(p || m) + (1 - beta) * KL(q || m), m = beta p + (1-beta) q.

    The formula itself tends to 0 at both ends (m -> q as beta -> 0, m -> p as beta -> 1), but
    jsd / beta -> KL(p||q) and jsd / (1 - beta) -> KL(q||p). Following TRL, beta = 0 therefore
    *means* forward KL and beta = 1 reverse KL (a jump in scale at the end points, not a limit).
    beta = 0.5 is the symmetric JSD, bounded by log 2.
    """
    _check_unit("beta", beta)
    if beta == 0.0:
        return forward_kl(p, q)
    if beta == 1.0:
        return reverse_kl(p, q)
    m = _log_mix(p, q, beta)
    return beta * _kl(p, m) + (1.0 - beta) * _kl(q, m)


def skew_kl(p: torch.Tensor, q: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew KL (DistiLLM): KL(p || alpha p + (1 - alpha) q). alpha = 0 is forward KL, 1 is zero."""
    _check_unit("alpha", alpha)
    return _kl(p, _log_mix(p, q, alpha))


def skew_rkl(p: torch.Tensor, q: torch.Tensor, alpha: float = 0.1) -> torch.Tensor:
    """Skew reverse KL (DistiLLM): KL(q || (1 - alpha) p + alpha q). alpha = 0 is reverse KL, 1 is zero."""
    _check_unit("alpha", alpha)
    return _kl(q, _log_mix(p, q, 1.0 - alpha))


def tvd(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Total variation distance 0.5 * sum |p - q|, in [0, 1]."""
    return 0.5 * (p.exp() - q.exp()).abs().sum(dim=-1)


def ce_loss(logits: torch.Tensor, target_ids: torch.Tensor) -> torch.Tensor:
    """Hard-label cross-entropy per position: [N, V] logits, [N] ids -> [N] float32 (no temperature).

    Equals F.cross_entropy(logits.float(), target_ids, reduction="none"), written as
    logsumexp - gathered logit so no [N, V] log-softmax is kept for backward. Mask with `mask`
    in `distill_loss`, not with an ignore index.
    """
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - z.gather(-1, target_ids[:, None]).squeeze(-1)


#: Loss kinds -> per-position functions. "ce" takes (logits, target_ids); the others take bucket
#: log-probs (p, q) and, for jsd / skl / srkl, their beta / alpha. `divergence` dispatches by config.
LOSSES: dict[str, Callable[..., torch.Tensor]] = {
    "ce": ce_loss,
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "jsd": jsd,
    "skl": skew_kl,
    "srkl": skew_rkl,
    "tvd": tvd,
}


@dataclass
class LossConfig:
    """What `distill_loss` computes."""

    kind: str = "fkl"
    """One of LOSSES: ce, fkl, rkl, jsd, skl, srkl, tvd."""
    temperature: float = 1.0
    """Tempers both sides' T=1 bucket distributions the same way for the KD term (CE always uses T=1)."""
    beta: float = 0.5
    """jsd interpolation in [0, 1]; 0 = forward KL, 1 = reverse KL (TRL convention)."""
    alpha: float = 0.1
    """skl / srkl skew in [0, 1); 0 = plain fkl / rkl."""
    ce_weight: float = 0.0
    """loss = (1 - ce_weight) * KD + ce_weight * CE, in [0, 1]; ignored for kind "ce"."""
    scale_t2: bool = True
    """Multiply the KD term by T^2 (Hinton) so its gradient scale does not shrink with T."""
    tail_floor: float = 1e-6
    """Smallest teacher tail probability when the tail bucket is non-empty (0 = no floor)."""

    def __post_init__(self) -> None:
        if self.kind not in LOSSES:
            raise ValueError(f"loss kind must be one of {', '.join(LOSSES)}; got {self.kind!r}")
        if not (math.isfinite(self.temperature) and self.temperature > 0):
            raise ValueError(f"temperature must be a finite number > 0, got {self.temperature!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta (jsd) must be in [0, 1], got {self.beta!r}")
        if not 0.0 <= self.alpha < 1.0:
            raise ValueError(
                f"alpha (skl/srkl) must be in [0, 1) (alpha=1 makes the loss identically 0), got {self.alpha!r}"
            )
        if not 0.0 <= self.ce_weight <= 1.0:
            raise ValueError(f"ce_weight must be in [0, 1], got {self.ce_weight!r}")
        if not isinstance(self.scale_t2, bool):
            raise ValueError(f"scale_t2 must be a bool, got {self.scale_t2!r}")
        if not 0.0 <= self.tail_floor < 1.0:
            raise ValueError(f"tail_floor must be in [0, 1), got {self.tail_floor!r}")


def divergence(p: torch.Tensor, q: torch.Tensor, cfg: LossConfig) -> torch.Tensor:
    """The KD divergence cfg.kind on bucket log-probs [N, B] -> [N] (no T^2 scaling here)."""
    if cfg.kind == "ce":
        raise ValueError('kind "ce" is not a divergence between bucket distributions')
    if cfg.kind == "jsd":
        return jsd(p, q, cfg.beta)
    if cfg.kind in ("skl", "srkl"):
        return LOSSES[cfg.kind](p, q, cfg.alpha)
    return LOSSES[cfg.kind](p, q)


# -- the training loss ----------------------------------------------------------------------------


def _chunk_sums(logits, sel, target_ids, topk_ids, topk_logprobs, tail_logprob, cfg: LossConfig):
    """(loss sum with grad, kd sum, ce sum) over the positions `sel` (a slice or an index tensor)."""
    z = logits[sel].float()  # one float32 copy shared by the KD and CE terms
    target_ids = target_ids[sel]
    if topk_ids is None or cfg.kind == "ce":
        ce = ce_loss(z, target_ids).sum()
        return ce, torch.zeros_like(ce), ce.detach()
    topk_ids, topk_logprobs, tail_logprob = topk_ids[sel], topk_logprobs[sel], tail_logprob[sel]
    w = cfg.ce_weight
    with torch.set_grad_enabled(torch.is_grad_enabled() and w < 1.0):
        t = cfg.temperature
        q = student_bucket_logprobs(z, topk_ids, t, valid=stored_slots(topk_logprobs))
        p = teacher_bucket_logprobs(
            topk_logprobs, tail_logprob, t, vocab_size=z.shape[-1], tail_floor=cfg.tail_floor
        )
        kd = divergence(p, q, cfg)
        if cfg.scale_t2:
            kd = kd * (t * t)
    with torch.set_grad_enabled(torch.is_grad_enabled() and w > 0.0):
        ce = ce_loss(z, target_ids)  # always computed: it is logged even when not trained on
    # a term with weight 0 is left out, not multiplied by 0 (0 * inf would be NaN)
    loss = kd if w == 0.0 else ce if w == 1.0 else (1.0 - w) * kd + w * ce
    return loss.sum(), kd.detach().sum(), ce.detach().sum()


def distill_loss(
    logits: torch.Tensor,
    target_ids: torch.Tensor,
    topk_ids: torch.Tensor | None,
    topk_logprobs: torch.Tensor | None,
    tail_logprob: torch.Tensor | None,
    cfg: LossConfig,
    mask: torch.Tensor | None = None,
    chunk_size: int | None = None,
) -> dict:
    """Summed distillation loss over the (unmasked) positions.

    logits [N, V] (any float dtype), target_ids [N] (the completion tokens), topk_ids [N, k],
    topk_logprobs [N, k], tail_logprob [N] (all three None for a text-only capture: CE only),
    mask [N] bool (False = leave the position out).

    chunk_size: positions per chunk; the result is the same. Each chunk runs under activation
    checkpointing when gradients are on, so the [chunk, V] float32 temporaries (about three of
    them) exist for one chunk at a time, in forward and again in backward, instead of being
    kept for all N positions until backward. Costs one extra loss forward per chunk.

    Returns {"loss_sum": scalar float32 tensor with grad, "count": int (positions counted),
    "kd_sum": float, "ce_sum": float}. kd_sum (after T^2) and ce_sum are unweighted, for
    logging; loss_sum = sum((1 - ce_weight) * kd + ce_weight * ce), or sum(ce) for CE only.
    Sums, not means: divide by the unmasked count of the whole accumulated step.
    """
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")
    n = logits.shape[0]
    if target_ids.shape != (n,):
        raise ValueError(f"target_ids must be [N]={n}, got shape {tuple(target_ids.shape)}")
    if topk_ids is not None:
        if topk_logprobs is None or tail_logprob is None:
            raise ValueError("topk_ids needs topk_logprobs and tail_logprob")
        if topk_ids.ndim != 2 or topk_ids.shape[0] != n or topk_logprobs.shape != topk_ids.shape:
            raise ValueError(
                f"topk_ids/topk_logprobs must both be [N={n}, k], got "
                f"{tuple(topk_ids.shape)} and {tuple(topk_logprobs.shape)}"
            )
        if tail_logprob.shape != (n,):
            raise ValueError(f"tail_logprob must be [N]={n}, got shape {tuple(tail_logprob.shape)}")
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 or None, got {chunk_size!r}")
    rows = None
    if mask is not None:
        if mask.shape != (n,) or mask.dtype != torch.bool:
            raise ValueError(f"mask must be a bool [N]={n} tensor, got {mask.dtype} {tuple(mask.shape)}")
        rows = mask.nonzero().squeeze(-1)
    count = n if rows is None else int(rows.numel())

    loss_sum = None
    kd_sum = ce_sum = torch.zeros((), device=logits.device)
    step = chunk_size or max(count, 1)
    recompute = chunk_size is not None and torch.is_grad_enabled() and logits.requires_grad
    for s in range(0, count, step):
        sel = slice(s, s + step) if rows is None else rows[s : s + step]
        args = (logits, sel, target_ids, topk_ids, topk_logprobs, tail_logprob, cfg)
        if recompute:
            loss, kd, ce = checkpoint(_chunk_sums, *args, use_reentrant=False)
        else:
            loss, kd, ce = _chunk_sums(*args)
        loss_sum = loss if loss_sum is None else loss_sum + loss
        kd_sum, ce_sum = kd_sum + kd, ce_sum + ce
    if loss_sum is None:  # nothing to learn from: a zero that still backpropagates
        loss_sum = logits.float().sum() * 0.0
    return {"loss_sum": loss_sum, "count": count, "kd_sum": float(kd_sum), "ce_sum": float(ce_sum)}
