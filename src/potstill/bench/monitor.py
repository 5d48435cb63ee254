"""`potstill bench monitor`: calibrate the monitor on simulated traffic and measure it on another seed.

    from potstill.bench.monitor import bench_monitor, format_table
    print(format_table(bench_monitor(train_seed=1, test_seed=2, out_json="monitor.json")))

Each seed's traffic (guard/simulate.py) is written through the real QueryLog and read back. On the
training seed a logistic regression over the component scores is fitted (class-balanced, each kind of
key weighted equally within its class, L2 1e-3, gradient descent); the threshold is the F1-best cut on
the training keys. On the held-out seed: ROC AUC, precision and recall at the threshold, per key and
per campaign, for the hand-set score ("before") and the fitted one ("after"). Per campaign: the units are
the simulator's true groups (a campaign, or a key on its own); a unit's score is the highest score any
of its keys gets -- before, each key alone; after, the pooled risk of the group `guard/campaigns.py`
put the key in. `mixed_groups` counts found groups that join benign and extraction keys.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from potstill import __version__
from potstill.guard import monitor as mon
from potstill.guard.campaigns import group_keys, score_groups
from potstill.guard.simulate import simulate, write_log
from potstill.present import markdown_table
from potstill.utils import atomic_path, write_json

COMPONENTS = ["logprobs", "coverage", "template", "timing", "volume", "diversity", "evidence", "novelty"]


def roc_auc(scores: list[float], labels: list[int]) -> float:
    """Probability a random positive outscores a random negative (ties count half)."""
    pos = [s for s, y in zip(scores, labels, strict=True) if y]
    neg = [s for s, y in zip(scores, labels, strict=True) if not y]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def prec_recall(scores: list[float], labels: list[int], threshold: float) -> dict[str, float]:
    """Precision and recall of `score >= threshold`, with the counts behind them."""
    tp = sum(s >= threshold and y for s, y in zip(scores, labels, strict=True))
    fp = sum(s >= threshold and not y for s, y in zip(scores, labels, strict=True))
    fn = sum(s < threshold and y for s, y in zip(scores, labels, strict=True))
    return {"precision": tp / (tp + fp) if tp + fp else float("nan"), "recall": tp / (tp + fn) if tp + fn else 0.0,
            "tp": tp, "fp": fp, "fn": fn}


def fit_logistic(x: np.ndarray, y: np.ndarray, w: np.ndarray, l2: float = 1e-3, steps: int = 20000,
                 lr: float = 2.0) -> tuple[np.ndarray, float]:
    """Weighted logistic regression by full-batch gradient descent: (coefficients, intercept)."""
    coef, b = np.zeros(x.shape[1]), 0.0
    w = w / w.sum()
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(x @ coef + b)))
        g = w * (p - y)
        coef -= lr * (x.T @ g + l2 * coef)
        b -= lr * g.sum()
    return coef, float(b)


def best_threshold(scores: list[float], labels: list[int]) -> float:
    """The cut (midway between adjacent scores) with the highest F1."""
    s = sorted(set(scores))
    cuts = [(a + b) / 2 for a, b in zip(s, s[1:], strict=False)] or s

    def f1(c: float) -> float:
        pr = prec_recall(scores, labels, c)
        p, r = pr["precision"], pr["recall"]
        return 0.0 if not p or np.isnan(p) or not r else 2 * p * r / (p + r)
    return max(cuts, key=lambda c: (f1(c), -abs(c - 0.5)))


def simulated(seed: int, workdir: str) -> tuple[dict[str, list[dict]], dict]:
    """One seed's rows by key, written through the real query log and read back, and the truth."""
    rows, truth = simulate(seed)
    url = os.path.join(workdir, f"sim{seed}.db")
    write_log(url, rows)
    return mon.rows_by_key(url), truth


def key_scores(by_key: dict[str, list[dict]]) -> dict[str, tuple[dict, dict]]:
    """key -> (features, component scores)."""
    out = {}
    for k, rows in by_key.items():
        f = mon.key_features(rows)
        out[k] = (f, mon.component_scores(f))
    return out


def calibrate(by_key: dict[str, list[dict]], truth: dict) -> tuple[dict[str, float], float, float]:
    """(weights, intercept, threshold) fitted on one seed's keys."""
    ks = key_scores(by_key)
    keys = sorted(ks)
    x = np.array([[ks[k][1][c] for c in COMPONENTS] for k in keys])
    y = np.array([truth[k].label for k in keys], dtype=float)
    kinds = [truth[k].kind for k in keys]
    w = np.array([1 / kinds.count(kd) / len({q for q in kinds if truth_label(truth, q) == yy})
                  for kd, yy in zip(kinds, y, strict=True)])
    coef, b = fit_logistic(x, y, w)
    weights = {c: round(float(v), 3) for c, v in zip(COMPONENTS, coef, strict=True)}
    risks = [mon.risk_of(ks[k][1], weights, round(b, 3)) for k in keys]
    return weights, round(b, 3), round(best_threshold(risks, [int(v) for v in y]), 3)


def truth_label(truth: dict, kind: str) -> int:
    return next(t.label for t in truth.values() if t.kind == kind)


