"""Group API keys that behave alike into campaigns and score each group on its pooled traffic.

    groups = score_campaigns("queries.db")   # highest risk first; a key that resembles no other is its own group

A distiller can spread its traffic over many keys so that none looks like much. Keys of one operator
still share how they ask: the same prompt templates (word 3-grams in >= max(2, 20 %) of a key's prompts), the same
sampling parameters, the same log-prob use and similar timing. Two keys are linked when

    sim = 0.45 x Jaccard(template 3-grams) + 0.2 x [same sampling params] + 0.15 x (1 - |log-prob share
          difference|) + 0.1 x Jaccard(content words) + 0.1 x exp(-|log(median gap ratio)|)  >= LINK

and their skeleton Jaccard is at least MIN_SKELETON (no shared template, no link: people who happen to
use default parameters are not a campaign). Groups are the connected components; each group's rows are
pooled and scored by `monitor.score_rows` as if they were one key; a group's risk is the higher of that
and its riskiest key's. The log's client address (`client`, recorded since the gateway work) is not
used here yet.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from potstill.guard.monitor import THRESHOLD, KeyRisk, content_sets, prompt_words, rows_by_key, score_rows

LINK = 0.7
MIN_SKELETON = 0.3


@dataclass
class Campaign:
    """A group of keys scored on their pooled rows."""

    campaign_id: str
    keys: list[str]
    risk: float
    flagged: bool
    n_requests: int
    pooled: KeyRisk | None = None
    key_risks: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def key_signature(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """What a key's traffic looks like, for comparing keys."""
    words = [prompt_words(r.get("prompt")) for r in rows]
    words = [w for w in words if w]
    skel = Counter(g for w in words for g in {tuple(w[i:i + 3]) for i in range(len(w) - 2)})
    params = Counter(json.dumps(r.get("params") or {}, sort_keys=True) for r in rows)
    times = sorted(r["ts"] for r in rows)
    gaps = [b - a for a, b in zip(times, times[1:], strict=False) if b > a]
    return {
        "skeletons": frozenset(s for s, c in skel.items() if c >= max(2, 0.2 * len(words))),  # recurring 3-grams
        "content": frozenset().union(*content_sets(words)) if words else frozenset(),
        "params": params.most_common(1)[0][0] if params else "{}",
        "logprob_share": sum(bool(r.get("logprobs")) for r in rows) / max(len(rows), 1),
        "median_gap": statistics.median(gaps) if gaps else math.nan,
    }


def _jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a and b else 0.0


def similarity(a: dict[str, Any], b: dict[str, Any]) -> tuple[float, float]:
    """(overall similarity 0-1, skeleton Jaccard) of two key signatures."""
    skel = _jaccard(a["skeletons"], b["skeletons"])
    ga, gb = a["median_gap"], b["median_gap"]
    timing = 0.0 if math.isnan(ga) or math.isnan(gb) else math.exp(-abs(math.log((ga + 1e-3) / (gb + 1e-3))))
    sim = (0.45 * skel + 0.2 * (a["params"] == b["params"]) + 0.15 * (1 - abs(a["logprob_share"] - b["logprob_share"]))
           + 0.1 * _jaccard(a["content"], b["content"]) + 0.1 * timing)
    return sim, skel


def group_keys(by_key: dict[str, list[dict[str, Any]]], link: float = LINK,
               min_skeleton: float = MIN_SKELETON) -> list[list[str]]:
    """Connected components of the 'behaves alike' graph, largest first (each sorted)."""
    keys = sorted(by_key)
    sigs = {k: key_signature(by_key[k]) for k in keys}
    parent = {k: k for k in keys}

    def find(k: str) -> str:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for i, a in enumerate(keys):
        if not sigs[a]["skeletons"]:
            continue
        for b in keys[i + 1:]:
            if not sigs[b]["skeletons"] or find(a) == find(b):
                continue
            sim, skel = similarity(sigs[a], sigs[b])
            if sim >= link and skel >= min_skeleton:
                parent[find(b)] = find(a)
    groups: dict[str, list[str]] = {}
    for k in keys:
        groups.setdefault(find(k), []).append(k)
    return sorted(groups.values(), key=lambda g: (-len(g), g[0]))


def score_groups(by_key: dict[str, list[dict[str, Any]]], groups: list[list[str]],
                 weights: dict[str, float] | None = None, threshold: float = THRESHOLD,
                 intercept: float | None = None) -> list[Campaign]:
    """Score each group on its pooled rows (a one-key group scores as that key)."""
    out = []
    for g in groups:
        cid = g[0] if len(g) == 1 else f"campaign:{g[0]}+{len(g) - 1}"
        pooled = score_rows(cid, [r for k in g for r in by_key[k]], weights, threshold, intercept)
        key_risks = {k: score_rows(k, by_key[k], weights, threshold, intercept).risk for k in g} if len(g) > 1 else {
            g[0]: pooled.risk}
        risk = max(pooled.risk, *key_risks.values())  # a group is at least as risky as its riskiest key
        out.append(Campaign(cid, g, risk, risk >= threshold, pooled.n_requests, pooled, key_risks))
    return sorted(out, key=lambda c: (-c.risk, c.campaign_id))


def score_campaigns(log_url: str | Path, since: float | None = None, until: float | None = None,
                    threshold: float = THRESHOLD) -> list[Campaign]:
    """Campaigns (groups of alike keys) over the log rows in [since, until), highest pooled risk first."""
    by_key = rows_by_key(log_url, since, until)
    return score_groups(by_key, group_keys(by_key), threshold=threshold)


def format_campaigns(campaigns: list[Campaign]) -> str:
    """One line per group: id, pooled risk, flag, requests, number of keys, highest single-key risk."""
    head = f"{'campaign':<34} {'risk':>5} {'flag':>4} {'reqs':>6} {'keys':>4} {'max key':>7}"
    lines = [head, "-" * len(head)]
    for c in campaigns:
        lines.append(f"{c.campaign_id[:34]:<34} {c.risk:>5.2f} {'YES' if c.flagged else '':>4} {c.n_requests:>6} "
                     f"{len(c.keys):>4} {max(c.key_risks.values()):>7.2f}")
    return "\n".join(lines)
