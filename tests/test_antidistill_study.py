"""`potstill study antidistill` over seeds (studies/antidistill.py): the paired aggregation on synthetic arm rows,
and `--warm-steps` / `--seeds` end to end on the tiny teacher."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from potstill.studies.antidistill import AntidistillStudyConfig, summarize
from potstill.studies.antidistill_report import write_outputs
from tests.guard_fixtures import one_torch_thread

PROC = SimpleNamespace(protect_loss=1.0, grad_norm=1.0, protect_count=3)


def arm(name: str, seed: int, lam: float, temp: float, cost: float, nll: float) -> dict:
    return {"arm": name, "seed": seed, "lambda": lam, "temperature": temp, "teacher_cost": cost, "student_nll": nll,
            "gen_tokens_per_s": 10.0}


def synthetic() -> list[dict]:
    """Three seeds, rows shuffled across seeds: clean NLL 2.0 / 2.1 / 1.9; the tilt at cost 0.05 loses 0.3, 0.3,
    0.35; the temperature at cost 0.05 loses 0.1, 0.05, 0.1; a second tilt at cost 0.025 (half way to T) loses 0.2."""
    rows = []
    for seed, clean, tilt, temp in ((0, 2.0, 0.3, 0.1), (1, 2.1, 0.3, 0.05), (2, 1.9, 0.35, 0.1)):
        rows += [arm("T=1.2", seed, 0.0, 1.2, 0.05, clean + temp), arm("lambda=0.1", seed, 0.1, 1.0, 0.05, clean + tilt),
                 arm("lambda=0.05", seed, 0.05, 1.0, 0.025, clean + 0.2), arm("clean", seed, 0.0, 1.0, 0.0, clean)]
    return rows[4:] + rows[:4]


def test_aggregate_pairs_by_seed_with_t_intervals(tmp_path):
    """Losses against each seed's own clean student; the paired difference tilt - T and its t-interval (t(2) =
    4.303); the ratio of means; the goal reads the ratio of means and the interval of the difference."""
    result = summarize(AntidistillStudyConfig(seeds=3), synthetic(), 2.0, PROC)
    rows = {a["arm"]: a for a in result["aggregate"]}
    assert [rows[k]["n"] for k in ("clean", "lambda=0.1", "T=1.2")] == [3, 3, 3]
    assert rows["clean"]["student_loss_mean"] == pytest.approx(0.0, abs=1e-12)
    tilt = rows["lambda=0.1"]
    assert tilt["student_loss_mean"] == pytest.approx(0.95 / 3)
    assert tilt["vs_temperature"]["per_seed"] == pytest.approx([0.2, 0.25, 0.25])
    hw = 4.303 * 0.05 / 3**0.5 / 3**0.5  # sd of (0.2, 0.25, 0.25) = 0.05 / sqrt(3)
    assert tilt["vs_temperature"]["low"] == pytest.approx(0.7 / 3 - hw, abs=1e-3)
    assert tilt["vs_temperature"]["high"] == pytest.approx(0.7 / 3 + hw, abs=1e-3)
    assert tilt["ratio_of_means"] == pytest.approx(0.95 / 0.25)
    half = rows["lambda=0.05"]  # baseline interpolated to half the temperature arm's loss, per seed
    assert half["temperature_loss_mean"] == pytest.approx(0.125 / 3)
    assert half["ratio_of_means"] == pytest.approx(0.2 / (0.125 / 3))  # 4.8x: the best of the two tilts
    g = result["goal"]
    assert g["best_arm"] == "lambda=0.05" and g["best_ratio"] == pytest.approx(4.8) and g["reached"]
    assert g["difference"]["low"] > 0 and g["difference_excludes_zero"] and g["n"] == 3
    write_outputs(result, tmp_path)
    text = (tmp_path / "table.md").read_text()
    assert "Means over seeds" in text and "3.80x" in text and f"[{0.7 / 3 - hw:+.4f}" in text
    assert (tmp_path / "tradeoff.png").stat().st_size > 0


def test_goal_not_reached_when_the_difference_straddles_zero():
    rows = synthetic()
    for a in rows:  # seed 1's tilts now gain 0.3 nats on their clean student
        if a["lambda"] and a["seed"] == 1:
            a["student_nll"] = 2.1 - 0.3
    g = summarize(AntidistillStudyConfig(seeds=3), rows, 2.0, PROC)["goal"]
    assert g["difference"]["low"] < 0 < g["difference"]["high"] and g["difference_excludes_zero"] is False
    assert g["best_arm"] == "lambda=0.1" and g["best_ratio"] == pytest.approx(0.35 / 0.25) and not g["reached"]


def test_by_steps_reads_each_step_and_each_students_best():
    """`by_steps`: the goal's reading after each measured step, and with every student at its own lowest NLL."""
    rows = synthetic()
    for a in rows:  # step 1: every arm 0.1 nats worse than at the end, except seed 0's T student, 0.2 better there
        better = a["arm"] == "T=1.2" and a["seed"] == 0
        a["student_nll_at"] = {"1": a["student_nll"] + (-0.2 if better else 0.1), "2": a["student_nll"]}
    result = summarize(AntidistillStudyConfig(seeds=3, max_steps=2, eval_steps=[1]), rows, 2.0, PROC)
    steps = {r["steps"]: r for r in result["by_steps"]}
    assert list(steps) == [1, 2, "best"]
    assert steps[2]["ratio_of_means"] == pytest.approx(4.8) and steps[2]["arm"] == "lambda=0.05"
    assert steps[2]["temperature"]["mean"] == pytest.approx(0.125 / 3)  # interpolated to the tilt's cost 0.025
    # step 1: T losses -0.2, 0.05, 0.1 (mean <= 0, no ratio); the larger paired difference wins: lambda=0.1
    assert steps[1]["arm"] == "lambda=0.1" and steps[1]["ratio_of_means"] is None
    assert steps[1]["temperature"]["mean"] == pytest.approx(-0.05 / 3)
    assert steps[1]["tilt"]["mean"] == pytest.approx(0.95 / 3)
    # best: seed 0's T student at its step-1 point (1.9 vs clean's best 2.0), everything else at step 2
    assert steps["best"]["arm"] == "lambda=0.05" and steps["best"]["temperature"]["mean"] == pytest.approx(0.025 / 3)
    assert steps["best"]["ratio_of_means"] == pytest.approx(0.2 / (0.025 / 3))
    assert steps["best"]["temperature"]["low"] is not None and steps["best"]["n"] == 3
    from potstill.studies.antidistill_report import summary_lines

    line = next(x for x in summary_lines(result) if x.startswith("each student at its lowest"))
    assert "24.00x" in line and "(n = 3)" in line