def evaluate(by_key: dict[str, list[dict]], truth: dict, weights: dict[str, float], intercept: float,
             threshold: float) -> dict[str, Any]:
    """Held-out metrics, before (hand-set) and after (fitted), per key and per campaign."""
    ks = key_scores(by_key)
    keys = sorted(ks)
    labels = [truth[k].label for k in keys]
    before = {k: mon.legacy_risk(ks[k][0]) for k in keys}
    after = {k: mon.risk_of(ks[k][1], weights, intercept) for k in keys}
    groups = group_keys(by_key)
    camps = score_groups(by_key, groups, weights, threshold, intercept)
    group_risk = {k: c.risk for c in camps for k in c.keys}
    units: dict[str, list[str]] = {}
    for k in keys:
        units.setdefault(truth[k].campaign, []).append(k)
    ulabels = [truth[v[0]].label for v in units.values()]
    ub = [max(before[k] for k in v) for v in units.values()]
    ua = [max(group_risk[k] for k in v) for v in units.values()]
    mixed = sum(len({truth[k].label for k in g}) > 1 for g in groups)
    out: dict[str, Any] = {"n_keys": {kd: sum(t.kind == kd for t in truth.values()) for kd in
                                      dict.fromkeys(t.kind for t in truth.values())},
                           "n_units": {"extraction": sum(ulabels), "benign": len(ulabels) - sum(ulabels)},
                           "groups_found": sum(len(g) > 1 for g in groups), "mixed_groups": mixed}
    for name, scores, lab, thr in (("key_before", [before[k] for k in keys], labels, mon.LEGACY_THRESHOLD),
                                   ("key_after", [after[k] for k in keys], labels, threshold),
                                   ("campaign_before", ub, ulabels, mon.LEGACY_THRESHOLD),
                                   ("campaign_after", ua, ulabels, threshold)):
        out[name] = {"auc": roc_auc(scores, lab), "threshold": thr, **prec_recall(scores, lab, thr)}
    out["recall_by_kind"] = {
        kd: {"before": float(np.mean([before[k] >= mon.LEGACY_THRESHOLD for k in keys if truth[k].kind == kd])),
             "after": float(np.mean([after[k] >= threshold for k in keys if truth[k].kind == kd])),
             "after_campaign": float(np.mean([group_risk[k] >= threshold for k in keys if truth[k].kind == kd]))}
        for kd in out["n_keys"]}
    return out


def bench_monitor(train_seed: int = 1, test_seed: int = 2, out_json: str | None = None,
                  fitted: bool = False) -> dict[str, Any]:
    """Fit on `train_seed`, measure on `test_seed`. `fitted`: measure monitor.py's constants instead of refitting."""
    with tempfile.TemporaryDirectory() as d:
        if fitted:
            weights, intercept, threshold = dict(mon.WEIGHTS), mon.INTERCEPT, mon.THRESHOLD
        else:
            weights, intercept, threshold = calibrate(*simulated(train_seed, d))
        result = {"version": __version__, "train_seed": train_seed, "test_seed": test_seed,
                  "weights": weights, "intercept": intercept, "threshold": threshold,
                  **evaluate(*simulated(test_seed, d), weights, intercept, threshold)}
    if out_json:
        write_json(out_json, result)
        md = os.path.splitext(out_json)[0] + ".md"
        with atomic_path(md) as tmp:
            tmp.write_text(format_table(result) + "\n")
    return result


def format_table(r: dict[str, Any]) -> str:
    """Markdown: AUC, precision, recall per key and per campaign, before and after; n per kind."""
    lines = [f"train seed {r['train_seed']}, held-out seed {r['test_seed']}; keys: "
             + ", ".join(f"{k} {v}" for k, v in r["n_keys"].items())
             + f"; campaign units: {r['n_units']['extraction']} extraction, {r['n_units']['benign']} benign; "
             f"groups found {r['groups_found']}, mixed {r['mixed_groups']}", ""]
    units = []
    for name in ("key_before", "key_after", "campaign_before", "campaign_after"):
        m = r[name]
        unit, when = name.split("_")
        units.append([unit, "hand-set" if when == "before" else "fitted", f"{m['threshold']:.3f}", f"{m['auc']:.3f}",
                      f"{m['precision']:.3f}", f"{m['recall']:.3f}", f"{m['tp']}/{m['fp']}/{m['fn']}"])
    lines.append(markdown_table(["unit", "score", "threshold", "ROC AUC", "precision", "recall", "tp/fp/fn"], units))
    kinds = [[kd, r["n_keys"][kd], f"{v['before']:.2f}", f"{v['after']:.2f}", f"{v['after_campaign']:.2f}"]
             for kd, v in r["recall_by_kind"].items()]
    lines += ["", markdown_table(["kind", "n keys", "flagged before", "flagged after (key)", "flagged after (campaign)"],
                                 kinds)]
    lines += ["", "WEIGHTS = " + repr(r["weights"]), f"INTERCEPT = {r['intercept']}", f"THRESHOLD = {r['threshold']}"]
    return "\n".join(lines)
