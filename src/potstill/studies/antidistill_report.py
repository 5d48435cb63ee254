"""The table and the plot of `potstill study antidistill` (studies/antidistill.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from potstill.studies.common import markdown_table, pyplot, save_figure, write_text
from potstill.utils import write_json

HEADERS = ["arm", "lambda", "T", "teacher cost (nats)", "student NLL", "student loss (nats)",
           "T-baseline loss at same cost", "ratio", "gen tok/s"]
MEAN_HEADERS = ["arm", "lambda", "T", "teacher cost (nats)", "n", "student loss (nats), mean [95 % CI]",
                "T-baseline loss at same cost", "tilt - T [95 % CI]", "ratio of means", "gen tok/s"]


def _f(x: float | None, fmt: str = "{:+.4f}") -> str:
    return "-" if x is None else fmt.format(x)


def _ci(mean: float | None, low: float | None, high: float | None) -> str:
    return _f(mean) + ("" if low is None else f" [{low:+.4f}, {high:+.4f}]")


def seeds(result: dict[str, Any]) -> int:
    return result["goal"].get("n", 1)


def run_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per arm and seed (the seed beside the arm when there are several)."""
    many = seeds(result) > 1
    rows = [[a["arm"] + (f" (seed {a['seed']})" if many else ""), f"{a['lambda']:g}", f"{a['temperature']:g}",
             _f(a["teacher_cost"]), _f(a["student_nll"], "{:.4f}"), _f(a["student_loss"]),
             _f(a.get("temperature_student_loss_at_cost")), _f(a.get("ratio_vs_temperature"), "{:.2f}x"),
             f"{a['gen_tokens_per_s']:.1f}"] for a in result["arms"]]
    return HEADERS, rows


def mean_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """One row per arm over the seeds: mean student loss and intervals (studies/antidistill.aggregate)."""
    rows = []
    for a in result["aggregate"]:
        d = a.get("vs_temperature") or {}
        rows.append([a["arm"], f"{a['lambda']:.4g}", f"{a['temperature']:.4g}", _f(a["teacher_cost"]), str(a["n"]),
                     _ci(a["student_loss_mean"], a["student_loss_low"], a["student_loss_high"]),
                     _f(a.get("temperature_loss_mean")), _ci(d.get("mean"), d.get("low"), d.get("high")) if d else "-",
                     _f(a.get("ratio_of_means"), "{:.2f}x"), f"{a['gen_tokens_per_s']:.1f}"])
    return MEAN_HEADERS, rows


STEP_HEADERS = ["training steps", "n", "tilt", "tilt student loss [95 % CI]", "T student loss [95 % CI]",
                "tilt - T [95 % CI]", "tilt - 3 x T [95 % CI]", "ratio of means"]


