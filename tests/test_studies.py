"""Studies: the statistics on hand-made curves, and both studies end to end on tiny random models."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from potstill.studies.collapse import (
    CollapseConfig,
    completions,
    distinct_n,
    equal_token_distinct,
    run_collapse,
    truncate_to_tokens,
)
from potstill.studies.stats import (
    percentile_with_inf,
    t_interval,
    t_quantile_975,
    token_ratio,
    tokens_to_reach,
)
from potstill.studies.transfer import TransferConfig, run_transfer

PNG = b"\x89PNG\r\n\x1a\n"

PROMPTS = [
    ("Name the capital of France.", "The capital of France is Paris."),
    ("Name the capital of Italy.", "Rome is the capital of Italy."),
    ("Write a short poem about rain.", "Rain falls on the quiet town."),
    ("Explain gravity in one sentence.", "Masses attract each other."),
    ("List three colors.", "Red, green and blue."),
    ("Name two animals.", "A cat and a dog."),
    ("Count from one to five.", "One two three four five."),
    ("How do I learn a new language?", "Practice every day."),
    ("Summarize: the rain fell all day.", "It rained all day."),
    ("What comes after six?", "Seven comes after six."),
    ("Say something about Paris in spring.", "Paris is lovely in spring."),
    ("Give one word for a big cat.", "Lion."),
]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"instruction": q, "output": a}) + "\n" for q, a in PROMPTS))
    return str(path)


def test_t_interval_matches_hand_computation():
    stat = t_interval([1.0, 2.0, 3.0])
    assert stat["mean"] == 2.0 and stat["sd"] == pytest.approx(1.0)
    assert stat["half_width"] == pytest.approx(4.303 / math.sqrt(3))
    assert t_interval([5.0])["half_width"] is None
    assert t_quantile_975(31) == pytest.approx(2.0395, abs=2e-4)  # expansion beyond the table
    assert t_quantile_975(120) == pytest.approx(1.9799, abs=2e-4)


def test_tokens_to_reach_interpolates_in_log_tokens():
    # 5 -> 3 between 1e3 and 1e4 tokens: the value 4 is halfway in log-tokens, at sqrt(1e7)
    assert tokens_to_reach([1e3, 1e4], [5.0, 3.0], 4.0) == (pytest.approx(math.sqrt(1e7)), "interpolated")
    assert tokens_to_reach([1e3, 1e4], [5.0, 3.0], 3.5)[0] == pytest.approx(10 ** 3.75)
    assert tokens_to_reach([1e3, 1e4, 1e5], [6.0, 5.0, 4.0], 4.0) == (pytest.approx(1e5), "interpolated")
    assert tokens_to_reach([1e3, 1e4], [2.0, 1.0], 4.0) == (1e3, "at_or_before_first")
    assert tokens_to_reach([1e3, 1e4], [6.0, 5.0], 4.0) == (None, "not_reached")


def test_token_ratio_on_hand_made_curves():
    budgets = np.array([1e3, 1e4, 1e5])
    scratch = np.array([6.0, 5.0, 4.0])
    kd = np.array([5.0, 4.0, 3.0])  # reaches scratch's best (4.0) at 1e4: a tenth of the tokens
    tokens = np.tile(budgets, (3, 1))
    r = token_ratio(tokens, np.tile(kd, (3, 1)), tokens, np.tile(scratch, (3, 1)), n_boot=200)
    assert r["target"] == 4.0 and r["tokens"] == pytest.approx(1e4) and r["reference_tokens"] == pytest.approx(1e5)
    assert r["ratio"] == pytest.approx(0.1) and r["n"] == 3 and r["per_seed"] == [pytest.approx(0.1)] * 3
    assert r["ci95"] == [pytest.approx(0.1), pytest.approx(0.1)]  # identical seeds: no spread

    # seed noise: KD's seeds differ by a constant shift; per seed they reach 4.0 at 10^3.5, 10^4, 10^4.5 tokens
    shifts = np.array([-0.5, 0.0, 0.5])
    kd_seeds = kd[None, :] + shifts[:, None]
    r = token_ratio(tokens, kd_seeds, tokens, np.tile(scratch, (3, 1)), n_boot=2000, seed=1)
    assert r["ratio"] == pytest.approx(0.1)
    assert r["per_seed"] == [pytest.approx(10 ** -1.5), pytest.approx(0.1), pytest.approx(10 ** -0.5)]
    # log10 ratios -1.5, -1, -0.5: mean -1, sd 0.5, t(2) = 4.303 -> 10^(-1 +- 4.303 * 0.5 / sqrt 3)
    hw = 4.303 * 0.5 / math.sqrt(3)
    assert r["ci95"] == [pytest.approx(10 ** (-1 - hw), rel=1e-3), pytest.approx(10 ** (-1 + hw), rel=1e-3)]
    assert r["geo_mean"] == pytest.approx(0.1) and "n=3" in r["ci95_method"]
    blo, bhi = r["bootstrap"]["interval"]  # the percentile bootstrap is narrower: 10 distinct resamples
    assert r["ci95"][0] < blo < 0.1 < bhi < r["ci95"][1]

    # an arm that never reaches the target: no ratio, and the interval says it is unbounded
    r = token_ratio(tokens, np.tile(scratch + 1, (3, 1)), tokens, np.tile(scratch, (3, 1)), n_boot=50)
    assert r["ratio"] is None and r["status"] == "not_reached" and r["ci95_unbounded_high"]
    assert r["per_seed"] == [None] * 3 and r["bootstrap"]["unbounded_high"]


def test_bootstrap_upper_bound_is_unbounded_at_exactly_the_cut_off_share():
    """39 finite resamples and one never-reached: the 97.5th percentile interpolates into the inf one.
    Standing in 1e300 for inf gave 2.5e298 and called it bounded."""
    b = np.array([1.0] * 39 + [math.inf])
    assert np.percentile(np.minimum(b, 1e300), 97.5) == pytest.approx(2.5e298, rel=1e-3)  # what the old code did
    assert percentile_with_inf(b, 97.5) == math.inf
    assert percentile_with_inf(b, 2.5) == 1.0
    finite = np.random.default_rng(0).normal(size=101)
    assert percentile_with_inf(finite, 97.5) == pytest.approx(np.percentile(finite, 97.5))


def test_ratio_interval_covers_the_truth_95_percent_of_the_time_with_3_seeds():
    """2000 simulated studies of n = 3 seeds whose per-seed ratios are log-normal around a known geometric
    mean 0.4: the t-interval on log-ratios covers it ~95 % of the time (the percentile bootstrap ~75 %)."""
    rng = np.random.default_rng(12)
    tokens = np.tile([1e2, 1e3, 1e4, 1e5, 1e6], (3, 1))
    arm_tokens = np.tile([1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8], (3, 1))  # room for a ratio > 1
    truth, sims = 0.4, 2000
    covered = boot_covered = 0
    for i in range(sims):
        log_r = np.log(truth) + rng.normal(0, 0.3, size=3)
        offset = rng.normal(0, 0.2, size=(3, 1))
        ref = 20.0 - np.log(tokens) + offset  # linear in log-tokens, one offset per seed
        arm = 20.0 - np.log(arm_tokens) + offset + log_r[:, None]  # reaches any value r times the tokens
        r = token_ratio(arm_tokens, arm, tokens, ref, n_boot=40 if i < 300 else 0, seed=i)
        np.testing.assert_allclose(r["per_seed"], np.exp(log_r), rtol=1e-9)
        lo, hi = r["ci95"]
        covered += lo <= truth <= hi
        if i < 300:
            blo, bhi = r["bootstrap"]["interval"]
            boot_covered += (blo or 0) <= truth <= (bhi if bhi is not None else math.inf)
    assert abs(covered / sims - 0.95) < 0.015  # binomial sd at n = 2000 is 0.005
    assert boot_covered / 300 < 0.85


def test_constant_lr_schedule_and_its_validation():
    from potstill.config import TrainConfig
    from potstill.errors import PotstillError
    from potstill.train.loop import lr_at

    cfg = TrainConfig(lr=1e-3, warmup_steps=4, max_steps=100, lr_schedule="constant")
    assert lr_at(1, cfg) == pytest.approx(5e-4)  # warm-up as before
    assert lr_at(4, cfg) == lr_at(60, cfg) == lr_at(99, cfg) == 1e-3
    assert lr_at(99, TrainConfig(lr=1e-3, warmup_steps=4, max_steps=100)) < 2e-4  # the default still decays
    with pytest.raises(PotstillError):
        TrainConfig(lr_schedule="linear")


def test_distinct_n():
    assert distinct_n([[1, 2, 1, 2]], 1) == 0.5
    assert distinct_n([[1, 2, 1, 2]], 2) == pytest.approx(2 / 3)
    assert distinct_n([[1, 2, 3], [1, 2, 3]], 3) == 0.5
    assert distinct_n([[1]], 2) == 0.0


def test_transfer_study_tiny(tmp_path, tiny_model_dir, prompts_file):
    cfg = TransferConfig(teacher=str(tiny_model_dir), prompts=prompts_file, out=str(tmp_path / "transfer"),
                         student="fresh:layers=1,hidden=32", seeds=2, budgets=[40, 120], max_new_tokens=10,
                         heldout=0.25, batch_size=4, warmup_steps=1, bootstrap=100, dtype="float32")
    result = run_transfer(cfg, log=lambda *a: None)
    out = tmp_path / "transfer"
    saved = json.loads((out / "results.json").read_text())
    assert saved["budgets"] == [40, 120]
    for arm in ("kd", "ce-teacher", "scratch"):
        runs = [r for r in saved["runs"] if r["arm"] == arm]
        assert sorted(r["seed"] for r in runs) == [0, 1]
        for r in runs:
            assert [p["budget"] for p in r["points"]] == [40, 120]
            for p in r["points"]:
                assert p["tokens"] >= p["budget"]
                assert all(math.isfinite(p[m]) for m in ("nll_reference", "kl"))
        assert len(saved["curves"][arm]) == 2
    # on_step ended each run at its last budget, not at max_steps (= the largest budget)
    for r in saved["runs"]:
        summary = json.loads((out / "runs" / f"{r['arm']}-seed{r['seed']}" / "train_summary.json").read_text())
        assert summary["steps"] == r["points"][-1]["step"] < 120
    # the same initialisation for every arm of a seed: identical measurements before training
    inits = {r["arm"]: r["init"] for r in saved["runs"] if r["seed"] == 0}
    assert inits["kd"] == inits["ce-teacher"] == inits["scratch"]
    # training moved every arm off its initial reference NLL (which way, ~10 steps of a random 1-layer
    # model cannot promise: the curves and their bootstrap intervals are what the study reports)
    assert all(abs(r["points"][-1]["nll_reference"] - r["init"]["nll_reference"]) > 1e-4 for r in saved["runs"])
    ratio = saved["ratios_vs_scratch"]["kd"]["nll_reference"]
    assert ratio["target"] == pytest.approx(min(c["nll_reference"]["mean"] for c in saved["curves"]["scratch"]))
    assert (out / "quality_vs_tokens.png").read_bytes()[:8] == PNG
    assert "kd" in (out / "table.md").read_text()
    assert result["ratios_vs_scratch"].keys() == {"kd", "ce-teacher"}

    # a rerun with the same settings reuses every finished run
    again = run_transfer(cfg, log=lambda *a: None)
    assert [r["points"] for r in again["runs"]] == [r["points"] for r in result["runs"]]


def test_distinct_n_on_equal_token_counts():
    """The same cycling "model" writing 10x more text looks 10x less diverse on raw corpus distinct-1; cut to the
    same number of tokens the two corpora agree."""
    long, short = [list(range(10))] * 10, [list(range(10))]
    assert distinct_n(long, 1) == pytest.approx(0.1) and distinct_n(short, 1) == 1.0
    budget, (a, b) = equal_token_distinct([long, short])
    assert budget == 10 and a == b == {"distinct_1_equal": 1.0, "distinct_2_equal": 1.0, "distinct_3_equal": 1.0}
    assert truncate_to_tokens([[1, 2, 3], [4, 5], [6]], 4) == [[1, 2, 3], [4]]
    assert truncate_to_tokens([[1, 2]], 5) == [[1, 2]]
    # a less diverse model stays less diverse at equal tokens: 2 tokens cycled vs 10
    _, (c, d) = equal_token_distinct([[[0, 1] * 20], short])
    assert c["distinct_1_equal"] == pytest.approx(0.2) and d["distinct_1_equal"] == 1.0


def test_scratch_references_end_with_eos_like_the_teacher_captures(tmp_path, tiny_model_dir, prompts_file):
    """The scratch arm learns each reference up to and including the chat template's end-of-turn, exactly as
    the capture's reference-ids helper renders it, and with the EOS the KD arms' completions end with."""
    from transformers import AutoTokenizer, GenerationConfig

    from potstill.capture.generate import generate, reference_ids
    from potstill.capture.store import Capture
    from potstill.config import GenerateConfig
    from potstill.studies.transfer import reference_capture
    from potstill.teachers.hf import HFTeacher

    teacher = HFTeacher.load(str(tiny_model_dir), dtype="float32")
    cap_dir = tmp_path / "cap"
    generate(GenerateConfig(teacher=str(tiny_model_dir), prompts=prompts_file, out=str(cap_dir), top_k=4,
                            max_new_tokens=6, heldout=0.0, dtype="float32"), teacher=teacher, log=lambda *a: None)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    refs = Capture.open(reference_capture(cap_dir, tmp_path / "refs", tok, GenerationConfig.from_pretrained(tiny_model_dir)))
    rows = list(refs.rows())
    assert len(rows) == len(PROMPTS)
    for r in rows:
        ids = list(r["completion_ids"])
        assert ids[-1] in teacher.eos_ids and ids.count(ids[-1]) == 1
        assert ids == reference_ids(teacher, r["prompt"], r["reference"], list(r["prompt_ids"]))
    stopped = [list(r["completion_ids"]) for r in Capture.open(cap_dir).rows() if r["finish_reason"] == "stop"]
    assert all(c[-1] in teacher.eos_ids for c in stopped)


def test_collapse_study_tiny(tmp_path, tiny_model_dir, prompts_file):
    import torch
    from transformers import AutoModelForCausalLM

    from potstill.capture.store import Capture
    from potstill.train.data import collate, examples_from_capture

    out = tmp_path / "collapse"
    cfg = CollapseConfig(teacher=str(tiny_model_dir), prompts=prompts_file, out=str(out), generations=2,
                         student="prune:depth:2", max_new_tokens=10, heldout=0.25, steps=4, batch_size=4,
                         warmup_steps=1, lr=3e-3, dtype="float32")
    result = run_collapse(cfg, log=lambda *a: None)
    gens = json.loads((out / "results.json").read_text())["generations"]
    assert [g["generation"] for g in gens] == [0, 1, 2]
    for g in gens:
        for key in ("distinct_1", "distinct_2", "distinct_3", "distinct_2_equal", "entropy", "kl_to_gen0",
                    "nll_reference"):
            assert math.isfinite(g[key]), (g["generation"], key)
    # distinct-n on equal token counts: every generation cut to the smallest generation's total
    corpora = [completions(g["capture"]) for g in gens]
    budget = min(sum(map(len, c)) for c in corpora)
    assert all(g["equal_tokens"] == budget for g in gens)
    for g, c in zip(gens, corpora, strict=True):
        flat = [t for s in c for t in s][:budget]
        assert g["distinct_1_equal"] == pytest.approx(len(set(flat)) / budget)
    assert gens[0]["kl_to_gen0"] == pytest.approx(0.0, abs=1e-3)  # gen 0 against itself: codec rounding only
    assert gens[1]["kl_to_gen0"] > 100 * max(gens[0]["kl_to_gen0"], 1e-6)

    # independent reference: KL(gen0 ‖ gen2) from both models' dense logits, over the buckets gen 0's capture
    # stored (its kept ids + one tail bucket), on gen 0's held-out text
    teacher = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    gen2 = AutoModelForCausalLM.from_pretrained(out / "gen-2" / "student", dtype=torch.float32).eval()
    batch = collate(examples_from_capture(Capture.open(out / "gen-0" / "capture"), split="heldout"), 0)
    with torch.no_grad():
        lp = torch.log_softmax(teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
        lq = torch.log_softmax(gen2(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits, -1)
    lp, lq = lp[batch.rows, batch.cols], lq[batch.rows, batch.cols]
    kept = torch.isfinite(batch.topk_logprobs)
    p_top = torch.where(kept, lp.gather(1, batch.topk_ids).exp(), 0.0)
    q_top = torch.where(kept, lq.gather(1, batch.topk_ids).exp(), 0.0)
    p = torch.cat([p_top, (1 - p_top.sum(1, keepdim=True)).clamp_min(1e-12)], 1)
    q = torch.cat([q_top, (1 - q_top.sum(1, keepdim=True)).clamp_min(1e-12)], 1)
    kl = float(torch.where(p > 0, p * (p.clamp_min(1e-30).log() - q.clamp_min(1e-30).log()), 0.0).sum(1).mean())
    assert gens[2]["kl_to_gen0"] == pytest.approx(kl, rel=0.05, abs=1e-3)
    assert gens[2]["kl_to_gen0"] != pytest.approx(gens[1]["kl_to_gen0"], rel=1e-3)

    # each generation's capture was sampled from its own student, not from the teacher
    assert Capture.open(out / "gen-1" / "capture").manifest["teacher"]["name"] == "student"
    assert (out / "drift.png").read_bytes()[:8] == PNG
    assert "KL(gen0" in (out / "table.md").read_text()
    assert result["student_info"]["layers_after"] == 2


@pytest.mark.slow
def test_studies_on_the_embedded_teacher(tmp_path):
    """Both studies on SmolLM2-135M at a toy scale: the teacher's signal shows, and gen 0 matches itself."""
    transfer = run_transfer(
        TransferConfig(out=str(tmp_path / "transfer"), max_prompts=40, max_new_tokens=24, heldout=0.25, seeds=2,
                       budgets=[400, 1500], student="fresh:layers=1,hidden=64", batch_size=8, bootstrap=200),
        log=lambda *a: None)
    last = {arm: curve[-1] for arm, curve in transfer["curves"].items()}
    # distilling the teacher's distribution brings the student closer to it than human text does
    assert last["kd"]["kl"]["mean"] < last["scratch"]["kl"]["mean"]
    assert all(math.isfinite(last[a]["nll_reference"]["mean"]) for a in last)

    collapse = run_collapse(
        CollapseConfig(out=str(tmp_path / "collapse"), max_prompts=24, max_new_tokens=16, heldout=0.25, generations=1,
                       student="prune:depth:6", steps=3, batch_size=8),
        log=lambda *a: None)
    gen0, gen1 = collapse["generations"]
    # gen 0 against its own capture: bf16 sampling vs fp32 scoring and codec rounding only
    assert gen0["kl_to_gen0"] < 0.05
    assert gen1["kl_to_gen0"] > 5 * gen0["kl_to_gen0"]
    assert 0 < gen1["distinct_1"] <= 1 and gen1["entropy"] > 0
