"""Multiple-choice tasks: loader errors, the batched scorer against a one-choice-at-a-time reference,
eval.json/eval.md columns with % kept, and lm-evaluation-harness (a real `lm_eval` subprocess)
scoring the same items identically to potstill."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from potstill.errors import PotstillError
from potstill.evaluate.tasks import (
    add_kept,
    encode_pair,
    load_mc_task,
    score_mc,
    write_harness_task,
)
from tests.tiny import make_tiny_model, save_tiny_model

ITEMS = [
    {"question": "What is the capital of France?", "choices": ["Paris", "Rome", "Berlin", "Madrid"], "answer": 0},
    {"question": "Name a color.", "choices": ["dog", "blue", "seven"], "answer": "blue", "id": "color"},
    {"question": "Count: one two three", "choices": ["four", "five", "rain", "cat"], "answer": 0},
    {"question": "Which is an animal?", "choices": ["red", "green", "cat", "gravity"], "answer": 2},
    {"question": "Explain gravity.", "choices": ["Masses attract each other.", "Rain falls up.", "Paris."], "answer": 0},
]


def write_jsonl(path: Path, records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


@pytest.fixture()
def task_file(tmp_path):
    return write_jsonl(tmp_path / "mini_mc.jsonl", ITEMS)


@pytest.fixture(scope="module")
def tiny_model(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()


def test_builtin_task_is_balanced_and_valid():
    task = load_mc_task("builtin:potstill_mc")
    assert task.name == "potstill_mc" and len(task.items) == 100
    assert all(len(i.choices) == 4 for i in task.items)
    positions = np.bincount([i.answer for i in task.items], minlength=4)
    assert positions.min() >= 20  # the right answer sits in every position, not always first


@pytest.mark.parametrize(
    "line, where, field",
    [
        ('{"question": "q", "choices": ["a", "b"]', ":2", "invalid JSON"),
        ({"choices": ["a", "b"], "answer": 0}, ":2", "field 'question'"),
        ({"question": "q", "choices": "ab", "answer": 0}, ":2", "field 'choices'"),
        ({"question": "q", "choices": ["a"], "answer": 0}, ":2", "field 'choices'"),
        ({"question": "q", "choices": ["a", "a"], "answer": 0}, ":2", "field 'choices'"),
        ({"question": "q", "choices": ["a", "b"], "answer": 2}, ":2", "field 'answer'"),
        ({"question": "q", "choices": ["a", "b"], "answer": "c"}, ":2", "field 'answer'"),
        ({"question": "q", "choices": ["a", "b"], "answer": True}, ":2", "field 'answer'"),
        ({"question": "q", "choices": ["a", "b"]}, ":2", "field 'answer'"),
        ({"question": "q", "choices": ["a", "b"], "answer": 0, "id": "0"}, ":2", "field 'id'"),
    ],
)
def test_bad_lines_name_file_line_field(tmp_path, line, where, field):
    path = write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok", "choices": ["x", "y"], "answer": 1, "id": "0"}, line])
    with pytest.raises(PotstillError) as e:
        load_mc_task(str(path))
    assert f"{path}{where}" in str(e.value) and field in str(e.value)


def test_missing_file_and_unknown_builtin(tmp_path):
    with pytest.raises(PotstillError, match="no such task file"):
        load_mc_task(str(tmp_path / "nope.jsonl"))
    with pytest.raises(PotstillError, match="no built-in task"):
        load_mc_task("builtin:nope")


def reference_scores(model, tokenizer, question: str, choices: list[str]) -> list[float]:
    """One choice at a time, one plain forward pass each, no padding: the hand-computed reference."""
    out = []
    context = f"Question: {question}\nAnswer:"
    for choice in choices:
        ctx = tokenizer.encode(context)
        whole = tokenizer.encode(context + " " + choice)
        assert whole[: len(ctx)] == ctx  # the context tokenises the same on its own
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([whole])).logits[0].float()
        logp = torch.log_softmax(logits, -1)
        out.append(sum(float(logp[p - 1, whole[p]]) for p in range(len(ctx), len(whole))))
    return out


def test_scorer_matches_one_at_a_time_reference(tiny_model, tiny_tokenizer, task_file):
    task = load_mc_task(str(task_file))
    res = score_mc(tiny_model, tiny_tokenizer, task, batch_size=3)  # batches mix items and lengths
    acc = acc_norm = 0
    for item, got in zip(task.items, res["items"], strict=True):
        ref = reference_scores(tiny_model, tiny_tokenizer, item.question, item.choices)
        assert got["lls"] == pytest.approx(ref, abs=1e-4)
        assert got["pred"] == int(np.argmax(ref))
        norm = [r / len(c) for r, c in zip(ref, item.choices, strict=True)]
        assert got["pred_norm"] == int(np.argmax(norm))
        acc += got["pred"] == item.answer
        acc_norm += got["pred_norm"] == item.answer
    assert res["acc"] == acc / len(task.items) and res["acc_norm"] == acc_norm / len(task.items)
    assert task.items[1].answer == 1 and task.items[1].id == "color"  # answer given as the choice text


def test_trailing_space_moves_to_continuation(tiny_tokenizer):
    ctx, cont = encode_pair(tiny_tokenizer, "Answer: ", "Paris")
    assert ctx == tiny_tokenizer.encode("Answer:")
    assert ctx + cont == tiny_tokenizer.encode("Answer: Paris")


def test_add_kept():
    rows = [{"model": "teacher", "t/acc": 0.5, "t/acc_norm": 0.4, "nll_reference": 2.0},
            {"model": "s", "t/acc": 0.25, "t/acc_norm": 0.4, "nll_reference": 2.5}]

    class T:
        name = "t"

    add_kept(rows, [T()])
    assert rows[0]["t/kept"] == 1.0 and rows[1]["t/kept"] == 0.5 and rows[1]["t/kept_norm"] == 1.0
    assert rows[0]["nll_reference_kept"] == 1.0
    assert rows[1]["nll_reference_kept"] == pytest.approx(math.exp(-0.5))


def test_eval_adds_task_columns_and_kept(tmp_path, tiny_model_dir, tiny_tokenizer, task_file):
    from potstill.capture.generate import generate
    from potstill.config import EvalConfig, GenerateConfig
    from potstill.evaluate import run_eval

    prompts = write_jsonl(tmp_path / "p.jsonl", [{"instruction": f"Name a color {i}.", "output": "Blue."} for i in range(4)])
    cap = tmp_path / "cap"
    generate(GenerateConfig(teacher=str(tiny_model_dir), prompts=str(prompts), out=str(cap), max_new_tokens=6,
                            top_k=4, batch_size=4, heldout=0.5, dtype="float32"), log=lambda *_: None)
    student = save_tiny_model(tmp_path / "student", make_tiny_model(tiny_tokenizer, layers=2, seed=3), tiny_tokenizer)
    res = run_eval(EvalConfig(capture=str(cap), students=[str(student)], teacher=str(tiny_model_dir),
                              out=str(tmp_path / "eval"), gen_prompts=1, gen_tokens=2, tasks=[str(task_file)]),
                   log=lambda *_: None)
    teacher, stud = res["rows"]
    task = load_mc_task(str(task_file))
    from transformers import AutoModelForCausalLM

    direct = score_mc(AutoModelForCausalLM.from_pretrained(student), tiny_tokenizer, task)
    assert stud["mini_mc/acc"] == direct["acc"] and stud["mini_mc/acc_norm"] == direct["acc_norm"]
    assert teacher["mini_mc/kept"] == 1.0
    expect = stud["mini_mc/acc"] / teacher["mini_mc/acc"] if teacher["mini_mc/acc"] else None
    assert stud["mini_mc/kept"] == expect
    assert stud["nll_reference_kept"] == pytest.approx(math.exp(teacher["nll_reference"] - stud["nll_reference"]))
    saved = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert saved["tasks"]["mini_mc"]["items"] == len(ITEMS)
    assert "mini_mc acc ↑" in (tmp_path / "eval" / "eval.md").read_text()


def lm_eval_samples(model_dir: Path, harness_dir: Path, name: str, out: Path, limit: int | None = None):
    """Run lm_eval as a real subprocess (offline); its aggregate metrics and per-sample records."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "HF_DATASETS_CACHE": str(out / "datasets-cache"), "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model_dir},dtype=float32",
           "--tasks", name, "--include_path", str(harness_dir), "--device", "cpu", "--batch_size", "4",
           "--log_samples", "--output_path", str(out)]
    if limit:
        cmd += ["--limit", str(limit)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"][name]
    samples = [json.loads(line) for line in next(out.rglob(f"samples_{name}_*.jsonl")).read_text().splitlines()]
    return results, samples


def assert_same_scores(potstill_result, results, samples):
    by_id = {it["id"]: it for it in potstill_result["items"]}
    assert len(samples) == potstill_result["n"]
    for s in samples:
        ours = by_id[s["doc"]["id"]]
        theirs = [float(r[0]) for r in s["filtered_resps"]]
        assert ours["lls"] == pytest.approx(theirs, abs=2e-4)
        assert s["acc"] == float(ours["pred"] == ours["answer"])
        assert s["acc_norm"] == float(ours["pred_norm"] == ours["answer"])
    assert results["acc,none"] == pytest.approx(potstill_result["acc"])
    assert results["acc_norm,none"] == pytest.approx(potstill_result["acc_norm"])


@pytest.mark.slow
@pytest.mark.subprocess
def test_lm_eval_harness_scores_like_potstill(tmp_path, tiny_model_dir, tiny_tokenizer, tiny_model):
    harness = tmp_path / "harness"
    yaml_path = write_harness_task(harness, "builtin:potstill_mc")
    assert yaml_path.name == "potstill_mc.yaml"
    limit = 20  # lm_eval --limit takes the first N documents
    results, samples = lm_eval_samples(tiny_model_dir, harness, "potstill_mc", tmp_path / "lm", limit)
    task = load_mc_task("builtin:potstill_mc")
    task.items = task.items[:limit]
    assert_same_scores(score_mc(tiny_model, tiny_tokenizer, task), results, samples)


@pytest.mark.subprocess
@pytest.mark.slow
def test_embedded_teacher_potstill_and_lm_eval_agree(tmp_path):
    """The real teacher on the shipped task: potstill's accuracy equals lm_eval's, item by item."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.teachers.hf import resolve_model_dir

    teacher_dir = resolve_model_dir("embedded")
    harness = tmp_path / "harness"
    write_harness_task(harness)
    results, samples = lm_eval_samples(teacher_dir, harness, "potstill_mc", tmp_path / "lm")
    model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    ours = score_mc(model, AutoTokenizer.from_pretrained(teacher_dir), load_mc_task("builtin:potstill_mc"))
    assert_same_scores(ours, results, samples)
    assert ours["acc"] > 0.35  # well above chance (0.25) for an instruct model on these questions


@pytest.mark.subprocess
def test_cli_bad_task_file_one_line_exit_2(tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", [ITEMS[0], {"question": "q", "choices": ["a", "b"], "answer": 5}])
    for args, out in ((["eval", "--capture", str(tmp_path / "cap"), "--tasks", str(bad)], tmp_path / "eval"),
                      (["eval-harness-task", "--tasks", str(bad)], tmp_path / "harness")):
        res = subprocess.run([sys.executable, "-m", "potstill.cli", *args, "--out", str(out)],
                             capture_output=True, text=True, timeout=300)
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2 and len(lines) == 1, res.stderr
        assert f"{bad}:2" in lines[0] and "field 'answer'" in lines[0]
        assert not out.exists()  # nothing half-written
