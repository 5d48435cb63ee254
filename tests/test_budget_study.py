"""`potstill study budget` on a tiny teacher: arms run as budgeted runs, measured on a held-out set,
Pareto front, outputs, reuse on rerun; and the frozen-embedding training option it compares."""

from __future__ import annotations

import json

import pytest
import yaml

from potstill.errors import PotstillError
from potstill.studies.budget import BudgetConfig, pareto, parse_arm


def test_arm_names_and_budgets_are_checked():
    assert parse_arm("depth14", 3.0) == ("depth14", 3.0)
    assert parse_arm("reference@6", 3.0) == ("reference", 6.0)
    assert parse_arm("reference+lr1e-3@4", 3.0) == ("reference+lr1e-3", 4.0)
    with pytest.raises(PotstillError, match="unknown arm 'lr2'"):
        BudgetConfig(arms=["reference+lr2"])
    with pytest.raises(PotstillError, match="unknown arm 'nope'"):
        BudgetConfig(arms=["nope"])
    with pytest.raises(PotstillError, match="not a number of minutes"):
        BudgetConfig(arms=["jsd@x"])


def test_pareto_front_drops_arms_beaten_on_cost_and_quality():
    rows = [{"arm": "a", "cpu_s": 60, "q": 0.2}, {"arm": "b", "cpu_s": 120, "q": 0.3},
            {"arm": "c", "cpu_s": 120, "q": 0.25}, {"arm": "d", "cpu_s": 180, "q": 0.3}]
    assert pareto(rows, "q") == ["a", "b"]


def test_freeze_embeddings_keeps_the_tied_embedding(tmp_path, tiny_model_dir, prompts_file):
    import torch
    from transformers import AutoModelForCausalLM

    from potstill.capture.generate import generate
    from potstill.train.loop import train
    from tests.pipeline_fixtures import gen_cfg, train_cfg

    cap = tmp_path / "cap"
    generate(gen_cfg(tiny_model_dir, prompts_file, cap), log=lambda *_: None)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    out = {}
    for frozen in (False, True):
        train(train_cfg(cap, tmp_path / f"s{frozen}", teacher=str(tiny_model_dir), student="prune:depth:1", max_steps=3, checkpoint_every=0,
                        freeze_embeddings=frozen), log=lambda *_: None)
        out[frozen] = AutoModelForCausalLM.from_pretrained(tmp_path / f"s{frozen}")
    emb = teacher.get_input_embeddings().weight
    assert torch.equal(out[True].get_input_embeddings().weight, emb)
    assert not torch.equal(out[False].get_input_embeddings().weight, emb)
    # the rest still trains
    name = "model.layers.0.mlp.up_proj.weight"
    assert not torch.equal(dict(out[True].named_parameters())[name], dict(teacher.named_parameters())[name])


@pytest.mark.slow  # ~15-27 s on the 2-core CPU
def test_budget_study_end_to_end_and_reuse(tmp_path, tiny_model_dir, prompts_file):
    from potstill.studies.budget import run_budget

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "generate": {"teacher": str(tiny_model_dir), "prompts": str(prompts_file), "max_new_tokens": 12, "top_k": 8,
                     "heldout": 0.25, "dtype": "float32", "batch_size": 4},
        "train": {"student": "prune:depth:2", "bf16": "off", "calibration": 4, "lr": 1e-2, "warmup_steps": 1},
        "eval": {"gen_prompts": 2, "gen_tokens": 4},
    }))
    cfg = BudgetConfig(minutes=0.2, arms=["depth0.5", "depth0.5+lr1e-3"], recipe=str(recipe), heldout_prompts=str(prompts_file),
                       gen_prompts=3, gen_tokens=6, out=str(tmp_path / "study"))
    result = run_budget(cfg, log=lambda *_: None)
    arms = {r["arm"]: r for r in result["arms"]}
    assert set(arms) == {"depth0.5", "depth0.5+lr1e-3"}
    for r in arms.values():
        assert r["cpu_s"] > 0 and r["wall_s"] > 0 and r["steps"] >= 1
        assert 0 < r["heldout_nll_reference_kept"] and 0 <= r["heldout_top1_agreement"] <= 1
        assert r["params_share"] < 1 and r["loop_rate"] is not None and r["teacher_loop_rate"] is not None
    assert arms["depth0.5"]["student"] == arms["depth0.5+lr1e-3"]["student"] == "prune:depth:0.5"
    assert arms["depth0.5+lr1e-3"]["group"] == "compression+training"
    assert result["pareto"] and set(result["pareto"]) <= set(arms)
    out = tmp_path / "study"
    assert json.loads((out / "results.json").read_text())["arms"][0]["arm"] == "depth0.5"
    assert "Pareto front" in (out / "table.md").read_text()
    assert (out / "quality_vs_cpu.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "teacher" / "teacher.json").exists() and (out / "teacher" / "examples.npz").exists()
    # a rerun reuses the teacher's side and both arms: nothing is trained again
    stamp = (out / "arms" / "depth0.5+lr1e-3" / "student" / "model.safetensors").stat().st_mtime_ns
    from click.testing import CliRunner

    from potstill.cli import app

    res = CliRunner().invoke(app, ["study", "budget", "--minutes", "0.2", "--arms", "depth0.5", "--arms", "depth0.5+lr1e-3",
                                   "--recipe", str(recipe), "--heldout-prompts", str(prompts_file), "--gen-prompts", "3",
                                   "--gen-tokens", "6", "--out", str(out)])  # the same study, through the CLI
    assert res.exit_code == 0, res.output
    assert "potstill study budget" in res.output and "depth0.5+lr1e-3" in res.output and "quality_vs_cpu.png" in res.output
    again = json.loads((out / "results.json").read_text())
    assert [r["cpu_s"] for r in again["arms"]] == [r["cpu_s"] for r in result["arms"]]
    assert again["teacher"] == result["teacher"]
    assert (out / "arms" / "depth0.5+lr1e-3" / "student" / "model.safetensors").stat().st_mtime_ns == stamp
