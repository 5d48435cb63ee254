"""`potstill report`: two real tiny runs (generate -> train -> eval), rendered, read back, and shown in Chromium.

The runs come from the pipeline on the tiny random teacher (as in test_pipeline.py). Numbers in the
page are checked against eval.json, the capture statistics against an independent read of the
Parquet shards, and the examples' teacher-forced view against eval's own top-1 agreement and NLL.
"""

from __future__ import annotations

import base64
import io
import json
import shutil
import subprocess
from dataclasses import asdict
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from potstill.errors import PotstillError
from tests.browser_fixtures import chromium, headless_flags
from tests.pipeline_fixtures import PROMPTS, gen_cfg, train_cfg

ROOT = Path(__file__).parents[1]
IMAGES = {"plot-eval": "eval_metrics.png", "plot-pareto": "pareto.png", "plot-training": "training_curves.png",
          "plot-entropy": "capture_entropy.png"}
TITLE = "tiny <runs> & \"co\" <script>alert(1)</script>"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model_dir):
    """Run A: fkl, with a student-before baseline; run B: ce. Both on their own capture."""
    from potstill.pipeline import run_recipe

    root = tmp_path_factory.mktemp("report-runs")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    gen = {k: v for k, v in asdict(gen_cfg(tiny_model_dir, prompts, "x")).items() if k != "out"}
    train = {k: v for k, v in asdict(train_cfg("x", "x", checkpoint_every=0)).items()
             if k not in ("capture", "out", "teacher")}
    out = []
    for name, loss, before in (("run-a", "fkl", True), ("run-b", "ce", False)):
        recipe = root / f"{name}.yaml"
        recipe.write_text(yaml.safe_dump({"eval_before": before, "generate": gen, "train": {**train, "loss": loss},
                                          "eval": {"gen_prompts": 2, "gen_tokens": 4}}))
        run_recipe(recipe, [], str(root / name), log=lambda *_: None)
        out.append(root / name)
    return out


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    from potstill.evaluate.report import ReportConfig, build_report

    out = tmp_path_factory.mktemp("report-out")
    result = build_report([str(r) for r in runs], ReportConfig(out=str(out), title=TITLE, examples=20,
                                                              max_new_tokens=6), log=lambda *_: None)
    return out, result