def test_eval_steps_must_lie_before_the_last_step():
    from potstill.errors import PotstillError

    with pytest.raises(PotstillError, match="eval_steps"):
        AntidistillStudyConfig(max_steps=20, eval_steps=[10, 20])
    assert AntidistillStudyConfig(max_steps=20, eval_steps=[10, 5, 10]).eval_steps == [5, 10]


def test_one_seed_keeps_its_shape():
    rows = [a for a in synthetic() if a["seed"] == 0]
    result = summarize(AntidistillStudyConfig(), rows, 2.0, PROC)
    tilt = next(a for a in result["arms"] if a["arm"] == "lambda=0.1")
    assert tilt["ratio_vs_temperature"] == pytest.approx(3.0) and result["goal"]["best_ratio"] == pytest.approx(4.0)
    assert result["goal"]["difference_excludes_zero"] is None and result["aggregate"][0]["student_loss_low"] is None


@pytest.mark.slow
def test_warm_start_and_seeds_on_the_tiny_teacher(tmp_path, tiny_model_dir, prompts_file):
    """`--warm-steps 3 --seeds 2`: the saved proxy is the warm model (its held-out NLL is the warm record's, not the
    freshly built one's), the seeds differ and are aggregated, and the first-order slope matches finite differences."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.studies.antidistill import run_antidistill, split_prompts, student_nll

    cfg = AntidistillStudyConfig(teacher=str(tiny_model_dir), prompts=str(prompts_file), out=str(tmp_path / "s"),
                                 target_costs=[0.05], max_prompts=None, heldout=0.3, max_new_tokens=6, max_steps=2,
                                 batch_size=2, top_k=4, warm_steps=3, seeds=2, lr=3e-3, eval_steps=[1],
                                 temperatures=[0.5])  # the tiny teacher: only a cooler one costs (brackets the tilt)
    with one_torch_thread():
        result = run_antidistill(cfg, log=lambda line: None)
        warm = result["warm"]
        assert warm["steps"] == 3 and abs(warm["student_nll"] - warm["student_nll_before"]) > 1e-4
        proxy = AutoModelForCausalLM.from_pretrained(tmp_path / "s" / "proxy", dtype=torch.float32)
        saved = student_nll(proxy, AutoTokenizer.from_pretrained(tmp_path / "s" / "proxy"), split_prompts(cfg)[1])
    assert saved == pytest.approx(warm["student_nll"], abs=1e-4)
    cleans = [a["student_nll"] for a in result["arms"] if a["arm"] == "clean"]
    assert len(cleans) == 2 and cleans[0] != cleans[1]
    rows = {a["arm"]: a for a in result["aggregate"]}
    assert all(a["n"] == 2 and a["student_loss_low"] is not None for a in rows.values())
    assert result["goal"]["n"] == 2 and any(a.get("vs_temperature") for a in rows.values())
    fo = result["first_order"]
    assert fo["teacher_cost_slope"] == pytest.approx(fo["teacher_cost_slope_fd"], rel=0.02, abs=1e-4)
    shift = fo["target_shift"][0]  # an exponential tilt can only raise E[Delta] (d/dlam E_q[Delta] = Var_q(Delta) >= 0)
    assert shift["teacher_cost"] == 0.05 and shift["tilt"] > 0 and shift["temperature_shift"] != 0
    assert "Means over seeds" in (tmp_path / "s" / "table.md").read_text()
    # --eval-steps 1: every student measured after step 1 of its own run too; the final reading is step 2's
    assert all(set(a["student_nll_at"]) == {"1", "2"} and a["student_nll_at"]["2"] == a["student_nll"]
               for a in result["arms"])
    assert any(a["student_nll_at"]["1"] != a["student_nll_at"]["2"] for a in result["arms"])
    assert [r["steps"] for r in result["by_steps"]] == [1, 2, "best"] and result["by_steps"][-1]["n"] == 2
    last = result["by_steps"][1]  # the final step's reading is the aggregate's
    assert last["tilt"]["mean"] == pytest.approx(rows[last["arm"]]["student_loss_mean"])
    assert "By the distiller's training steps" in (tmp_path / "s" / "table.md").read_text()
    assert (tmp_path / "s" / "by_steps.png").stat().st_size > 0


def test_goal_with_a_temperature_baseline_that_loses_nothing():
    """No ratio when the temperature students are not worse on average: the goal reads the paired difference."""
    rows = synthetic()
    for a in rows:
        if a["arm"] == "T=1.2":  # the temperature students lose -0.1, 0.05, 0.0
            a["student_nll"] += {0: -0.2, 1: 0.0, 2: -0.1}[a["seed"]]
    result = summarize(AntidistillStudyConfig(seeds=3), rows, 2.0, PROC)
    g = result["goal"]
    assert g["best_ratio"] is None and g["temperature_loss_mean"] == pytest.approx(-0.05 / 3)
    assert g["best_arm"] == "lambda=0.1" and g["difference"]["low"] > 0 and g["reached"]
    for a in rows:  # seed 0's tilts now gain: the differences' intervals include 0
        if a["lambda"] and a["seed"] == 0:
            a["student_nll"] -= 0.8
    g = summarize(AntidistillStudyConfig(seeds=3), rows, 2.0, PROC)["goal"]
    assert g["difference"]["low"] < 0 and not g["reached"]


def test_margin_over_three_times_temperature_is_paired():
    """The goal's own margin, tilt - 3 x temperature per seed, with its t-interval: 3x is established only when
    the interval is above 0, which the ratio of means (4.8x here) alone does not show."""
    result = summarize(AntidistillStudyConfig(seeds=3), synthetic(), 2.0, PROC)
    half = {a["arm"]: a for a in result["aggregate"]}["lambda=0.05"]
    # per seed: tilt 0.2 against the baseline interpolated to half the T arm's loss (0.05, 0.025, 0.05)
    m = half["vs_3x_temperature"]
    assert m["per_seed"] == pytest.approx([0.05, 0.125, 0.05])
    assert m["low"] == pytest.approx(0.075 - 4.303 * 0.0433 / 3**0.5, abs=1e-3)  # below 0: n = 3 is too few
    g = result["goal"]
    assert g["reached"] and g["margin_3x"] == m and not g["established"]
    rows = synthetic()
    for a in rows:  # every seed's temperature student loses 0.05: margins 0.125, 0.125, 0.125 -> established
        if a["arm"] == "T=1.2":
            a["student_nll"] = {0: 2.0, 1: 2.1, 2: 1.9}[a["seed"]] + 0.05
    g = summarize(AntidistillStudyConfig(seeds=3), rows, 2.0, PROC)["goal"]
    assert g["margin_3x"]["low"] == pytest.approx(0.125) and g["established"]
