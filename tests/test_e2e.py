"""End-to-end with the real embedded teacher (SmolLM2-135M-Instruct): the demo recipe, scaled down."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def test_demo_recipe_small(tmp_path):
    run = tmp_path / "demo"
    cmd = [
        sys.executable, "-m", "potstill.cli", "demo", "--run-dir", str(run), "--minutes", "0",  # the recipe as set
        # sized for a 2-core CPU without bf16: ~900 captured tokens, 16 steps of 4 rows (a few minutes)
        "--set", "generate.max_prompts=24", "--set", "generate.max_new_tokens=32",
        "--set", "generate.heldout=0.25",
        "--set", "train.max_steps=16", "--set", "train.batch_size=4", "--set", "train.warmup_steps=2",
        "--set", "train.checkpoint_every=8",
        "--set", "eval.gen_prompts=4", "--set", "eval.gen_tokens=16",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "student after" in proc.stdout
    result = json.loads((run / "eval.json").read_text())
    rows = {r["model"]: r for r in result["rows"]}
    teacher, before, after = rows["teacher"], rows["student before"], rows["student after"]
    assert after["kl"] < before["kl"]
    assert after["top1_agreement"] > before["top1_agreement"]
    assert after["nll_teacher_tokens"] < before["nll_teacher_tokens"]
    assert after["params"] < teacher["params"]
    manifest = json.loads((run / "capture" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["teacher"]["name"] == "SmolLM2-135M-Instruct"
    prov = json.loads((run / "student" / "provenance.json").read_text())
    assert len(prov["student"]["dropped_layers"]) == 16  # prune:depth:14 keeps 14 of the 30 layers
    assert (run / "student" / "model.safetensors").exists()
    assert Path(run / "eval.md").read_text().count("|") > 10
