"""Tables and the plot of `potstill study detect-power` (results.json -> table.md, power.png)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from potstill.studies.common import markdown_table, pyplot, save_figure, write_text


def _p(p: float | None) -> str:
    return "-" if p is None else f"{p:.1e}" if p < 1e-3 else f"{p:.3f}"


def power_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """One row per (loss, served tokens, step): the green-mass p-value beside the argmax one."""
    heads = ["loss", "served tokens", "steps", "contexts", "green mass", "z (calibrated)", "p (mass)",
             "rank p", "argmax pairs", "p (argmax)"]
    rows = [[s["loss"], s["served_tokens"], s["step"], s["n_contexts"], f"{s['green_mass']:.3f}",
             f"{s['z_calibrated']:.1f}", _p(s["p_value"]), _p(s["p_rank"]), s["argmax_pairs"], _p(s["argmax_p"])]
            for s in sorted(result["settings"], key=lambda s: (s["loss"], s["served_tokens"], s["step"]))]
    return heads, rows


def control_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    heads = ["control", "suspect", "contexts", "z (calibrated)", "p (mass)", "p (argmax)"]
    rows = [[c["control"] + (f" #{c['key_index']}" if "key_index" in c else ""), c.get("suspect", ""), c["n_contexts"],
             f"{c['z_calibrated']:.2f}", _p(c["p_value"]), _p(c["argmax_p"])] for c in result["controls"]]
    return heads, rows


def summary_lines(result: dict[str, Any]) -> list[str]:
    lines = []
    ppl = result.get("perplexity")
    if ppl:
        w, c = ppl["watermarked"], ppl["unwatermarked"]
        lines.append(f"watermark (gamma {ppl['gamma']}, delta {ppl['delta']}) perplexity under the clean teacher: "
                     f"{w['ppl']:.2f} [{w['ppl_lo']:.2f}, {w['ppl_hi']:.2f}] vs {c['ppl']:.2f} "
                     f"[{c['ppl_lo']:.2f}, {c['ppl_hi']:.2f}] unwatermarked (90% bootstrap, {ppl['rows']} completions each): "
                     f"{ppl['cost']:+.1%}")
    def need(n: int | None) -> str:
        return f"from {n} served tokens" if n else "at no budget tried"

    for t in result.get("tokens_needed", []):
        lines.append(f"{t['loss']} at {t['step']} steps: p < {t['alpha']:g} {need(t['tokens_needed'])} "
                     f"(argmax: {need(t['argmax_tokens_needed'])})")
    ctrl = result.get("controls", [])
    if ctrl:
        low = min(c["p_value"] for c in ctrl)
        lines.append(f"{len(ctrl)} null controls: smallest p {low:.3f}; {sum(c['p_value'] < 0.01 for c in ctrl)} below 0.01")
    return lines


def _curves(ax, settings: list[dict[str, Any]], loss: str, by: str, x: str, label: str) -> None:
    """One solid (green mass) and one dashed (argmax) log10-p curve against `x` per value of `by`."""
    for g in sorted({s[by] for s in settings}):
        pts = sorted((s[x], s["log10_p"], s["argmax_log10_p"]) for s in settings if s["loss"] == loss and s[by] == g)
        if pts:
            line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{loss}, {g} {label} (mass)")
            ax.plot([p[0] for p in pts], [p[2] for p in pts], marker="x", ls="--", color=line.get_color(), alpha=0.5)


def power_plot(result: dict[str, Any], path: str | Path) -> None:
    """log10 p against served tokens (one line per loss and step) and against steps (one per loss and budget)."""
    plt = pyplot()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    settings = result["settings"]
    for loss in sorted({s["loss"] for s in settings}):
        _curves(ax, settings, loss, "step", "served_tokens", "steps")
        _curves(bx, settings, loss, "served_tokens", "step", "tokens")
    for a in (ax, bx):
        a.axhline(-6, color="k", lw=0.8, ls=":")
        a.set_xscale("log")
        a.set_ylabel("log10 p (solid: green mass, dashed: argmax)")
        a.legend(fontsize=7)
    ax.set_xlabel("served watermarked tokens the distiller trained on")
    bx.set_xlabel("distiller's optimizer steps")
    save_figure(fig, path)


def write_outputs(result: dict[str, Any], out: str | Path) -> None:
    out = Path(out)
    parts = ["# potstill study detect-power", "", markdown_table(*power_table(result)), "",
             markdown_table(*control_table(result)), "", *[f"- {line}" for line in summary_lines(result)], ""]
    write_text(out / "table.md", "\n".join(parts))
    if result["settings"]:
        power_plot(result, out / "power.png")