class Page(HTMLParser):
    """Tables (rows of (attrs, text) cells), images and token spans of an HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.imgs, self.spans, self.links = [], [], [], []
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"attrs": a, "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append({"attrs": a, "cells": []})
        elif tag in ("td", "th") and self.tables:
            self._cell = [a, ""]
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "span" and "data-p" in a:
            self.spans.append(a)
        if "href" in a or ("src" in a and tag != "img"):
            self.links.append(a.get("href") or a.get("src"))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1]["cells"].append(tuple(self._cell))
            self._cell = None

    def table(self, cls, run=None):
        return [t for t in self.tables if t["attrs"].get("class") == cls
                and (run is None or t["attrs"].get("data-run") == run)]


def cells_by_key(row):
    return {a["data-key"]: (a.get("data-value"), text) for a, text in row["cells"] if "data-key" in a}


def test_eval_tables_match_eval_json(report, runs):
    out, _ = report
    page = Page((out / "report.html").read_text())
    formats = {"kl": "{:.4f}", "top1_agreement": "{:.3f}", "nll_teacher_tokens": "{:.3f}", "nll_reference": "{:.3f}",
               "params": "{:,}", "gen_tokens_per_s": "{:.1f}"}
    for run in runs:
        ev = json.loads((run / "eval.json").read_text())
        [table] = page.table("eval", run.name)
        body = [r for r in table["rows"] if "data-model" in r["attrs"]]
        assert [r["attrs"]["data-model"] for r in body] == [row["model"] for row in ev["rows"]]
        for tr, row in zip(body, ev["rows"], strict=True):
            cells = cells_by_key(tr)
            for key, fmt in formats.items():
                value, text = cells[key]
                assert float(value) == row[key] and text == fmt.format(row[key]), (run.name, key)
            assert cells["size_bytes"][1] == f"{row['size_bytes'] / 1e6:.1f}"
    assert len(page.table("eval")) == 2 and page.table("pareto") and page.table("training")


def test_images_are_the_written_pngs(report):
    from PIL import Image

    out, result = report
    page = Page((out / "report.html").read_text())
    by_id = {a.get("id"): a for a in page.imgs}
    assert set(IMAGES) <= set(by_id)
    for ident, name in IMAGES.items():
        src = by_id[ident]["src"]
        assert src.startswith("data:image/png;base64,")
        data = base64.b64decode(src.split(",", 1)[1])
        assert data == (out / name).read_bytes() and data[:8] == b"\x89PNG\r\n\x1a\n"
        Image.open(io.BytesIO(data)).verify()
        w, h = Image.open(io.BytesIO(data)).size
        assert w > 300 and h > 200
    assert str(out / "report.html") in result["files"]


def test_self_contained_and_escaped(report):
    out, _ = report
    text = (out / "report.html").read_text()
    page = Page(text)
    assert "<script" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert "tiny &lt;runs&gt; &amp; &quot;co&quot;" in text
    assert all(link.startswith("#") for link in page.links), page.links  # no network, no external files
    assert "http://" not in text and "https://" not in text


def test_capture_stats_from_the_shards(report, runs):
    """Rows, tokens, bytes/token, finish reasons and entropy against pyarrow + torch, read independently."""
    _, result = report
    for run, info in zip(runs, result["runs"], strict=True):
        stats = info["capture"]
        shards = sorted((run / "capture").glob("shard-*.parquet"))
        table = pq.read_table(shards)  # all shards of the directory as one table
        tokens = sum(len(x) for x in table.column("completion_ids").to_pylist())
        assert stats["rows"] == table.num_rows == len(PROMPTS)
        assert stats["completion_tokens"] == tokens
        assert stats["bytes_per_completion_token"] == pytest.approx(sum(s.stat().st_size for s in shards) / tokens)
        reasons = {}
        for r in table.column("finish_reason").to_pylist():
            reasons[r] = reasons.get(r, 0) + 1
        assert stats["finish_reasons"] == reasons

        from potstill.capture.store import Capture
        from potstill.train.data import examples_from_capture

        ents = []
        for ex in examples_from_capture(Capture.open(run / "capture"), split=None, max_seq_len=10_000):
            probs = torch.cat([torch.from_numpy(ex.topk_logprobs).exp(), torch.from_numpy(ex.tail_logprob).exp()[:, None]],
                              dim=1).double()
            ents.append(torch.distributions.Categorical(probs=probs / probs.sum(1, keepdim=True)).entropy())
        assert stats["mean_teacher_entropy"] == pytest.approx(float(torch.cat(ents).mean()), rel=1e-3)


def test_examples_agree_with_eval(report, runs):
    """Teacher-forced examples over all held-out rows reproduce eval.json's top-1 agreement and NLL."""
    out, result = report
    page = Page((out / "report.html").read_text())
    n_spans = 0
    for run, info in zip(runs, result["runs"], strict=True):
        ev = {row["model"]: row for row in json.loads((run / "eval.json").read_text())["rows"]}
        ex = info["examples"]
        assert ex["rows"] and {r["split"] for r in ex["rows"]} == {"heldout"}
        assert [s["label"] for s in ex["students"]] == [m for m in ev if m != "teacher"]
        for st in ex["students"]:
            agree = np.concatenate([r["agree_teacher_top1"] for r in st["rows"]])
            probs = np.concatenate([r["prob"] for r in st["rows"]])
            assert len(agree) == ev[st["label"]]["tokens"]
            assert agree.mean() == pytest.approx(ev[st["label"]]["top1_agreement"], abs=1.5 / len(agree))
            assert -np.log(probs).mean() == pytest.approx(ev[st["label"]]["nll_teacher_tokens"], rel=1e-4)
            n_spans += len(probs)
        for row in ex["rows"]:
            assert "".join(row["pieces"]) == row["teacher_text"]
            n_spans += len(row["pieces"])  # the teacher's own shading
    assert len(page.spans) == n_spans


