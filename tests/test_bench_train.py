"""`potstill bench train` on a tiny teacher: both arms (potstill's loop, TRL's GKDTrainer) really train.

Each arm runs a fixed number of steps (the wall-clock budget is set out of reach, so the work does not
depend on the machine's speed) in its own process; the checks are on the JSON's structure and on
numbers that must hold on any CPU: both arms start from the same init (identical held-out KL at t=0,
by the same metric), train > 0 completion tokens, end with a finite held-out KL and get below that
init KL along the way.
"""

from __future__ import annotations

import json
import math
import random

import pytest

from tests.pipeline_fixtures import PROMPTS, gen_cfg

pytest.importorskip("trl")

STEPS = 40  # per arm: enough for both trainers to move the held-out KL below its init


@pytest.fixture(scope="module")
def tiny_capture(tmp_path_factory, tiny_model_dir):
    from potstill.capture.generate import generate

    root = tmp_path_factory.mktemp("bench-train")
    prompts = root / "prompts.jsonl"
    # 72 prompts (54 to train on): with fewer, the tiny student overfits and held-out KL rises.
    words = "red green blue cat dog rain town Paris Rome gravity seven eight nine poem language".split()
    rng = random.Random(0)
    extra = [{"instruction": f"{rng.choice(['Name', 'Explain', 'List', 'Write'])} {' '.join(rng.sample(words, 3))}."}
             for _ in range(60)]
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS + extra))
    out = root / "capture"
    generate(gen_cfg(tiny_model_dir, prompts, out, max_new_tokens=16), log=lambda *_: None)
    return out


@pytest.mark.slow
@pytest.mark.subprocess
def test_bench_train_tiny(tmp_path, tiny_model_dir, tiny_capture):
    from potstill.bench.train import BenchTrainConfig, bench_train, markdown_table

    out = tmp_path / "train.json"
    res = bench_train(BenchTrainConfig(capture=str(tiny_capture), teacher=str(tiny_model_dir), student="prune:depth:0.5",
                                       seconds=3600.0, max_steps=STEPS, eval_every=0.5, lr=1e-3, warmup_steps=2,
                                       batch_size=4, out=str(out)),
                      log=lambda *_: None)
    saved = json.loads(out.read_text())
    assert saved["bench"] == "train" and set(saved["arms"]) == {"potstill", "trl"}
    assert saved["settings"]["trl"]["lmbda"] == 0.0 and saved["settings"]["trl"]["beta"] == 0.5
    assert saved["settings"]["potstill"]["loss"] == "jsd"
    assert saved["student"]["dropped_layers"] is not None and saved["student"]["params"] > 0
    p, t = saved["arms"]["potstill"], saved["arms"]["trl"]
    assert p["init"]["kl"] == pytest.approx(t["init"]["kl"], rel=1e-6)  # same init, same metric
    for arm in (p, t):
        assert arm["steps"] == STEPS and arm["completion_tokens"] > 0 and arm["tokens_per_s"] > 0
        assert 0 < arm["first_step_s"] < arm["train_s"] < 3600.0 and arm["peak_rss_delta_mb"] > 0
        assert arm["cpu_tokens_per_s"] > 0
        # it learned: held-out KL fell below the init at some evaluation (this tiny student can overfit
        # the tiny capture, so the last point may be back above it)
        assert math.isfinite(arm["final"]["kl"]) and min(c["kl"] for c in arm["curve"][1:]) < arm["init"]["kl"]
        assert arm["curve"][0]["t"] == 0.0 and arm["curve"][-1] == arm["final"]
        assert [c["tokens"] for c in arm["curve"]] == sorted(c["tokens"] for c in arm["curve"])
    # the bf16 autocast policy really is the same inside both trainers' forward passes
    assert p["student_lm_head_dtype"] == t["student_lm_head_dtype"] == t["teacher_lm_head_dtype"]
    assert p["student_lm_head_dtype"] == ("bfloat16" if saved["settings"]["common"]["bf16_autocast"] else "float32")
    assert saved["ratios"]["tokens_per_s_potstill_over_trl"] == pytest.approx(p["tokens_per_s"] / t["tokens_per_s"])
    assert (tmp_path / "train.png").stat().st_size > 1000
    assert "| potstill | stored top-k |" in (tmp_path / "train.md").read_text()
    assert "live teacher" in markdown_table(res)
    assert saved["machine"]["cpu_capability"] and isinstance(saved["machine"]["cpu_bf16"], bool)


def test_bench_train_cli_rejects_bad_input(tmp_path):
    from click.testing import CliRunner

    from potstill.cli import app

    r = CliRunner().invoke(app, ["bench", "train", "--capture", str(tmp_path), "--seconds", "1"])
    assert r.exit_code == 2 and "manifest.json" in r.output
    r = CliRunner().invoke(app, ["bench", "train", "--arms", "potstill,deepspeed"])
    assert r.exit_code == 2 and "--arms" in r.output


def test_train_on_step_stops_early(tmp_path, tiny_model_dir, tiny_capture):
    """train(on_step=...) sees every step's metrics and stops (saving the student) when it returns True."""
    from potstill.config import TrainConfig
    from potstill.train.loop import train

    seen = []
    cfg = TrainConfig(capture=str(tiny_capture), out=str(tmp_path / "s"), teacher=str(tiny_model_dir),
                      student="prune:depth:2", max_steps=50, batch_size=4, checkpoint_every=0)
    summary = train(cfg, log=lambda *_: None, on_step=lambda m, _model: seen.append(m) or m["step"] == 3)
    assert [m["step"] for m in seen] == [1, 2, 3] and summary["steps"] == 3
    assert all(m["target_tokens"] > 0 for m in seen)
    assert len((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()) == 3
    assert (tmp_path / "s" / "model.safetensors").exists()


def test_bench_train_caption_names_the_cpu():
    """The table's caption says which CPU kernels ran (AVX2, AVX512, ...) and whether bf16 is native."""
    from potstill.bench.train import _caption

    result = {"budget_s": 60.0, "student": {"spec": "prune:depth:0.5"}, "capture": {"teacher": "t"},
              "settings": {"common": {"loss": "jsd", "batch_size": 4, "bf16_autocast": False}},
              "machine": {"torch_threads": 1, "cpus": 2, "cpu_capability": "AVX2", "cpu_bf16": False}}
    assert "(CPU AVX2, no bf16)" in _caption(result)
    result["machine"].update(cpu_capability="AVX512", cpu_bf16=True)
    assert "(CPU AVX512, bf16)" in _caption(result)