def steps_table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The goal's reading after each measured number of the distiller's training steps (`by_steps`)."""
    rows = []
    for r in result.get("by_steps") or []:
        t, temp = r["tilt"], r.get("temperature") or {}
        d, d3 = r.get("vs_temperature") or {}, r.get("vs_3x_temperature") or {}
        steps = "each student at its lowest" if r["steps"] == "best" else str(r["steps"])
        rows.append([steps, str(r["n"]), r["arm"], _ci(t["mean"], t["low"], t["high"]),
                     _ci(temp.get("mean"), temp.get("low"), temp.get("high")) if temp else "-",
                     _ci(d.get("mean"), d.get("low"), d.get("high")) if d else "-",
                     _ci(d3.get("mean"), d3.get("low"), d3.get("high")) if d3 else "-",
                     _f(r.get("ratio_of_means"), "{:.2f}x")])
    return STEP_HEADERS, rows


def steps_plot(result: dict[str, Any], path: str | Path) -> None:
    """Mean student loss of the goal's tilt and its temperature baseline against the distiller's training steps."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in result["by_steps"] if r["steps"] != "best"]  # "best": each student at its own lowest NLL
    for key, marker, label in (("tilt", "o", f"anti-distillation ({rows[-1]['arm']})"),
                               ("temperature", "s", "temperature, same teacher cost")):
        pts = [(r["steps"], r[key]) for r in rows if r.get(key)]
        ys = [v["mean"] for _, v in pts]
        err = None
        if all(v["low"] is not None for _, v in pts):
            err = [[y - v["low"] for (_, v), y in zip(pts, ys, strict=True)],
                   [v["high"] - y for (_, v), y in zip(pts, ys, strict=True)]]
        ax.errorbar([x for x, _ in pts], ys, yerr=err, marker=marker, capsize=3, label=label)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xscale("log")
    ax.set_xticks([r["steps"] for r in rows], [str(r["steps"]) for r in rows])
    ax.minorticks_off()
    ax.set_xlabel("distiller's training steps")
    ax.set_ylabel(f"student's reference NLL rise (nats), n = {rows[-1]['n']}")
    ax.set_title("anti-distillation vs temperature by training steps")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def table(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The CLI's table: per arm and seed with one seed, the means over seeds with several."""
    return mean_table(result) if seeds(result) > 1 else run_table(result)


def summary_lines(result: dict[str, Any]) -> list[str]:
    g, s = result["goal"], result["serving"]
    d = g.get("difference")
    lines = [f"goal: at teacher cost <= {g['max_teacher_cost']} nats, student loss >= {g['needed_ratio']}x the "
             f"temperature baseline's: {'reached' if g['reached'] else 'not reached'}"
             + (f" (best {g['best_arm']}: {g['best_ratio']:.2f}x, ratio of means, n = {g.get('n', 1)})"
                if g["best_ratio"] is not None else
                f" ({g['best_arm']}: no ratio, the temperature baseline's mean loss is {g['temperature_loss_mean']:+.4f} "
                f"<= 0; read on the paired difference, n = {g.get('n', 1)})" if g.get("best_arm") else
                " (no tilt within the cost bracketed by the temperature arms)")]
    if d and d.get("low") is not None:
        lines.append(f"tilt - temperature at equal cost ({g['best_arm']}): {d['mean']:+.4f} nats, 95 % t-interval "
                     f"[{d['low']:+.4f}, {d['high']:+.4f}] (n = {g['n']}): "
                     + ("excludes 0" if g["difference_excludes_zero"] else "includes 0"))
    m = g.get("margin_3x")
    if m and m.get("low") is not None:
        lines.append(f"tilt - 3 x temperature ({g['best_arm']}): {m['mean']:+.4f} nats, 95 % t-interval [{m['low']:+.4f}, "
                     f"{m['high']:+.4f}] (n = {g['n']}): 3x " + ("established" if g.get("established") else
                                                              "not established at 95 %"))
    best = next((r for r in result.get("by_steps") or [] if r["steps"] == "best"), None)
    if best and best.get("vs_3x_temperature", {}).get("low") is not None:
        d, m = best["vs_temperature"], best["vs_3x_temperature"]
        measured = [r["steps"] for r in result["by_steps"] if r["steps"] != "best"]
        lines.append(f"each student at its lowest held-out NLL over steps {measured} "
                     f"(a distiller who stops early; {best['arm']}): ratio of means "
                     + _f(best.get("ratio_of_means"), "{:.2f}x") + f", tilt - T {_ci(d['mean'], d['low'], d['high'])}, "
                     f"tilt - 3 x T {_ci(m['mean'], m['low'], m['high'])} (n = {best['n']}): 3x "
                     + ("established" if m["low"] > 0 else "not established at 95 %"))
    fo = result.get("first_order")
    if fo:
        lines.append(f"first order ({fo['tokens']} held-out reference tokens): E_ref[Delta] {fo['e_ref_delta']:+.4f}, "
                     f"E_teacher[Delta] {fo['e_teacher_delta']:+.4f}, teacher cost per lambda "
                     f"{fo['teacher_cost_slope']:+.4f}, student loss per lambda ~ {fo['student_loss_slope']:+.4f}")
        for r in fo.get("target_shift") or []:
            lines.append(f"targets' first-order push on the protect loss (E_q[Delta] - E_p[Delta] per position, units of "
                         f"lr x |g| per step) at teacher cost {r['teacher_cost']}: tilt {r['tilt']:+.4f}, temperature "
                         f"{r['temperature_shift']:+.4f}")
    w = result.get("warm")
    if w:
        lines.append(f"warm start: {w['steps']} steps from the clean teacher, student held-out reference NLL "
                     f"{w['student_nll_before']:.4f} -> {w['student_nll']:.4f} (the proxy and every arm's initial student)")
    lines += [f"serving: {s['clean_tokens_per_s']:.1f} tok/s clean"
              + (f", {s['antidistill_tokens_per_s']:.1f} tok/s with anti-distillation ({s['slowdown']:.2f}x slower)"
                 if s["antidistill_tokens_per_s"] else ""),
              g["note"]]
    return lines


def plot(result: dict[str, Any], path: str | Path) -> None:
    """Mean student loss against teacher cost per family, with 95 % t-intervals over seeds when n > 1."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    rows = result["aggregate"]
    clean = next(a for a in rows if a["arm"] == "clean")
    for kind, marker, label in (("lambda", "o", "anti-distillation (lambda)"), ("temperature", "s", "temperature")):
        pts = [a for a in rows if (a["lambda"] > 0 if kind == "lambda" else a["temperature"] != 1.0)]
        pts = sorted([clean] + pts, key=lambda a: a["teacher_cost"])
        ys = [a["student_loss_mean"] for a in pts]
        err = None
        if all(a["student_loss_low"] is not None for a in pts):
            err = [[y - a["student_loss_low"] for a, y in zip(pts, ys, strict=True)],
                   [a["student_loss_high"] - y for a, y in zip(pts, ys, strict=True)]]
        ax.errorbar([a["teacher_cost"] for a in pts], ys, yerr=err, marker=marker, capsize=3, label=label)
        for a in pts[1:]:
            ax.annotate(a["arm"], (a["teacher_cost"], a["student_loss_mean"]), fontsize=7)
    ax.axvline(result["goal"]["max_teacher_cost"], color="grey", ls=":", lw=1)
    ax.axhline(0, color="grey", lw=0.5)
    ax.set_xlabel("teacher cost: held-out reference NLL rise (nats)")
    n = seeds(result)
    ax.set_ylabel("student's reference NLL rise (nats)" + (f", mean, 95 % CI, n = {n}" if n > 1 else ""))
    ax.set_title("anti-distillation vs temperature")
    ax.legend(fontsize=8)
    save_figure(fig, path)


def write_outputs(result: dict[str, Any], out: str | Path) -> None:
    out = Path(out)
    parts = ["# potstill study antidistill", ""]
    if seeds(result) > 1:
        parts += ["## Means over seeds", "", markdown_table(*mean_table(result)), "", "## Per seed", ""]
    parts += [markdown_table(*run_table(result)), ""]
    if result.get("by_steps"):
        parts += ["## By the distiller's training steps", "", markdown_table(*steps_table(result)), ""]
        steps_plot(result, out / "by_steps.png")
    parts += [*(f"- {line}" for line in summary_lines(result)), ""]
    write_text(out / "table.md", "\n".join(parts))
    plot(result, out / "tradeoff.png")
    write_json(out / "results.json", result)
