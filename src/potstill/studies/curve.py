"""Where a run's student lies on the budget study's curve (`potstill demo` prints it).

The curve is the shipped summary of `potstill study budget` (data/budget_curve.json: CPU-minutes,
reference likelihood kept and top-1 agreement on `builtin:heldout_v1` per arm, with the CPU it ran
on). A run that measured the same held-out set is placed against it: the study's best points at no
more CPU than the run used, and the issue's goal.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def load_curve() -> dict[str, Any]:
    return json.loads(resources.files("potstill").joinpath("data/budget_curve.json").read_text())


def curve_line(rows: list[dict[str, Any]], cpu_min: float, curve: dict[str, Any] | None = None) -> str:
    """One line: this run's student (the last eval row) beside the study's points and the goal."""
    curve = curve or load_curve()
    cpu = curve["cpu"]
    where = f"study budget curve ({cpu['capability']}{', bf16' if cpu['bf16'] else ', no bf16'}, n = 1 run per arm)"
    student = rows[-1] if rows else {}
    kept, top1 = student.get("heldout_nll_reference_kept"), student.get("heldout_top1_agreement")
    if kept is None or top1 is None:
        return f"{where}: this run did not measure the held-out set, so it has no point on the curve"
    goal = curve["goal"]
    cheaper = [p for p in curve["points"] if p["cpu_min"] <= cpu_min] or curve["points"]
    best = max(cheaper, key=lambda p: p["reference_likelihood_kept"])
    side = "above" if kept >= best["reference_likelihood_kept"] else "below"
    reached = kept >= goal["reference_likelihood_kept_min"] and top1 >= goal["top1_agreement_min"]
    return (f"{where}: this student keeps {kept:.1%} of the teacher's held-out reference likelihood, top-1 {top1:.3f}, "
            f"after {cpu_min:.1f} CPU-min; {side} the study's best at <= {max(cpu_min, best['cpu_min']):.1f} CPU-min "
            f"({best['arm']}: {best['reference_likelihood_kept']:.1%}, {best['top1_agreement']:.3f} at "
            f"{best['cpu_min']:.1f}); goal >= {goal['reference_likelihood_kept_min']:.0%} and "
            f">= {goal['top1_agreement_min']:.2f}: {'reached' if reached else 'not reached'}")
