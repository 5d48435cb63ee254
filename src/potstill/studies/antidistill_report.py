"""The table and the plot of `potstill study antidistill` (studies/antidistill.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from potstill.studies.common import markdown_table, pyplot, save_figure, write_text
from potstill.utils import write_json

HEADERS = ["arm", "lambda", "T", "teacher cost (nats)", "student NLL", "student loss (nats)",
           "T-baseline loss at same cost", "ratio", "gen tok/s"]


def _f(x: float | None, fmt: str = "{:+.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    rows = [[a["arm"], f"{a['lambda']:g}", f"{a['temperature']:g}", _f(a["teacher_cost"]), _f(a["student_nll"], "{:.4f}"),
             _f(a["student_loss"]), _f(a.get("temperature_student_loss_at_cost")),
             _f(a.get("ratio_vs_temperature"), "{:.2f}x"), f"{a['gen_tokens_per_s']:.1f}"] for a in result["arms"]]
    return HEADERS, rows


def summary_lines(result: dict[str, Any]) -> list[str]:
    g, s = result["goal"], result["serving"]
    lines = [f"goal: at teacher cost <= {g['max_teacher_cost']} nats, student loss >= {g['needed_ratio']}x the "
             f"temperature baseline's: {'reached' if g['reached'] else 'not reached'}"
             + (f" (best {g['best_arm']}: {g['best_ratio']:.2f}x)" if g["best_ratio"] is not None else
                " (no tilt within the cost bracketed by the temperature arms)"),
             f"serving: {s['clean_tokens_per_s']:.1f} tok/s clean"
             + (f", {s['antidistill_tokens_per_s']:.1f} tok/s with anti-distillation ({s['slowdown']:.2f}x slower)"
                if s["antidistill_tokens_per_s"] else ""),
             g["note"]]
    return lines


def plot(result: dict[str, Any], path: str | Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for kind, marker, label in (("lambda", "o", "anti-distillation (lambda)"), ("temperature", "s", "temperature")):
        pts = [a for a in result["arms"] if (a["lambda"] > 0 if kind == "lambda" else a["temperature"] != 1.0)]
        pts = [next(a for a in result["arms"] if a["arm"] == "clean")] + pts
        pts.sort(key=lambda a: a["teacher_cost"])
        ax.plot([a["teacher_cost"] for a in pts], [a["student_loss"] for a in pts], marker=marker, label=label)
        for a in pts[1:]:
            ax.annotate(a["arm"], (a["teacher_cost"], a["student_loss"]), fontsize=7)
    ax.axvline(result["goal"]["max_teacher_cost"], color="grey", ls=":", lw=1)
    ax.set_xlabel("teacher cost: held-out reference NLL rise (nats)")
    ax.set_ylabel("distilled student's reference NLL rise (nats)")
    ax.set_title("anti-distillation vs temperature")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_outputs(result: dict[str, Any], out: str | Path) -> None:
    out = Path(out)
    headers, rows = table(result)
    text = "\n".join(["# potstill study antidistill", "", markdown_table(headers, rows), "",
                      *(f"- {line}" for line in summary_lines(result)), ""])
    write_text(out / "table.md", text)
    plot(result, out / "tradeoff.png")
    write_json(out / "results.json", result)
