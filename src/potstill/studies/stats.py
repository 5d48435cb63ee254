"""Small statistics for the studies: t-intervals over seeds, tokens-to-reach-quality, bootstrap ratios.

Quality numbers here are losses (lower is better: NLL, KL). A learning curve is a list of
(tokens, value) points in increasing tokens.

- `t_interval(xs)`: mean and the two-sided 95% Student-t interval half-width over seeds.
- `tokens_to_reach(tokens, values, target)`: the first point where the curve reaches `target`,
  interpolated linearly in log(tokens) between the two budgets that bracket it.
- `token_ratio(...)`: tokens arm A needs / tokens the reference arm needs to reach the best value
  the reference arm reaches, with a paired bootstrap over seeds (seed i of every arm starts from
  the same initial weights, so seeds are resampled jointly).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (no scipy dependency)
_T975 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042]


def t_quantile_975(df: int) -> float:
    """0.975 quantile of Student's t: table to 30 df, then the Cornish-Fisher expansion (error < 1e-4)."""
    if df < 1:
        return math.nan
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def t_interval(xs: Sequence[float]) -> dict[str, Any]:
    """Mean, sample sd, and the 95% t-interval half-width (None with a single seed)."""
    a = np.asarray(xs, dtype=float)
    n = len(a)
    mean = float(a.mean()) if n else math.nan
    if n < 2:
        return {"mean": mean, "sd": None, "half_width": None, "n": n}
    sd = float(a.std(ddof=1))
    return {"mean": mean, "sd": sd, "half_width": t_quantile_975(n - 1) * sd / math.sqrt(n), "n": n}


def tokens_to_reach(tokens: Sequence[float], values: Sequence[float], target: float) -> tuple[float | None, str]:
    """Tokens at which a (lower-is-better) curve first reaches `target`.

    Returns (tokens, status): status "interpolated" (log-linear between the bracketing budgets),
    "at_or_before_first" (already there at the first budget: the tokens are an upper bound) or
    "not_reached" (tokens None: more than the largest budget).
    """
    for i, v in enumerate(values):
        if v <= target:
            if i == 0:
                return float(tokens[0]), "at_or_before_first"
            v0, v1 = values[i - 1], v
            frac = (v0 - target) / (v0 - v1)
            lt = math.log(tokens[i - 1]) + frac * (math.log(tokens[i]) - math.log(tokens[i - 1]))
            return math.exp(lt), "interpolated"
    return None, "not_reached"


def ratio_at_target(curve: tuple[np.ndarray, np.ndarray], reference: tuple[np.ndarray, np.ndarray]) -> dict[str, Any]:
    """Target = the best value the reference curve reaches; tokens each curve needs for it; their ratio."""
    ref_tokens, ref_values = reference
    target = float(np.min(ref_values))
    t_ref, s_ref = tokens_to_reach(ref_tokens, ref_values, target)
    t_arm, s_arm = tokens_to_reach(curve[0], curve[1], target)
    ratio = None if t_arm is None or t_ref is None else t_arm / t_ref
    return {"target": target, "tokens": t_arm, "status": s_arm, "reference_tokens": t_ref,
            "reference_status": s_ref, "ratio": ratio}


def token_ratio(
    arm_tokens: np.ndarray,
    arm_values: np.ndarray,
    ref_tokens: np.ndarray,
    ref_values: np.ndarray,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, Any]:
    """Tokens-to-reach ratio arm / reference on seed-mean curves, with a paired bootstrap over seeds.

    Each array is [seeds, budgets] (tokens actually seen at each evaluation point and the value
    there). The point estimate uses all seeds; the 95% interval is the 2.5/97.5 percentiles of
    the ratio over bootstrap resamples of the seeds (the same seed indices for both arms). A
    resample where the arm never reaches the target counts as +inf (the interval then says so).
    """
    arm_tokens, arm_values = np.asarray(arm_tokens, float), np.asarray(arm_values, float)
    ref_tokens, ref_values = np.asarray(ref_tokens, float), np.asarray(ref_values, float)

    def at(idx):
        return ratio_at_target((arm_tokens[idx].mean(0), arm_values[idx].mean(0)),
                               (ref_tokens[idx].mean(0), ref_values[idx].mean(0)))

    n = arm_values.shape[0]
    point = at(np.arange(n))
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        r = at(rng.integers(0, n, size=n))["ratio"]
        boots.append(math.inf if r is None else r)
    b = np.asarray(boots)
    lo = hi = None
    if n > 1:  # inf stands in as a huge finite value so percentile interpolation stays defined
        lo, hi = (math.inf if x > 1e299 else float(x) for x in np.percentile(np.minimum(b, 1e300), [2.5, 97.5]))
    point.update({
        "ci95": [_finite(lo), _finite(hi)],
        "ci95_unbounded_high": bool(hi is not None and math.isinf(hi)),
        "bootstrap": {"resamples": n_boot, "seeds": n, "not_reached_fraction": float(np.isinf(b).mean())},
    })
    return point


def _finite(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else x
