"""Which API keys look like model extraction? Per-key features from the query log -> a 0-1 risk.

    risks = score_keys("queries.db")            # highest risk first
    print(format_table(risks))
    write_report("monitor.json", risks)
    throttle(KeyStore("keys.db"), [r.key_id for r in risks if r.flagged], factor=0.1)

Extraction (distillation) traffic differs from ordinary use in several weak ways at once; each
feature maps to a 0-1 component score and the risk is sigmoid(INTERCEPT + sum of WEIGHTS x score), a
logistic regression fitted on labelled simulated traffic (guard/simulate.py; `potstill bench monitor`
refits and measures it on a held-out seed). A key is flagged at `risk >= THRESHOLD`. The hand-set
weights used before (`LEGACY_WEIGHTS`, `legacy_risk`) are kept for comparison.

| component | feature | why |
|---|---|---|
| logprobs | share of requests asking for log-probs | distillation wants soft targets; chat apps rarely ask |
| coverage | topic clusters (token-set Jaccard, leader clustering) among RAREFY evenly spaced prompts / their number | breadth per request, not volume: an app or a benchmark comes back to the same topics |
| novelty | distinct prompts / requests | extraction never asks twice; benchmarks are re-run, app users repeat |
| template | share of prompts sharing a prefix+suffix skeleton with another prompt (>= 60 % of words, numbers/quotes/URLs masked) | generated prompts fill slots in a few templates |
| timing | 1 - CV of inter-arrival times (needs >= 10 gaps; scaled by gaps/30) | scripts send steadily (CV << 1); people are bursty (CV > 1) |
| volume | mean of 1 - exp(-requests/300) and 1 - exp(-(requests/hour)/600) | extraction needs many samples, fast |
| diversity | distinct word-bigram ratio of the prompts' content | with template: filled slots differ, repeated questions do not |
| evidence | 1 - exp(-requests/10) | little traffic, little evidence |

Keys spread over many keys are grouped into campaigns by guard/campaigns.py (`score_campaigns`).
Prompts are the last user message (chat) or the prompt (completions); system prompts are
ignored, so an app's fixed system prompt does not look like a template.
"""

from __future__ import annotations

import math
import re
import statistics
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from potstill.guard.querylog import read_log
from potstill.guard.ratelimit import DEFAULT_RPM, DEFAULT_TPM
from potstill.utils import write_json

# Logistic-regression coefficients over the component scores, fitted on simulated labelled traffic
# (guard/simulate.py: seed 1 to fit, seed 2 held out; class-balanced, L2 1e-3, plain gradient descent).
# Reproduce: `potstill bench monitor --train-seed 1 --test-seed 2 --out runs/bench/monitor.json`
# (prints these constants; the JSON holds them with the held-out AUC / precision / recall).
WEIGHTS: dict[str, float] = {
    "logprobs": 3.129,
    "coverage": 1.783,
    "template": 5.25,
    "timing": 0.619,
    "volume": 1.458,
    "diversity": 5.66,
    "evidence": -0.291,
    "novelty": 5.248,
}
INTERCEPT = -15.795
THRESHOLD = 0.48
"""Flag keys whose risk is at least this (the F1-best cut on the fitting seed's keys)."""
LEGACY_WEIGHTS: dict[str, float] = {
    "logprobs": 0.25, "coverage": 0.25, "template": 0.15, "timing": 0.15, "volume": 0.15, "diversity": 0.05,
}
LEGACY_THRESHOLD = 0.55
"""The hand-set weights and threshold used before calibration (kept for the bench's before/after)."""
RAREFY = 50  # coverage counts topic clusters among this many evenly spaced prompts (fewer: all of them)

