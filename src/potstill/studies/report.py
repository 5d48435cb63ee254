"""Outputs of the studies: results.json (every number), table.md (the table) and PNG plots, all atomic.

`transfer_table(result)` / `collapse_table(result)` return (headers, rows) so the CLI can show the
same table with rich that table.md holds.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from potstill.studies.common import markdown_table, pyplot, save_figure, write_text
from potstill.utils import write_json

METRIC_LABELS = {"nll_reference": "reference NLL (held-out) ↓", "kl": "KL(teacher ‖ student), held-out ↓"}
COLORS = {"kd": "tab:blue", "ce-teacher": "tab:orange", "scratch": "tab:green"}


def _pm(stat: dict[str, Any] | None, digits: int = 3) -> str:
    if not stat:
        return "–"
    hw = stat.get("half_width")
    return f"{stat['mean']:.{digits}f}" + ("" if hw is None else f" ± {hw:.{digits}f}")


def _num(x: float | None, fmt: str = "{:,.0f}") -> str:
    return "–" if x is None or (isinstance(x, float) and not math.isfinite(x)) else fmt.format(x)


def transfer_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["arm", "budget (tokens)", "tokens seen", "reference NLL ↓", "KL(teacher‖student) ↓"]
    rows = []
    for arm, curve in result["curves"].items():
        for row in curve:
            rows.append([arm, f"{row['budget']:,}", f"{row['tokens_mean']:,.0f}", _pm(row.get("nll_reference")),
                         _pm(row.get("kl"))])
    return headers, rows


def ratio_lines(result: dict[str, Any]) -> list[str]:
    """One sentence per (arm, metric): the tokens it needs to reach scratch's best, vs scratch."""
    lines = []
    for arm, per_metric in result.get("ratios_vs_scratch", {}).items():
        for metric, r in per_metric.items():
            lo, hi = r["ci95"]
            n = r.get("n", len(r.get("per_seed", [])))
            if r["ci95_unbounded_high"]:
                ci = "unbounded: a seed never reaches the target"
            elif lo is None:
                ci = f"n/a ({n} seed)"
            else:
                ci = f"{_num(lo, '{:.3f}')}–{_num(hi, '{:.3f}')}"
            seeds = ", ".join("never" if x is None else f"{x:.3f}" for x in r.get("per_seed", []))
            how = {"at_or_before_first": " (reached at the first budget: an upper bound)",
                   "not_reached": " (not reached within the budgets)"}.get(r["status"], "")
            lines.append(
                f"{arm} vs scratch on {metric}: target {r['target']:.3f} (scratch's best); {arm} needs "
                f"{_num(r['tokens'])} tokens{how}, scratch {_num(r['reference_tokens'])}; "
                f"ratio {_num(r['ratio'], '{:.3f}')} on the seed-mean curves; per seed (paired) {seeds}: "
                f"geometric mean {_num(r.get('geo_mean'), '{:.3f}')}, 95% t-interval on log-ratios {ci}, n={n} seeds")
    return lines


