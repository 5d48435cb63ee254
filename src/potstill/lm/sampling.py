"""Sampling one token per row: inverse-CDF over the sorted candidates, each row from its own generator.

Exact for any temperature and top-p; a row's draw does not depend on its batch-mates.
"""

from __future__ import annotations

import numpy as np
import torch

from potstill.lm.types import SamplingParams

SAMPLE_TOP = 64  # sampling candidates taken with the capture's top-k (see `sample`)


def sample(logits, logprobs, params: SamplingParams, gens: list[np.random.Generator], top=None) -> torch.Tensor:
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
        out[rows] = sample_rows(scaled_lp[rows].exp(), top_ids[rows], r[rows], params.top_p)
    return out


def sample_rows(probs: torch.Tensor, top_ids: torch.Tensor, r: torch.Tensor, top_p: float) -> torch.Tensor:
    """The slow path of `sample` for the rows [S, V] that need it, each at its uniform draw `r` [S]:
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


def chain_processors(*processors):
    """One logits processor applying each given one in turn (None entries skipped); None when none is left."""
    procs = [p for p in processors if p is not None]
    if len(procs) <= 1:
        return procs[0] if procs else None

    def chained(contexts, logits):
        for p in procs:
            logits = p(contexts, logits)
        return logits

    return chained