MAX_PROMPTS = 600  # prompts per key used for the quadratic features (evenly spaced sample)
_STOPWORDS = frozenset(
    "the a an and or but of to in on for with at by from as is are was were be been it this that these "
    "those i you he she we they me my your our their what which who how why when where can could would "
    "should will do does did not no yes so if then than there here about into over please just some any "
    "all more most very also its it's i'm".split()
)
_MASKS = [
    (re.compile(r"https?://\S+"), " urltoken "),
    (re.compile(r"\"[^\"]{1,200}\"|“[^”]{1,200}”"), " quotetoken "),
    (re.compile(r"\d+(?:[.,]\d+)*"), " numtoken "),
]
_WORD = re.compile(r"[a-z][a-z'\-]*|numtoken|urltoken|quotetoken")


@dataclass
class KeyRisk:
    """One key's extraction risk, its component scores (0-1) and the raw features behind them."""

    key_id: str
    risk: float
    flagged: bool
    n_requests: int
    scores: dict[str, float] = field(default_factory=dict)
    features: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---- prompt text ------------------------------------------------------------------------------
def message_text(content: Any) -> str:
    """A chat message's text: a string, or the text parts of a list of parts joined (as served)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
    return ""


def prompt_text(prompt: Any) -> str:
    """The text a row asked about: the string, or the last user message of a chat (else the last message)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt:
        if len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            return prompt_text(prompt[0])
        messages = [m for m in prompt if isinstance(m, dict)]
        users = [m for m in messages if m.get("role") == "user"]
        if users or messages:
            return message_text((users or messages)[-1].get("content"))
    return ""


def prompt_words(prompt: Any) -> list[str]:
    """Normalised words of the prompt a row asked about (variable spans masked); [] for anything odd."""
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
        return [f"t{t}" for t in prompt]  # a token-id prompt: ids are the words
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], list):
        return prompt_words(prompt[0])
    text = prompt_text(prompt).lower()
    for pattern, repl in _MASKS:
        text = pattern.sub(repl, text)
    return _WORD.findall(text)


# ---- features ---------------------------------------------------------------------------------
def template_share(prompts: list[list[str]], min_cover: float = 0.6, min_words: int = 4) -> float:
    """Share of prompts whose best prefix + best suffix match with other prompts covers >= min_cover."""
    n = len(prompts)
    if n < 2:
        return 0.0
    lcp, lcs = [0] * n, [0] * n
    for best, key in ((lcp, lambda i: prompts[i]), (lcs, lambda i: prompts[i][::-1])):
        order = sorted(range(n), key=key)
        for a, b in zip(order, order[1:], strict=False):
            x, y = key(a), key(b)
            k = 0
            while k < min(len(x), len(y)) and x[k] == y[k]:
                k += 1
            best[a], best[b] = max(best[a], k), max(best[b], k)
    hits = 0
    for i, words in enumerate(prompts):
        covered = min(len(words), lcp[i] + lcs[i])
        if len(words) and covered >= min_words and covered >= min_cover * len(words):
            hits += 1
    return hits / n


def content_sets(prompts: list[list[str]], template_df: float = 0.05) -> list[frozenset[str]]:
    """Content words per prompt: no stopwords, masks, or template words (in > max(3, template_df * n) prompts)."""
    df = Counter(w for p in prompts for w in set(p))
    limit = max(3.0, template_df * len(prompts))
    common = {w for w, c in df.items() if c > limit}
    return [
        frozenset(w for w in p if len(w) > 2 and w not in _STOPWORDS and w not in common and not w.endswith("token"))
        for p in prompts
    ]


def topic_clusters(sets: list[frozenset[str]], threshold: float = 0.3) -> int:
    """Leader clustering: a prompt joins the first cluster whose leader it overlaps by Jaccard >= threshold."""
    leaders: list[frozenset[str]] = []
    for s in sets:
        if not s:
            continue
        for lead in leaders:
            if len(s & lead) / len(s | lead) >= threshold:
                break
        else:
            leaders.append(s)
    return len(leaders)


