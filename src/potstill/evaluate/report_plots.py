"""The PNG plots of `potstill report` (matplotlib, Agg backend): each function returns PNG bytes or None.

- training curves: loss, kd, ce, lr, grad_norm against step, one line per trained student;
- eval metrics: teacher and every student of every run, one bar chart per metric;
- quality vs speed and quality vs size over all students, Pareto front marked;
- the teacher's per-token entropy over each capture.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np

from potstill.utils import pyplot

CURVES = [("loss", "loss (total)"), ("kd", "kd term"), ("ce", "ce term"), ("lr", "learning rate"),
          ("grad_norm", "grad norm (before clip)")]
BARS = [("kl", "KL(teacher‖model) ↓", 1.0), ("top1_agreement", "top-1 agreement ↑", 1.0),
        ("nll_teacher_tokens", "NLL teacher text ↓", 1.0), ("nll_reference", "NLL references ↓", 1.0),
        ("size_bytes", "size on disk, MB", 1e-6), ("gen_tokens_per_s", "generation tok/s ↑", 1.0)]


def _text(label: str) -> str:
    """User text for matplotlib: a '$' would start mathtext (and a parse error on an odd label)."""
    return str(label).replace("$", r"\$")


def to_png(fig) -> bytes:
    buf = io.BytesIO()
    # no timestamp or version in the file: the same data gives the same bytes
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    pyplot().close(fig)
    return buf.getvalue()


def training_curves(series: list[tuple[str, list[dict[str, Any]]]]) -> bytes | None:
    """series: (label, metrics.jsonl records) per trained student."""
    series = [(label, recs) for label, recs in series if recs]
    keys = [(k, t) for k, t in CURVES if any(r.get(k) is not None for _, recs in series for r in recs)]
    if not keys:
        return None
    plt = pyplot()
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.2 * rows), squeeze=False)
    for ax, (key, title) in zip(axes.flat, keys, strict=False):
        for label, recs in series:
            pts = [(r["step"], r[key]) for r in recs if r.get(key) is not None]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, label=_text(label), marker="." if len(pts) < 30 else None)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def eval_bars(entries: list[tuple[str, dict[str, Any]]]) -> bytes | None:
    """entries: ("run: model", eval row) for the teacher and every student."""
    keys = [b for b in BARS if any(row.get(b[0]) is not None for _, row in entries)]
    if not keys:
        return None
    plt = pyplot()
    cols = min(3, len(keys))
    rows = -(-len(keys) // cols)
    width = max(4.6, 0.45 * len(entries) + 1.5)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, 3.6 * rows), squeeze=False)
    colors = ["#555555" if row.get("model") == "teacher" else f"C{i % 10}" for i, (_, row) in enumerate(entries)]
    for ax, (key, title, scale) in zip(axes.flat, keys, strict=False):
        vals = [np.nan if row.get(key) is None else row[key] * scale for _, row in entries]
        ax.bar(range(len(entries)), vals, color=colors)
        ax.set_xticks(range(len(entries)), [_text(label) for label, _ in entries], rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    fig.tight_layout()
    return to_png(fig)


def _front_line(ax, xs, ys, on) -> None:
    """Join the front's points in x order (the trade-off curve)."""
    pts = sorted((x, y) for x, y, o in zip(xs, ys, on, strict=True) if o)
    if len(pts) > 1:
        ax.plot(*zip(*pts, strict=True), color="crimson", lw=1, ls="--", zorder=1)


