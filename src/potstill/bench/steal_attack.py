"""The watermark-stealing attacker (issue 14, attack 7): estimate green lists from what an API serves.

The attacker knows the public open weights the service runs, asks for completions with
`top_logprobs`, and recomputes the public log-probs of the same prefixes. Two estimators:

- log-prob differences (`bits_from_logprobs`): served minus public log-probs of the top-k ids at
  one position are `delta * green - log Z`: two levels `delta` apart. Splitting at the largest gap
  gives every returned id's green bit exactly; when all ids share one level the sign of the
  offset tells which (all red: `-log Z <= 0`; all green: `delta - log Z >= 0`). When served and
  public log-probs agree everywhere, the log-probs carry no bit and the estimator says so (None);
- sampled-token counting (`FrequencyMap`, after Jovanovic et al. 2024 "Watermark Stealing"): a
  token sampled more often than the public model predicts after a context is probably green.
  It needs only the text, so no log-prob policy stops it; it is only slower.

The attacker keys its map on the last h ids (the context a LeftHash seed sees). For Min-SelfHash
the true seed is the min-hash token of context + candidate, which this naive per-context map does
not model: its cost on SelfHash is an upper bound on a structure-aware attacker's.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import numpy as np
import torch

Pair = tuple[tuple[int, ...], int]
"""(the last h context ids, the candidate id)."""


def bits_from_logprobs(
    ids: list[int], served: list[float], public: torch.Tensor, min_gap: float = 0.05
) -> list[bool] | None:
    """Green bits of `ids` from their served log-probs and the public log-probs `public` [V].

    None when the differences show no structure (a flat offset below `min_gap`): no information.
    """
    d = np.asarray(served, dtype=np.float64) - public[torch.tensor(ids)].double().cpu().numpy()
    order = np.sort(d)
    gaps = np.diff(order)
    if len(gaps) and gaps.max() > min_gap:
        j = int(gaps.argmax())
        return (d > (order[j] + order[j + 1]) / 2).tolist()
    mid = float(np.median(d))
    if abs(mid) <= min_gap:
        return None
    return [mid > 0] * len(ids)


class GreenMap:
    """The attacker's estimate of green bits per (context, candidate) pair."""

    def __init__(self, h: int, use_logprobs: bool = True, watch: set[Pair] | None = None):
        self.h, self.use_logprobs = h, use_logprobs
        self.watch = watch  # keep state for these pairs only (a bench shortcut: same guesses for them)
        self.exact: dict[Pair, bool] = {}  # from log-prob differences
        self.obs: dict[Pair, float] = defaultdict(float)  # times sampled
        self.exp: dict[Pair, float] = defaultdict(float)  # public expected count (top ids only)
        self.queries = 0  # positions seen (each = one max_tokens=1, top_logprobs query)
        self.lp_bits = 0  # bits read from log-probs

    def key(self, prefix: list[int]) -> tuple[int, ...]:
        return tuple(prefix[-self.h:])

    def observe(self, prefix: list[int], sampled: int, public: torch.Tensor,
                top: tuple[list[int], list[float]] | None = None, expect_top: int = 32) -> None:
        """One served position: the context `prefix`, the sampled id, the public log-probs [V], and
        the served (top ids, top log-probs) when the attacker asked for them."""
        self.queries += 1
        ctx = self.key(prefix)
        keep = (lambda pair: True) if self.watch is None else self.watch.__contains__
        if self.use_logprobs and top is not None and top[0]:
            bits = bits_from_logprobs(top[0], top[1], public)
            if bits is not None:
                self.lp_bits += len(bits)
                for t, g in zip(top[0], bits, strict=True):
                    if keep((ctx, t)):
                        self.exact[(ctx, t)] = g
        if keep((ctx, sampled)):
            self.obs[(ctx, sampled)] += 1.0
        p, ids = public.exp().topk(min(expect_top, public.numel()))
        for t, q in zip(ids.tolist(), p.tolist(), strict=True):
            if keep((ctx, t)):
                self.exp[(ctx, t)] += q

    def guess(self, pair: Pair, ratio: float = 1.0, min_exp: float = 2.0) -> bool | None:
        """The attacker's bit for `pair`: exact if read off log-probs, else sampled/expected > `ratio`
        (green sampled ~e^delta/Z times its public rate, red ~1/Z), None when never informative."""
        if pair in self.exact:
            return self.exact[pair]
        o, e = self.obs.get(pair, 0.0), self.exp.get(pair, 0.0)
        if o == 0 and e < min_exp:
            return None
        return o > ratio * max(e, 1e-9)


def recovery(gm: GreenMap, truth: Iterable[tuple[Pair, bool, int]]) -> dict[str, float]:
    """How much of the true green list over `truth` (pair, bit, occurrences) the attacker holds.

    recovered: share of distinct pairs whose bit the attacker has and is right about (unknown = 0);
    recovered_tokens: the same weighted by occurrences (the share of a distiller's training tokens);
    accuracy: share right when unknown pairs are guessed red (the prior: 1 - gamma by chance);
    precision: right among the pairs it claims; claimed: share it claims.
    """
    n = claimed = right = right_all = tokens = right_tokens = 0
    for pair, g, count in truth:
        n += 1
        tokens += count
        b = gm.guess(pair)
        if b is not None:
            claimed += 1
            right += b == g
            right_tokens += count * (b == g)
        right_all += (b if b is not None else False) == g
    n = max(n, 1)
    return {"recovered": right / n, "recovered_tokens": right_tokens / max(tokens, 1), "accuracy": right_all / n,
            "precision": right / max(claimed, 1), "claimed": claimed / n}


class SelfHashMap(GreenMap):
    """A Min-SelfHash-aware reader of exact bits: the seed of (context, v) is the hash of one token m
    of context + [v] (the one with the smallest hash), so the bit is a function of (m, v) alone.

    Each bit read off log-probs votes for (t, v) for every t in context + [v]; votes for the true m
    always agree, those of other tokens mix several seeds. A pair's guess is the bit of its token
    with unanimous votes and the most of them (ties and mixed votes: the majority over all).
    """

    def __init__(self, h: int, watch: set[Pair] | None = None):
        super().__init__(h, True, None if watch is None else {((t,), v) for ctx, v in watch for t in (*ctx, v)})
        self.votes: dict[Pair, list[int]] = defaultdict(lambda: [0, 0])

    def observe(self, prefix, sampled, public, top=None, expect_top: int = 32) -> None:
        self.queries += 1
        ctx = self.key(prefix)
        bits = bits_from_logprobs(top[0], top[1], public) if top is not None and top[0] else None
        if bits is None:
            return
        self.lp_bits += len(bits)
        for v, g in zip(top[0], bits, strict=True):
            for t in set(ctx) | {v}:
                if self.watch is None or ((t,), v) in self.watch:
                    self.votes[((t,), v)][int(g)] += 1

    def guess(self, pair: Pair, ratio: float = 1.0, min_exp: float = 2.0) -> bool | None:
        ctx, v = pair
        seen = [self.votes[((t,), v)] for t in set(ctx) | {v} if ((t,), v) in self.votes]
        if not seen:
            return None
        pure = [c for c in seen if min(c) == 0]
        if pure:
            best = max(pure, key=sum)
            return best[1] > 0
        return sum(c[1] for c in seen) > sum(c[0] for c in seen)