def distinct_ngram_ratio(sets_or_words: list[list[str]], n: int = 2) -> float:
    grams = [tuple(w[i : i + n]) for w in sets_or_words for i in range(len(w) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def timing_cv(times: list[float]) -> tuple[float, int]:
    """(coefficient of variation of inter-arrival gaps, number of gaps)."""
    ts = sorted(times)
    gaps = [b - a for a, b in zip(ts, ts[1:], strict=False)]
    if len(gaps) < 2:
        return math.nan, len(gaps)
    mean = statistics.fmean(gaps)
    return (statistics.pstdev(gaps) / mean if mean > 0 else 0.0), len(gaps)


def _sample(items: list, k: int) -> list:
    if len(items) <= k:
        return items
    step = len(items) / k
    return [items[int(i * step)] for i in range(k)]


def key_features(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Raw features of one key's rows (any order)."""
    times = [r["ts"] for r in rows]
    n = len(rows)
    span_h = max((max(times) - min(times)) / 3600, 1 / 60) if n else 1 / 60
    with_prompt = [r for r in rows if r.get("prompt") is not None]
    all_words = [w for w in (prompt_words(r["prompt"]) for r in with_prompt) if w]
    prompts = _sample(all_words, MAX_PROMPTS)
    sets = content_sets(prompts)
    content = [[w for w in p if w in s] for p, s in zip(prompts, sets, strict=True)]
    cv, gaps = timing_cv(times)
    rare = _sample(sets, RAREFY)
    return {
        "requests": float(n),
        "requests_per_hour": n / span_h,
        "logprob_share": sum(bool(r.get("logprobs")) for r in with_prompt) / len(with_prompt) if with_prompt else 0.0,
        "template_share": template_share(prompts),
        "topic_clusters": float(topic_clusters(sets)),
        "coverage_rate": topic_clusters(rare) / len(rare) if rare else 0.0,
        "novelty": len({tuple(w) for w in all_words}) / len(all_words) if all_words else 0.0,
        "distinct_ngram_ratio": distinct_ngram_ratio(content),
        "timing_cv": cv,
        "timing_gaps": float(gaps),
    }


def component_scores(f: dict[str, float]) -> dict[str, float]:
    """Map raw features to 0-1 component scores (see the module table)."""
    cv, gaps = f["timing_cv"], f["timing_gaps"]
    timing = 0.0 if math.isnan(cv) or gaps < 10 else max(0.0, 1.0 - cv) * min(1.0, gaps / 30)
    return {
        "logprobs": f["logprob_share"],
        "coverage": f["coverage_rate"],
        "template": f["template_share"],
        "timing": timing,
        "volume": 0.5 * (1 - math.exp(-f["requests"] / 300)) + 0.5 * (1 - math.exp(-f["requests_per_hour"] / 600)),
        "diversity": f["distinct_ngram_ratio"],
        "evidence": 1 - math.exp(-f["requests"] / 10),
        "novelty": f["novelty"],
    }


def risk_of(scores: dict[str, float], weights: dict[str, float] | None = None, intercept: float | None = None) -> float:
    """Calibrated risk: sigmoid(intercept + sum of weight x component score)."""
    weights = WEIGHTS if weights is None else weights
    z = (INTERCEPT if intercept is None else intercept) + sum(weights.get(k, 0.0) * v for k, v in scores.items())
    return 1 / (1 + math.exp(-max(-50.0, min(50.0, z))))


def legacy_risk(f: dict[str, float]) -> float:
    """The hand-set score used before calibration (coverage then grew with volume), for comparisons."""
    s = component_scores(f)
    s["coverage"] = 1 - math.exp(-f["topic_clusters"] / 50)
    total = sum(LEGACY_WEIGHTS[k] * s[k] for k in LEGACY_WEIGHTS) / sum(LEGACY_WEIGHTS.values())
    return s["evidence"] * total


def rows_by_key(log_url: str | Path, since: float | None = None, until: float | None = None) -> dict[str, list[dict]]:
    """The log's rows in [since, until) grouped by key (rows without a key are left out)."""
    by_key: dict[str, list[dict[str, Any]]] = {}
    for r in read_log(log_url, since=since, until=until):
        if r.get("key_id"):
            by_key.setdefault(r["key_id"], []).append(r)
    return by_key


def score_rows(key_id: str, rows: list[dict[str, Any]], weights: dict[str, float] | None = None,
               threshold: float = THRESHOLD, intercept: float | None = None) -> KeyRisk:
    """One key's (or one pooled group's) risk from its rows."""
    feats = key_features(rows)
    scores = component_scores(feats)
    risk = risk_of(scores, weights, intercept)
    return KeyRisk(key_id, round(risk, 4), risk >= threshold, len(rows),
                   {k: round(v, 4) for k, v in scores.items()}, {k: round(v, 4) for k, v in feats.items()})


def score_keys(
    log_url: str | Path,
    since: float | None = None,
    until: float | None = None,
    weights: dict[str, float] | None = None,
    threshold: float = THRESHOLD,
    min_requests: int = 1,
    intercept: float | None = None,
) -> list[KeyRisk]:
    """Risk per key over the log rows in [since, until) (unix seconds), highest risk first."""
    risks = [score_rows(key_id, rows, weights, threshold, intercept)
             for key_id, rows in rows_by_key(log_url, since, until).items() if len(rows) >= min_requests]
    return sorted(risks, key=lambda r: (-r.risk, r.key_id))


def format_table(risks: list[KeyRisk]) -> str:
    """A plain-text table, one line per key (under a header and a rule)."""
    from potstill.present import text_table

    cols = list(WEIGHTS)
    rows = [[r.key_id[:14], f"{r.risk:.2f}", "YES" if r.flagged else "", r.n_requests,
             *(f"{r.scores.get(c, 0.0):.2f}" for c in cols)] for r in risks]
    return text_table(["key", "risk", "flag", "reqs", *(c[:8] for c in cols)], rows)


def write_report(path: str | Path, risks: list[KeyRisk], **meta: Any) -> None:
    """JSON report (written atomically): weights, threshold, meta, and every key's risk."""
    write_json(path, {"weights": WEIGHTS, "intercept": INTERCEPT, "threshold": THRESHOLD, **meta, "keys": [r.to_dict() for r in risks]})


def throttle(
    keystore, key_ids: list[str], factor: float = 0.1, default_rpm: int | None = DEFAULT_RPM,
    default_tpm: int | None = DEFAULT_TPM,
) -> dict[str, tuple[int | None, int | None]]:
    """Multiply each key's limits by `factor` (keys on server defaults start from those) and withdraw its
    log-probs (text only from its next request). Returns the new limits."""
    if not 0 < factor <= 1:
        raise ValueError("factor must be in (0, 1]")
    out = {}
    for key_id in key_ids:
        rec = keystore.get(key_id)
        if rec is None:
            continue
        rpm = rec.rpm if rec.rpm is not None else default_rpm
        tpm = rec.tpm if rec.tpm is not None else default_tpm
        new = (None if rpm is None else max(1, int(rpm * factor)), None if tpm is None else max(1, int(tpm * factor)))
        keystore.set_limits(key_id, *new)
        keystore.set_max_top_logprobs(key_id, 0)
        out[key_id] = new
    return out


def throttle_flagged(keystore, log_url: str | Path, key_ids: list[str], factor: float = 0.1
                     ) -> tuple[dict[str, tuple[int | None, int | None]], str | None]:
    """`throttle`, keys without their own limits starting from the serving server's defaults (recorded in
    the log at start-up). Returns the new limits, and a note when the log holds no server config."""
    from potstill.guard.querylog import server_config

    served = server_config(log_url)
    note = None if served else (f"note: no server config in the log; keys without limits start from "
                                f"rpm={DEFAULT_RPM} tpm={DEFAULT_TPM}")
    limits = {k: served.get(k) for k in ("default_rpm", "default_tpm")} if served else {}
    return throttle(keystore, key_ids, factor, **limits), note