def pareto_plot(points: list[dict[str, Any]], teachers: list[tuple[str, dict[str, Any]]], quality: str,
                quality_label: str) -> bytes | None:
    """Two panels: quality vs generation speed and quality vs size, students' Pareto front in red."""
    panels = [("speed", "gen_tokens_per_s", "generation tok/s (higher is better)", 1.0, "pareto_speed"),
              ("size_bytes", "size_bytes", "size on disk, MB (lower is better)", 1e-6, "pareto_size")]
    panels = [p for p in panels if any(pt.get(p[0]) is not None for pt in points)]
    if not panels:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(6.4 * len(panels), 4.6), squeeze=False)
    for ax, (axis, row_key, xlabel, scale, flag) in zip(axes.flat, panels, strict=True):
        pts = [p for p in points if p.get(axis) is not None]
        xs = [p[axis] * scale for p in pts]
        ys = [p["quality"] for p in pts]
        on = [bool(p.get(flag)) for p in pts]
        ax.scatter([x for x, o in zip(xs, on, strict=True) if not o], [y for y, o in zip(ys, on, strict=True) if not o],
                   c="#7a8ca5", s=40, label="student", zorder=2)
        ax.scatter([x for x, o in zip(xs, on, strict=True) if o], [y for y, o in zip(ys, on, strict=True) if o],
                   c="crimson", s=70, edgecolors="black", label="student on the Pareto front", zorder=3)
        _front_line(ax, xs, ys, on)
        for p, x, y in zip(pts, xs, ys, strict=True):
            ax.annotate(_text(f"{p['run']}: {p['model']}"), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        tx = [(row[row_key] * scale, row[quality]) for _, row in teachers
              if row.get(row_key) is not None and row.get(quality) is not None]
        if tx:
            ax.scatter(*zip(*tx, strict=True), marker="*", s=160, c="#333333", label="teacher", zorder=3)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(quality_label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def entropy_hist(stats: list[tuple[str, np.ndarray]]) -> bytes | None:
    """Histogram of the teacher's per-token entropy (stored top-k + tail), one per capture."""
    stats = [(n, e) for n, e in stats if e.size]
    if not stats:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    top = max(float(e.max()) for _, e in stats)
    bins = np.linspace(0.0, max(top, 1e-3), 40)
    for name, e in stats:
        ax.hist(e, bins=bins, alpha=0.55, label=_text(f"{name} (mean {e.mean():.3f})"), density=True)
    ax.set_xlabel("teacher entropy per completion token, nats (top-k + tail bucket)")
    ax.set_ylabel("density")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return to_png(fig)


def agent_pass_bars(entries: list[tuple[str, dict[str, Any]]]) -> bytes | None:
    """Agent eval: pass@1 with and without the tool per model, with each rate's 95 % interval (Wilson,
    from its own n). entries: (label, agent eval row with 'tool' / 'no_tool' metrics)."""
    entries = [(label, row) for label, row in entries if isinstance(row.get("tool"), dict)]
    if not entries:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.0, 1.1 * len(entries) + 2.0), 3.8))
    x = np.arange(len(entries))
    for j, (mode, name, color) in enumerate((("tool", "with the tool", "C0"), ("no_tool", "without", "C7"))):
        rates, lo, hi, ns = [], [], [], []
        for _, row in entries:
            m = row.get(mode) or {}
            r, ci = m.get("pass@1"), m.get("pass@1_ci95") or [None, None]
            rates.append(np.nan if r is None else r)
            lo.append(0.0 if r is None or ci[0] is None else r - ci[0])
            hi.append(0.0 if r is None or ci[1] is None else ci[1] - r)
            ns.append(m.get("n"))
        pos = x + (j - 0.5) * 0.38
        ax.bar(pos, rates, width=0.36, color=color, label=name, yerr=[lo, hi], capsize=4,
               error_kw={"elinewidth": 1, "ecolor": "#333333"})
        for p, r, n in zip(pos, rates, ns, strict=True):
            if n:
                ax.annotate(f"n={n}", (p, 0 if np.isnan(r) else r), fontsize=7, ha="center", xytext=(0, 2),
                            textcoords="offset points")
    ax.set_xticks(x, [_text(label) for label, _ in entries], rotation=20, ha="right", fontsize=8)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("pass@1 (95 % Wilson interval)")
    ax.set_title("agent eval: held-out tasks, greedy, one episode per task")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return to_png(fig)
