"""`potstill report RUN_DIR [RUN_DIR ...] --out DIR`: one self-contained HTML page over one or more runs.

    potstill report runs/demo runs/other --out runs/report

Reads run directories (report_data.py), runs each student teacher-forced on a few held-out capture
rows (report_examples.py), draws the plots (report_plots.py) and writes, each atomically:
report.html (inline CSS, plots as base64 PNG, opens offline), the PNGs, and report.json.
"""

from __future__ import annotations

import platform
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import potstill
from potstill.evaluate.report_config import ReportConfig
from potstill.evaluate.report_data import (
    Run,
    capture_stats,
    load_runs,
    student_points,
    student_provenance,
)
from potstill.utils import atomic_path, sha256_file, write_json

QUALITY_LABELS = {"kl": "KL(teacher‖student) ↓", "top1_agreement": "top-1 agreement ↑",
                  "nll_teacher_tokens": "NLL of teacher text ↓", "nll_reference": "NLL of references ↓"}


def _versions() -> dict[str, str]:
    out = {"potstill": potstill.__version__, "python": platform.python_version()}
    for name in ("torch", "transformers", "pyarrow", "matplotlib"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:  # pragma: no cover - all are dependencies
            pass
    return out


def _provenance(run: Run) -> dict[str, Any]:
    prov: dict[str, Any] = {"kind": run.kind, "path": str(run.path), "recipe": run.recipe_text}
    if run.capture is not None:
        prov.update(capture=str(run.capture), manifest=run.manifest,
                    manifest_sha256=sha256_file(run.capture / "manifest.json"))
    prov["students"] = []
    for st in run.students:
        s = student_provenance(run, st)
        s["train_config"] = st.train_config or (st.provenance or {}).get("train_config")
        prov["students"].append(s)
    if run.eval is not None:
        prov.update(eval_path=str(run.eval_path), eval_config=run.eval.get("config"))
    return prov


def build_report(run_dirs: list[str], cfg: ReportConfig, log=print) -> dict[str, Any]:
    """Read the runs, compute, plot, write; returns report.json's content plus the files written."""
    from potstill.evaluate import report_html as H
    from potstill.evaluate import report_plots as P
    from potstill.evaluate.report_examples import run_examples
    from potstill.utils import quiet_transformers

    t0 = time.perf_counter()
    runs = load_runs(run_dirs)
    quiet_transformers()
    log(f"report: {len(runs)} run(s): " + ", ".join(f"{r.name} ({r.kind})" for r in runs))

    stats = {r.name: capture_stats(r.capture) for r in runs if r.capture is not None}
    examples = {}
    for i, r in enumerate(runs, 1):
        log(f"report: examples {i}/{len(runs)}: {r.name}")
        examples[r.name] = run_examples(r, cfg.examples, cfg.max_new_tokens, cfg.split, log=log)
    points = student_points(runs, cfg.quality)
    teachers = [(r.name, row) for r in runs for row in (r.eval or {}).get("rows", []) if row.get("model") == "teacher"]
    series = [(f"{r.name}: {st.label}", st.metrics) for r in runs for st in r.students if st.metrics]
    bars = [(f"{r.name}: {row['model']}", row) for r in runs for row in (r.eval or {}).get("rows", [])]
    quality_label = QUALITY_LABELS[cfg.quality]
    pngs = {
        "training_curves.png": P.training_curves(series),
        "eval_metrics.png": P.eval_bars(bars),
        "pareto.png": P.pareto_plot(points, teachers, cfg.quality, quality_label),
        "capture_entropy.png": P.entropy_hist([(n, s["_entropies"]) for n, s in stats.items()]),
        "agent_pass_at_1.png": P.agent_pass_bars([(f"{r.name}: {row['model']}", row) for r in runs
                                                  for row in (r.agent_eval or {}).get("rows", [])]),
    }
    log(f"report: plots drawn ({time.perf_counter() - t0:.1f}s)")

    evals = "".join(f"<h3>{H.esc(r.name)}</h3>" + H.eval_table(r.name, r.eval["rows"]) for r in runs if r.eval)
    no_eval = [r.name for r in runs if not r.eval and not r.agent_eval]
    if no_eval:
        evals += f'<p class="small">no eval.json for: {H.esc(", ".join(no_eval))}</p>'
    comparable = "" if len({r.capture.resolve() if r.capture else None for r in runs}) <= 1 else (
        '<p class="small">the runs were measured on different captures: fidelity numbers compare students '
        "with their own run's teacher and held-out split</p>")
    agents = [r for r in runs if r.agent_eval]
    sections = [
        *([("agents", "Agents", H.agent_section([(r.name, r.agent_eval) for r in agents])
            + H.img(pngs["agent_pass_at_1.png"], "plot-agents", "agent pass@1 with and without the tool"))]
          if agents else []),
        ("eval", "Teacher vs students", (evals or '<p class="small">(no eval results)</p>')
         + H.img(pngs["eval_metrics.png"], "plot-eval", "eval metrics per model")),
        ("pareto", "Quality vs speed and size",
         f'<p class="small">every evaluated student of every run; red: the Pareto front (no other student is both '
         f'at least as good on {H.esc(quality_label)} and at least as fast / as small); stars: teachers</p>'
         + comparable + H.img(pngs["pareto.png"], "plot-pareto", "quality vs speed and size")
         + H.pareto_table(points, quality_label)),
        ("training", "Training curves", H.img(pngs["training_curves.png"], "plot-training", "training curves")
         + H.training_table(series)),
        ("examples", "Examples",
         '<p class="small">held-out prompts; every teacher token is shaded by the probability the model gives it '
         'when fed the teacher\'s answer (teacher-forced): <span class="legend"></span> 0 → 1; underlined: it is '
         "the model's top-1 token there. Hover a token for its probability.</p>"
         + "".join(f"<h3>{H.esc(n)}</h3>" + H.examples_section(n, ex) for n, ex in examples.items())),
        ("capture", "Capture", (H.capture_table(list(stats.items())) if stats else "<p>(no capture found)</p>")
         + '<p class="small">bytes per completion token: all shard files on disk / completion tokens. Entropy: over '
         "the stored top-k plus one tail bucket (a lower bound on the teacher's full entropy).</p>"
         + H.img(pngs["capture_entropy.png"], "plot-entropy", "teacher entropy per token")),
        ("provenance", "Provenance", "".join(H.provenance_section(r.name, _provenance(r)) for r in runs)
         + "<h3>this report</h3>" + H.kv_table(list(_versions().items()))),
    ]
    created = time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime())
    meta = (f"generated {H.esc(created)} by potstill {H.esc(potstill.__version__)} from "
            + ", ".join(f"<code>{H.esc(r.path)}</code>" for r in runs))
    html = H.page(cfg.title, meta, sections)

    result = {
        "created": created,
        "config": asdict(cfg),
        "runs": [{"name": r.name, "path": str(r.path), "kind": r.kind,
                  "eval_rows": (r.eval or {}).get("rows"),
                  "agent_eval_rows": (r.agent_eval or {}).get("rows"),
                  "capture": {k: v for k, v in stats[r.name].items() if not k.startswith("_")} if r.name in stats else None,
                  "students": [s.label for s in r.students],
                  "examples": examples[r.name]} for r in runs],
        "pareto": points,
        "versions": _versions(),
    }
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, png in pngs.items():
        if png is not None:
            with atomic_path(out / name) as tmp:
                tmp.write_bytes(png)
            written.append(str(out / name))
        elif (out / name).exists():  # a plot from an earlier report that this one does not have
            (out / name).unlink()
    write_json(out / "report.json", result)
    with atomic_path(out / "report.html") as tmp:  # last: a report.html is only there once all else is
        tmp.write_text(html, encoding="utf-8")
    written += [str(out / "report.json"), str(out / "report.html")]
    log(f"report: wrote {out / 'report.html'} ({len(html) / 1e6:.1f} MB) in {time.perf_counter() - t0:.1f}s")
    return {**result, "files": written}
