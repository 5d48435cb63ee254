"""The held-out quality set (builtin:heldout_v1), repetition metrics, and eval's held-out columns on a tiny model."""

from __future__ import annotations

import pytest

from potstill.capture.prompts import load_prompts
from potstill.evaluate.heldout import distinct, equal_repetition, has_loop, repetition


def test_builtin_heldout_v1_is_sixty_answered_prompts_from_another_source():
    held = load_prompts("builtin:heldout_v1")
    seed = load_prompts("builtin:seed_tasks")
    assert len(held) == 60
    assert all(p.reference and p.reference.strip() for p in held)
    texts = {p.messages[-1]["content"] for p in held}
    assert len(texts) == 60  # no duplicates
    assert not texts & {p.messages[-1]["content"] for p in seed}
    assert all(p.where.startswith("builtin:heldout_v1:") for p in held)


def test_loop_needs_a_fourgram_three_times():
    assert has_loop([1, 2, 3, 4] * 3)
    assert not has_loop([1, 2, 3, 4] * 2 + [9])
    assert not has_loop([7] * 5)  # (7,7,7,7) occurs twice only
    assert has_loop([7] * 6)
    assert not has_loop([1, 2])


def test_distinct_counts_within_generations_up_to_a_token_budget():
    gens = [[1, 2, 1, 2], [3, 4]]
    assert distinct(gens, 1, 6) == 4 / 6
    assert distinct(gens, 2, 6) == 3 / 4  # (1,2) (2,1) (1,2) | (3,4): never across the two answers
    assert distinct(gens, 1, 2) == 1.0  # only the first two tokens
    assert distinct([], 2, 10) is None


def test_equal_repetition_takes_distinct_over_the_shortest_models_tokens():
    looping = [[5, 6, 7, 8] * 4]  # 16 tokens, a loop
    varied = [list(range(10))]  # 10 tokens
    a, b = equal_repetition([looping, varied])
    assert a["distinct_tokens"] == b["distinct_tokens"] == 10
    assert a["loop_rate"] == 1.0 and b["loop_rate"] == 0.0
    assert a["distinct_2"] < b["distinct_2"] == 1.0
    assert repetition(looping)["distinct_tokens"] == 16


@pytest.fixture(scope="module")
def heldout_file(tmp_path_factory):
    import json

    path = tmp_path_factory.mktemp("heldout") / "heldout.jsonl"
    rows = [{"instruction": "Name a fruit.", "output": "An apple."},
            {"instruction": "What is two plus two?", "output": "Four."},
            {"instruction": "Greet me.", "output": "Hello there."}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_eval_reports_heldout_and_repetition_columns(tmp_path, tiny_model_dir, prompts_file, heldout_file):
    from potstill.capture.generate import generate
    from potstill.config import EvalConfig
    from potstill.evaluate import run_eval
    from potstill.students import build_student
    from tests.pipeline_fixtures import gen_cfg

    cap = tmp_path / "cap"
    generate(gen_cfg(tiny_model_dir, prompts_file, cap), log=lambda *_: None)
    student, tok, _ = build_student("prune:depth:1", tiny_model_dir, [[1, 2, 3, 4]])
    student.save_pretrained(tmp_path / "student")
    tok.save_pretrained(tmp_path / "student")
    cfg = EvalConfig(capture=str(cap), students=[str(tmp_path / "student")], teacher=str(tiny_model_dir),
                     out=str(tmp_path / "eval"), gen_prompts=3, gen_tokens=8, heldout_prompts=str(heldout_file))
    rows = run_eval(cfg, log=lambda *_: None)["rows"]
    teacher, st = rows
    assert teacher["heldout_answers"] == st["heldout_answers"] == 3
    assert teacher["heldout_kl"] == pytest.approx(0.0, abs=1e-4)  # the teacher against its own top-k
    assert teacher["heldout_top1_agreement"] == 1.0
    assert teacher["heldout_nll_reference_kept"] == 1.0
    assert st["heldout_kl"] > 1e-3 and st["heldout_top1_agreement"] < 1.0  # a different model
    assert 0 < st["heldout_nll_reference_kept"]
    for r in rows:
        assert "_answers" not in r
        assert r["gen_answers"] == 3 and 0 <= r["loop_rate"] <= 1
        assert r["distinct_tokens"] == min(x["gen_answer_tokens"] for x in rows)
    md = (tmp_path / "eval" / "eval.md").read_text()
    assert "held-out top-1" in md and "loop rate" in md and "another source" in md