def test_pareto_front_matches_brute_force():
    from potstill.evaluate.report_data import pareto_front

    assert pareto_front([(1, 1), (2, 0.5), (0.5, 0.5), (2, 2)], (True, True)) == [False, False, False, True]
    assert pareto_front([(100, 0.1), (200, 0.3), (50, 0.2)], (True, False)) == [True, True, False]
    rng = np.random.default_rng(0)
    for _ in range(20):
        pts = rng.integers(0, 5, size=(12, 2)).astype(float)  # ties on purpose
        front = pareto_front([tuple(p) for p in pts], (True, False))
        for i, p in enumerate(pts):
            beaten = any(q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1]) for q in pts)
            assert front[i] == (not beaten)


def test_pareto_points_in_report(report):
    _, result = report
    pts = result["pareto"]
    assert {(p["run"], p["model"]) for p in pts} == {("run-a", "student before"), ("run-a", "student after"),
                                                       ("run-b", "student after")}
    fastest = max(pts, key=lambda p: p["speed"])
    best = min(pts, key=lambda p: p["quality"])
    assert fastest["pareto_speed"] and best["pareto_speed"] and best["pareto_size"]


def test_token_pieces_keep_multibyte_characters(tiny_tokenizer):
    from potstill.evaluate.report_examples import token_pieces

    text = "héllo wörld ✓ rain"
    ids = tiny_tokenizer(text, add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tiny_tokenizer, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == text
    assert "" in pieces  # a character split over byte tokens sits on the token that completes it
    eos = tiny_tokenizer.eos_token_id  # a capture keeps the EOS of a stopped completion: no text of its own
    with_eos = token_pieces(tiny_tokenizer, ids + [eos])
    assert with_eos[-1] == "" and "".join(with_eos) == text


def test_bare_student_eval_and_bad_dirs(runs, tmp_path):
    from potstill.evaluate.report_data import load_run, load_runs

    student = load_run(runs[0] / "student")
    assert student.kind == "student" and student.capture == runs[0] / "capture" and student.students[0].metrics
    bare_eval = tmp_path / "eval-only"
    bare_eval.mkdir()
    shutil.copy(runs[1] / "eval.json", bare_eval / "eval.json")
    ev = load_run(bare_eval)
    assert ev.kind == "eval" and ev.capture == runs[1] / "capture"
    assert [s.label for s in ev.students] == ["student after"] and ev.students[0].path == runs[1] / "student"
    assert load_run(runs[0] / "capture").kind == "capture"
    assert [r.name for r in load_runs([runs[0], runs[0]])] == [f"{runs[0].parent.name}/run-a"] * 1 + [
        f"{runs[0].parent.name}/run-a#2"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(PotstillError, match="empty: not a potstill run"):
        load_run(tmp_path / "empty")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "eval.json").write_text("{nope")
    with pytest.raises(PotstillError, match="eval.json: unreadable JSON"):
        load_run(tmp_path / "broken")


def test_cli_report(runs, tmp_path):
    from click.testing import CliRunner

    from potstill.cli import app

    res = CliRunner().invoke(app, ["report", str(runs[1]), "--out", str(tmp_path / "r"), "--examples", "0"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "report.html").exists() and (tmp_path / "r" / "pareto.png").exists()
    (tmp_path / "nothing").mkdir()
    res = CliRunner().invoke(app, ["report", str(runs[1]), str(tmp_path / "nothing"), "--out", str(tmp_path / "bad")])
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.exit_code == 2 and len(lines) == 1 and str(tmp_path / "nothing") in lines[0], res.stderr
    assert not (tmp_path / "bad").exists()


@pytest.mark.subprocess
def test_report_renders_in_chromium(report, tmp_path):
    from PIL import Image

    exe = chromium()
    out, _ = report
    url = (out / "report.html").resolve().as_uri()
    flags = headless_flags(tmp_path)
    dom = subprocess.run([exe, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=180)
    assert dom.returncode == 0, dom.stderr[-2000:]
    page = Page(dom.stdout)
    ids = {a.get("id") for a in page.imgs if a.get("src", "").startswith("data:image/png;base64,")}
    assert set(IMAGES) <= ids
    assert len(page.table("eval")) == 2 and page.table("pareto") and page.table("training") and page.table("capture")
    assert page.spans  # the shaded tokens survived parsing

    shot = tmp_path / "report.png"
    res = subprocess.run([exe, *flags, f"--screenshot={shot}", "--window-size=1280,4000", url],
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    image = Image.open(shot).convert("RGB")
    assert image.size == (1280, 4000)
    assert len(image.getcolors(maxcolors=1 << 20) or []) > 200  # plots and shading, not a blank page
    try:
        keep = ROOT / "runs" / "test-artefacts"
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep / "report.png")
    except OSError:  # a read-only checkout: the screenshot stays in pytest's tmp dir
        pass


@pytest.mark.subprocess
@pytest.mark.slow
def test_report_on_embedded_teacher(tmp_path):
    """The demo recipe, scaled down, on the real teacher: real text in the examples, numbers consistent with eval."""
    from potstill.evaluate.report import ReportConfig, build_report
    from potstill.pipeline import builtin_recipe, run_recipe

    run = tmp_path / "demo"
    run_recipe(builtin_recipe("demo"), ["generate.max_prompts=16", "generate.max_new_tokens=32",
                                        "generate.heldout=0.25", "train.max_steps=8", "train.checkpoint_every=0",
                                        "train.batch_size=4", "eval.gen_prompts=2", "eval.gen_tokens=8"],
               str(run), log=lambda *_: None)
    out = tmp_path / "report"
    result = build_report([str(run)], ReportConfig(out=str(out), examples=16, max_new_tokens=24), log=lambda *_: None)
    ev = {row["model"]: row for row in json.loads((run / "eval.json").read_text())["rows"]}
    ex = result["runs"][0]["examples"]
    for row in ex["rows"]:
        assert "".join(row["pieces"]) == row["teacher_text"]
    text = " ".join(r["teacher_text"] for r in ex["rows"])
    assert sum(c.isascii() and (c.isalpha() or c.isspace()) for c in text) > 0.8 * len(text)  # words, not bytes
    for st in ex["students"]:
        assert any(r["answer"].strip() for r in st["rows"])
        probs = np.concatenate([r["prob"] for r in st["rows"]])
        assert len(probs) == ev[st["label"]]["tokens"]
        assert -np.log(probs).mean() == pytest.approx(ev[st["label"]]["nll_teacher_tokens"], rel=1e-3)
    prov = Page((out / "report.html").read_text()).table("kv")
    assert any("SmolLM2-135M-Instruct" in text for t in prov for r in t["rows"] for _, text in r["cells"])
    exe = chromium()
    shot = tmp_path / "report.png"
    flags = headless_flags(tmp_path)
    res = subprocess.run([exe, *flags, f"--screenshot={shot}", "--window-size=1280,4000",
                          (out / "report.html").resolve().as_uri()], capture_output=True, text=True, timeout=180)
    assert res.returncode == 0 and shot.exists(), res.stderr[-2000:]
    try:
        keep = ROOT / "runs" / "test-artefacts"
        keep.mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, keep / "report-embedded.png")
    except OSError:
        pass


def test_plot_labels_are_not_mathtext():
    """Run and model names are user text: '$' must not switch matplotlib to (failing) mathtext."""
    from potstill.evaluate.report_plots import eval_bars, training_curves

    name = r"cost $\q{ run$"
    assert training_curves([(name, [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}])])[:4] == b"\x89PNG"
    assert eval_bars([(name, {"model": "teacher", "kl": 0.0}), ("b", {"model": "s", "kl": 0.2})])[:4] == b"\x89PNG"
