"""Time-budgeted runs: the sizing math on fake rates, the deadlines, a capture cut short, a tiny budgeted run."""

from __future__ import annotations

import json

import pytest
import yaml

from potstill.plan import MAX_EPOCHS, Deadline, Rates, Workload, format_plan, resize_train, size_plan
from tests.pipeline_fixtures import PROMPTS, gen_cfg

# about this CPU (2 cores, fp32): the embedded teacher and the half-depth student
SLOW = Rates(decode_tok_s=40, prefill_tok_s=600, train_tok_s=140, load_s=6, build_s=8, decode_batch=32)


def workload(**kw) -> Workload:
    base = dict(prompts_available=175, prompt_tokens=85, reference_tokens=60, heldout=0.15, max_new_tokens=96,
                gen_batch=32, train_batch=8, warmup_steps=8, calibration=32, gen_prompts=16, gen_tokens=48,
                eval_models=3, pinned={})
    base.update(kw)
    return Workload(**base)


def faster(r: Rates, x: float) -> Rates:
    return Rates(r.decode_tok_s * x, r.prefill_tok_s * x, r.train_tok_s * x, r.load_s / x, r.build_s / x, r.decode_batch)


def steps_of(plan):
    return plan["overrides"]["train"]["max_steps"]


@pytest.mark.parametrize("minutes", [3, 10, 30])
def test_plan_fits_the_budget(minutes):
    plan = size_plan(SLOW, workload(), minutes * 60, spent_s=20)
    assert plan["total_est_s"] <= minutes * 60 * (1 - plan["margin"]) + 1
    assert plan["total_est_s"] >= 0.5 * minutes * 60  # and uses it: not an early finish
    assert {s["stage"] for s in plan["stages"]} == {"generate", "build student", "train", "eval"}
    assert "generate" in format_plan(plan) and "est s" in format_plan(plan)


def test_slow_machine_shortens_completions_and_batch_before_starving_training():
    plan = size_plan(SLOW, workload(), 3 * 60, spent_s=20)
    gen, train = plan["overrides"]["generate"], plan["overrides"]["train"]
    assert gen["max_new_tokens"] < 96
    assert steps_of(plan) >= 8 or train["batch_size"] == 2
    assert train["checkpoint_every"] == 0 and 1 <= train["warmup_steps"] <= max(1, steps_of(plan) // 10)


def test_faster_machine_gets_a_bigger_run():
    small = size_plan(SLOW, workload(), 600, spent_s=20)
    big = size_plan(faster(SLOW, 4), workload(), 600, spent_s=5)
    g_small, g_big = small["overrides"]["generate"], big["overrides"]["generate"]
    work_small = g_small["max_prompts"] * g_small["max_new_tokens"]
    work_big = g_big["max_prompts"] * g_big["max_new_tokens"]
    assert work_big > work_small
    assert steps_of(big) * big["overrides"]["train"]["batch_size"] > steps_of(small) * small["overrides"]["train"]["batch_size"]


def test_very_fast_machine_stops_at_max_epochs():
    plan = size_plan(faster(SLOW, 1000), workload(), 600)
    g, t = plan["overrides"]["generate"], plan["overrides"]["train"]
    assert g["max_prompts"] == 175 and g["max_new_tokens"] == 96
    train_rows = 175 - round(175 * 0.15)
    assert steps_of(plan) == int(MAX_EPOCHS * train_rows / t["batch_size"])


def test_pinned_fields_are_kept():
    pinned = {"generate.max_prompts": 24, "generate.max_new_tokens": 32, "train.max_steps": 16,
              "train.batch_size": 4, "eval.gen_prompts": 4}
    plan = size_plan(SLOW, workload(pinned=pinned), 600)
    ov = plan["overrides"]
    assert ov["generate"]["max_prompts"] == 24 and ov["generate"]["max_new_tokens"] == 32
    assert ov["train"]["max_steps"] == 16 and ov["train"]["batch_size"] == 4 and ov["eval"]["gen_prompts"] == 4


def test_deadline_train_stop_with_a_fake_clock():
    now = [0.0]
    deadline = Deadline(10.0, clock=lambda: now[0])
    stop = deadline.train_stop()
    now[0] = 3.0
    assert stop({"step": 1}, None) is False  # 3 s a step, next ends at 6
    now[0] = 6.0
    assert stop({"step": 2}, None) is False  # next ends at 9
    now[0] = 9.0
    assert stop({"step": 3}, None) is True  # next would end at 12 > 10


def test_generate_stopped_early_is_complete_for_what_it_has(tmp_path, tiny_model_dir, prompts_file):
    from potstill.capture.generate import generate
    from potstill.capture.store import Capture

    out = tmp_path / "cut"
    asked = []

    def stop(next_rows, done):
        asked.append(done)
        return done >= 8

    manifest = generate(gen_cfg(tiny_model_dir, prompts_file, out, shard_rows=4), log=lambda *_: None, should_stop=stop)
    assert asked == [4, 8]  # asked before each window after the first
    cap = Capture.open(out)  # complete: opens without allow_incomplete
    assert len(cap) == 8 < len(PROMPTS)
    assert manifest["complete"] and manifest["prompts"]["count"] == 8 and manifest["prompts"]["planned"] == len(PROMPTS)


def test_budgeted_run_on_tiny_model(tmp_path, tiny_model_dir, prompts_file):
    from potstill.pipeline import run_budgeted

    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"), "eval_before": True,
        "generate": {"teacher": str(tiny_model_dir), "prompts": str(prompts_file), "max_new_tokens": 12, "top_k": 8,
                     "heldout": 0.25, "dtype": "float32", "batch_size": 4},
        "train": {"student": "prune:depth:2", "bf16": "off", "calibration": 4, "lr": 1e-2},
        "eval": {"gen_prompts": 2, "gen_tokens": 4},
    }))
    minutes = 0.25
    result = run_budgeted(recipe, minutes, ["train.warmup_steps=2"], log=lambda *_: None)
    plan = json.loads((tmp_path / "run" / "plan.json").read_text())
    assert plan["overrides"]["train"]["warmup_steps"] == 2  # pinned
    assert set(plan["actual_s"]) == {"measure", "generate", "build student", "train", "eval", "total"}
    assert set(plan["measure_parts_s"]) == {"setup_s", "teacher_load_s", "probes_s"}
    # kept to its plan (wall-clock on a shared CPU is noisy: a gross overrun only, e.g. a stage ignoring the plan)
    assert plan["actual_s"]["total"] <= 3 * max(plan["total_est_s"], minutes * 60)
    assert plan["capture_rows"] == result["capture"]["counts"]["rows"] <= plan["overrides"]["generate"]["max_prompts"]
    resized = plan["train_resized"]  # sized again on the capture it got
    assert resized["planned_steps"] == plan["overrides"]["train"]["max_steps"]
    assert 1 <= plan["train_steps_done"] <= resized["max_steps"]
    rows = {r["model"]: r for r in result["eval"]["rows"]}
    assert set(rows) == {"teacher", "student before", "student after"}
    assert (tmp_path / "run" / "recipe.budgeted.yaml").exists()