def _short(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 1e6 else f"{n / 1e3:g}k" if n >= 1e3 else str(n)


def plot_transfer(result: dict[str, Any], path: str | Path) -> None:
    """Quality vs tokens (log x), seed mean with a 95% t-interval band, one panel per metric."""
    plt = pyplot()
    from matplotlib.ticker import NullFormatter

    metrics = [m for m in METRIC_LABELS if any(m in row for c in result["curves"].values() for row in c)]
    fig, axes = plt.subplots(1, len(metrics), figsize=(6 * len(metrics), 4.2), squeeze=False)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for arm, curve in result["curves"].items():
            pts = [(row["tokens_mean"], row[metric]) for row in curve if metric in row]
            if not pts:
                continue
            x = [p[0] for p in pts]
            mean = [p[1]["mean"] for p in pts]
            hw = [p[1]["half_width"] or 0.0 for p in pts]
            ax.plot(x, mean, marker="o", color=COLORS.get(arm), label=f"{arm}: {result['arms'][arm]}")
            ax.fill_between(x, [m - h for m, h in zip(mean, hw, strict=True)],
                            [m + h for m, h in zip(mean, hw, strict=True)], color=COLORS.get(arm), alpha=0.2)
        teacher = result.get("teacher", {}).get(metric)
        if teacher is not None and metric != "kl":
            ax.axhline(teacher, color="gray", linestyle="--", label="teacher")
        ratio = result.get("ratios_vs_scratch", {}).get("kd", {}).get(metric)
        if ratio is not None:
            ax.axhline(ratio["target"], color="tab:green", linestyle=":", linewidth=1, label="target (scratch's best)")
        ax.set_xscale("log")
        ax.set_xticks(result["budgets"], [_short(b) for b in result["budgets"]])
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels on a short log axis overlap
        ax.set_xlabel("learned tokens (budgets)")
        ax.set_ylabel(METRIC_LABELS[metric])
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    seeds = result["config"]["seeds"]
    fig.suptitle(f"potstill study transfer: {result['config']['student']}, {seeds} seeds (mean, 95% t-interval)")
    save_figure(fig, path)


def write_transfer_outputs(result: dict[str, Any], out: str | Path) -> None:
    out = Path(out)
    write_json(out / "results.json", result)
    headers, rows = transfer_table(result)
    text = "# potstill study transfer\n\n" + markdown_table(headers, rows) + "\n\n"
    text += "\n".join(f"- {line}" for line in ratio_lines(result)) + "\n"
    write_text(out / "table.md", text)
    plot_transfer(result, out / "quality_vs_tokens.png")


COLLAPSE_COLUMNS = [
    ("distinct_1_equal", "distinct-1 ↑", "{:.3f}"), ("distinct_2_equal", "distinct-2 ↑", "{:.3f}"),
    ("distinct_3_equal", "distinct-3 ↑", "{:.3f}"), ("entropy", "entropy (nats)", "{:.3f}"),
    ("mean_length", "mean length", "{:.1f}"), ("kl_to_gen0", "KL(gen0‖gen) ↓", "{:.4f}"),
    ("nll_reference", "reference NLL ↓", "{:.3f}"),
]


def collapse_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    headers = ["generation", "model"] + [c[1] for c in COLLAPSE_COLUMNS]
    rows = []
    for g in result["generations"]:
        rows.append([str(g["generation"]), g["model"]] + [_num(g.get(k), f) for k, _, f in COLLAPSE_COLUMNS])
    return headers, rows


def plot_collapse(result: dict[str, Any], path: str | Path) -> None:
    """Drift over generations: diversity, entropy, fidelity to gen 0, reference NLL."""
    plt = pyplot()
    gens = [g["generation"] for g in result["generations"]]
    fig, axes = plt.subplots(1, 4, figsize=(18, 3.8))
    for n in (1, 2, 3):
        axes[0].plot(gens, [g.get(f"distinct_{n}_equal", math.nan) for g in result["generations"]], marker="o",
                     label=f"distinct-{n}")
    axes[0].set_ylabel(f"distinct-n, first {result.get('equal_tokens', 0):,} tokens ↑")
    axes[0].legend(fontsize=8)
    panels = [("entropy", "mean next-token entropy (nats)"), ("kl_to_gen0", "KL(gen0 ‖ gen), held-out ↓"),
              ("nll_reference", "reference NLL (held-out) ↓")]
    for ax, (key, label) in zip(axes[1:], panels, strict=True):
        ax.plot(gens, [g.get(key, math.nan) for g in result["generations"]], marker="o")
        ax.set_ylabel(label)
    for ax in axes:
        ax.set_xlabel("generation (0 = teacher)")
        ax.set_xticks(gens)
        ax.grid(alpha=0.3)
    fig.suptitle(f"potstill study collapse: {result['config']['student']}, loss {result['config']['loss']}")
    fig.tight_layout()
    save_figure(fig, path)


def write_collapse_outputs(result: dict[str, Any], out: str | Path) -> None:
    out = Path(out)
    write_json(out / "results.json", result)
    headers, rows = collapse_table(result)
    note = (f"\ndistinct-n: each generation's own samples, in row-id order, cut to the same "
            f"{result.get('equal_tokens', 0):,} tokens (the smallest generation's total); results.json also "
            "holds distinct_n over all samples.\n")
    write_text(out / "table.md", "# potstill study collapse\n\n" + markdown_table(headers, rows) + "\n" + note)
    plot_collapse(result, out / "drift.png")