@pytest.mark.parametrize("n", [1, 2, 3, 7, 12, 175])
@pytest.mark.parametrize("fraction", [0.0, 0.15, 0.25, 0.5])
def test_heldout_rows_counts_as_assign_split(n, fraction):
    from potstill.capture.prompts import Prompt, assign_split
    from potstill.plan import heldout_rows

    prompts = [Prompt([{"role": "user", "content": f"p{i}"}]) for i in range(n)]
    assert heldout_rows(n, fraction) == assign_split(prompts, fraction, seed=0).count("heldout")


def test_too_slow_machine_still_plans_a_valid_run():
    crawl = faster(SLOW, 0.1)  # ten times slower: a busy shared machine
    plan = size_plan(crawl, workload(), 180, spent_s=200)
    ov = plan["overrides"]
    assert ov["generate"]["max_prompts"] >= 2 and ov["train"]["max_steps"] >= 1 and ov["eval"]["max_rows"] >= 1
    assert ov["train"]["calibration"] == 8
    assert "too slow" in format_plan(plan)
    assert "too slow" not in format_plan(size_plan(SLOW, workload(), 600, spent_s=20))


def test_student_shaped_has_the_pruned_students_shape(tiny_model_dir):
    from potstill.plan import student_shaped
    from potstill.students import build_student

    shaped = student_shaped("prune:depth:0.5", tiny_model_dir)
    real = build_student("prune:depth:0.5", tiny_model_dir, [[1, 2, 3, 4]])[0]
    assert shaped.config.num_hidden_layers == real.config.num_hidden_layers == 2
    assert sum(p.numel() for p in shaped.parameters()) == sum(p.numel() for p in real.parameters())
    assert student_shaped("prune:width:0.5", tiny_model_dir) is None


def test_decode_time_charges_small_batches_as_the_probes():
    from potstill.plan import decode_s

    # a 32-row probe at 40 tok/s: a step takes 0.8 s whether it decodes 2 rows or 32
    assert decode_s(2, 24, 32, SLOW) == pytest.approx(decode_s(16, 24, 32, SLOW)) == pytest.approx(24 * 32 / 40)
    assert decode_s(64, 10, 32, SLOW) == pytest.approx(2 * 10 * 32 / 40)  # two waves of 32


def test_plan_charges_the_heldout_set_and_still_fits():
    """eval's held-out quality set (builtin:heldout_v1: ~3,900 prompt + answer tokens) is read by every model and
    scored once by the teacher: the plan charges it to eval (fewer capture rows, a larger eval) and trains less,
    within the same budget."""
    plain = size_plan(SLOW, workload(), 600, spent_s=20)
    held = size_plan(SLOW, workload(heldout_set_tokens=3900), 600, spent_s=20)
    est = {p: {s["stage"]: s["est_s"] for s in x["stages"]} for p, x in (("plain", plain), ("held", held))}
    assert est["held"]["eval"] > est["plain"]["eval"]
    assert held["overrides"]["eval"]["max_rows"] < plain["overrides"]["eval"]["max_rows"]
    assert steps_of(held) < steps_of(plain)
    assert held["total_est_s"] <= 600 * (1 - held["margin"]) + 1


def test_heldout_set_is_skipped_where_it_would_eat_the_budget():
    """On a machine whose prefill is 5x slower the held-out set would take ~4 x 3,900 / 120 = 130 s of a
    10-minute budget: the plan skips it, says so, and trains instead; a pinned set is kept whatever it costs."""
    crawl = Rates(decode_tok_s=20, prefill_tok_s=120, train_tok_s=70, load_s=6, build_s=8, decode_batch=32)
    held = size_plan(crawl, workload(heldout_set_tokens=3900), 600, spent_s=20)
    assert held["overrides"]["eval"]["heldout_prompts"] is None
    assert "held-out quality set skipped" in next(s["work"] for s in held["stages"] if s["stage"] == "eval")
    kept = size_plan(SLOW, workload(heldout_set_tokens=3900), 600, spent_s=20)
    assert "heldout_prompts" not in kept["overrides"]["eval"]  # a normal machine keeps it
    pinned = size_plan(crawl, workload(heldout_set_tokens=3900, pinned={"eval.heldout_prompts": "builtin:heldout_v1"}),
                       600, spent_s=20)
    assert pinned["overrides"]["eval"]["heldout_prompts"] == "builtin:heldout_v1"
    assert steps_of(held) > steps_of(pinned)  # the time it frees goes to training


def test_teacher_forcing_is_planned_at_prefill_speed():
    """--answers reference scores the references (no decoding): the same budget takes more prompts and more answer
    tokens, and the completion length is the references' (not a sampling length the plan could shorten)."""
    sampled = size_plan(SLOW, workload(), 300, spent_s=20)
    forced = size_plan(SLOW, workload(teacher_forcing=True), 300, spent_s=20)
    gen = {k: x["overrides"]["generate"] for k, x in (("s", sampled), ("f", forced))}
    assert gen["f"]["max_prompts"] > gen["s"]["max_prompts"]
    assert gen["f"]["max_prompts"] * 60 > 1.5 * gen["s"]["max_prompts"] * gen["s"]["max_new_tokens"]
    assert gen["f"]["max_new_tokens"] == 60  # the mean reference length of workload()
    assert "teacher forcing" in format_plan(forced)
    assert forced["total_est_s"] <= 300 * (1 - forced["margin"]) + 1


def test_training_resized_on_the_capture_it_got():
    """Completions that end before max_new_tokens leave time: training gets it (at the same train rate), at most
    MAX_EPOCHS passes; time already gone gives fewer steps; the plan's table says so."""
    plan = size_plan(SLOW, workload(), 600)
    planned, b = steps_of(plan), plan["overrides"]["train"]["batch_size"]
    train_est = next(s["est_s"] for s in plan["stages"] if s["stage"] == "train")
    full = 85 + 96  # what the plan assumed per row
    counts = {"splits": {"train": {"rows": 100, "prompt_tokens": 85 * 100, "completion_tokens": 40 * 100}}}
    r = resize_train(plan, counts, train_est)
    assert r["tokens_per_row"] == 125 and r["max_steps"] > planned
    assert r["max_steps"] == pytest.approx(planned * full / 125, abs=2)
    assert r["est_s"] <= train_est + 1e-6
    assert resize_train(plan, counts, train_est / 4)["max_steps"] < planned
    assert resize_train(plan, counts, 0.0)["max_steps"] == 1
    assert resize_train(plan, counts, 1e9)["max_steps"] == int(MAX_EPOCHS * 100 / b)
    assert resize_train(plan, {"splits": {}}, train_est) is None
    plan["train_resized"] = r
    assert f"{planned} -> {r['max_steps']} steps" in format_plan(plan)
