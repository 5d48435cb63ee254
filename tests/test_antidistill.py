"""Anti-distillation sampling (guard/antidistill.py): Delta is the directional derivative it claims to be,
lambda = 0 changes nothing, the tilt teaches a proxy worse, and it serves over HTTP beside the watermark."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch

from potstill.capture.prompts import Prompt
from potstill.errors import PotstillError
from potstill.guard.antidistill import AntidistillProcessor
from potstill.lm.engine import Engine
from potstill.lm.types import SamplingParams
from tests.guard_fixtures import one_torch_thread
from tests.pipeline_fixtures import PROMPTS
from tests.tiny import make_tiny_model, make_tiny_tokenizer, save_tiny_model

PROTECT = [Prompt([{"role": "user", "content": p["instruction"]}], p["output"]) for p in PROMPTS if p.get("output")]


@pytest.fixture(scope="module")
def tok(tiny_tokenizer):
    return tiny_tokenizer


@pytest.fixture(scope="module")
def teacher(tok):
    with one_torch_thread():
        yield Engine(make_tiny_model(tok, layers=2, seed=0, init=0.3), tok, name="tiny")


@pytest.fixture(scope="module")
def proxy(tok):
    return make_tiny_model(tok, layers=1, seed=1, init=0.3)


def prompt_ids(tok, n: int) -> list[list[int]]:
    from potstill.lm.tokens import chat_ids

    return [chat_ids(tok, [{"role": "user", "content": p["instruction"]}]) for p in PROMPTS[:n]]


def test_delta_is_the_directional_derivative(tok, proxy):
    """Finite differences (two forward passes) match d/da log p(. | ctx; theta + a u) by double backward."""
    proc = AntidistillProcessor(proxy, tok, PROTECT, lam=1.0, eps=1e-3)
    ids = tok("The capital of Italy is Rome. Numbers one two three")["input_ids"]
    fd = proc.delta_forced(ids, 2)
    ref = copy.deepcopy(proc.proxy)
    ref.set_attn_implementation("eager")  # CPU SDPA has no double backward
    params = list(ref.parameters())
    u = [(q.detach() - p.detach()) / proc.eps for p, q in zip(proc.proxy.parameters(), proc.perturbed.parameters(), strict=True)]
    for p in params:
        p.requires_grad_(True)
    lp = torch.log_softmax(ref(input_ids=torch.tensor([ids])).logits[0, 1:-1].float(), -1)
    v = torch.zeros_like(lp, requires_grad=True)  # J u = d/dv <v^T J, u>
    vjp = torch.autograd.grad(lp, params, v, create_graph=True)
    jvp = torch.autograd.grad(sum((a * b).sum() for a, b in zip(vjp, u, strict=True)), v)[0]
    assert float(torch.linalg.vector_norm(torch.cat([x.flatten() for x in u]))) == pytest.approx(1.0, rel=1e-4)
    assert jvp.abs().max() > 0.5  # a real signal, not two zeros agreeing
    assert (fd - jvp).abs().max() <= 0.02 * jvp.abs().max()


def test_cached_delta_matches_teacher_forcing(tok, teacher, proxy):
    """The proxy's per-row KV caches follow the engine's rows through refills and departures."""
    proc = AntidistillProcessor(proxy, tok, PROTECT, lam=2.0)
    seen = []
    inner = proc.delta

    def spy(contexts):
        d = inner(contexts)
        seen.append(([list(c) for c in contexts], d.clone()))
        return d

    proc.delta = spy
    outs = teacher.complete_ids(prompt_ids(tok, 5), SamplingParams(max_new_tokens=10, top_logprobs=0), batch_size=2,
                                logits_processor=proc)
    assert len({len(o.completion_ids) for o in outs}) > 1 or len(seen) > 10  # rows left and joined the batch
    worst = max(float((proc.delta_forced(c + [0], len(c))[0] - row).abs().max())
                for contexts, d in seen for c, row in zip(contexts, d, strict=True))
    assert worst < 0.05


def test_lambda_zero_is_untilted_and_lambda_tilts(tok, teacher, proxy):
    ids, params = prompt_ids(tok, 4), SamplingParams(max_new_tokens=12, top_logprobs=3, seed=7)
    clean = teacher.complete_ids(ids, params)
    zero = teacher.complete_ids(ids, params, logits_processor=AntidistillProcessor(proxy, tok, PROTECT, lam=0.0))
    tilted = teacher.complete_ids(ids, params, logits_processor=AntidistillProcessor(proxy, tok, PROTECT, lam=3.0))
    assert [c.completion_ids for c in zero] == [c.completion_ids for c in clean]
    assert all(np.array_equal(a.topk_logprobs, b.topk_logprobs) for a, b in zip(zero, clean, strict=True))
    assert [c.completion_ids for c in tilted] != [c.completion_ids for c in clean]


def test_proxy_tokenizer_must_match(tmp_path, teacher, tok):
    other = make_tiny_tokenizer(vocab_size=280)
    save_tiny_model(tmp_path / "proxy", make_tiny_model(other, layers=1), other)
    from potstill.config import AntidistillConfig

    cfg = AntidistillConfig(antidistill=1.0, proxy=str(tmp_path / "proxy"), protect="builtin:seed_tasks")
    with pytest.raises(PotstillError, match="tokenizer differs"):
        AntidistillProcessor.load(cfg, teacher)
    with pytest.raises(PotstillError, match="--proxy"):
        AntidistillConfig(antidistill=1.0)


def sgd_loss_rise(proc, proxy, tok, completions, lr: float) -> float:
    """Protect loss after one SGD step of a copy of the proxy on the sampled tokens, minus before."""
    from potstill.guard.antidistill import protect_examples, protect_loss_grad

    student = copy.deepcopy(proxy).float()
    examples = [(c.prompt_ids + c.completion_ids, len(c.prompt_ids)) for c in completions if c.completion_ids]
    _, grads = protect_loss_grad(student, examples)
    with torch.no_grad():
        for p, g in zip(student.parameters(), grads, strict=True):
            p.sub_(lr * g)
    protect = protect_examples(tok, PROTECT, [tok.eos_token_id])
    return protect_loss_grad(student, protect)[0] - proc.protect_loss


def test_tilt_raises_the_proxys_downstream_loss(tok, teacher, proxy):
    """One SGD step on tilted samples raises the proxy's protect loss more than one on clean samples:
    n = 6 seeds x 6 prompts x 12 tokens per arm, paired by seed; the mean rise must be larger."""
    proc = AntidistillProcessor(proxy, tok, PROTECT, lam=4.0)
    clean_proc = AntidistillProcessor(proxy, tok, PROTECT, lam=0.0)
    ids = prompt_ids(tok, 6)
    rises = {"clean": [], "tilted": []}
    for seed in range(6):
        params = SamplingParams(max_new_tokens=12, top_logprobs=0, seed=seed)
        for arm, p in (("clean", clean_proc), ("tilted", proc)):
            outs = teacher.complete_ids(ids, params, logits_processor=p)
            rises[arm].append(sgd_loss_rise(proc, proxy, tok, outs, lr=0.5))
    diff = np.array(rises["tilted"]) - np.array(rises["clean"])
    assert diff.mean() > 0 and (diff > 0).sum() >= 5, rises


@pytest.mark.subprocess
def test_generate_records_the_tilt(tmp_path, tiny_model_dir, prompts_file):
    """`potstill generate --antidistill` (a child process) writes tilted rows and says so in the manifest."""
    import subprocess
    import sys

    tok = make_tiny_tokenizer()
    save_tiny_model(tmp_path / "proxy", make_tiny_model(tok, layers=1, seed=1, init=0.3), tok)
    out = tmp_path / "cap"
    args = [sys.executable, "-m", "potstill.cli", "generate", "--teacher", str(tiny_model_dir), "--prompts", str(prompts_file),
            "--out", str(out), "--max-new-tokens", "6", "--top-k", "4", "--antidistill", "2", "--proxy",
            str(tmp_path / "proxy"), "--protect", str(prompts_file), "--max-prompts", "4"]
    done = subprocess.run(args, capture_output=True, text=True, timeout=300, env={**__import__("os").environ,
                                                                                 "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["antidistill"]["lambda"] == 2.0 and manifest["antidistill"]["top_logprobs"].startswith("tilted")
    assert manifest["sampling"]["antidistill"]["lambda"] == 2.0
    bad = subprocess.run(args[:-6] + ["--antidistill", "2"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--proxy" in bad.stderr


@pytest.mark.slow
def test_study_antidistill_writes_its_curve(tmp_path, tiny_model_dir, prompts_file):
    """The study end to end on the tiny teacher: lambda calibrated to the asked teacher cost, artefacts written."""
    from potstill.studies.antidistill import AntidistillStudyConfig, run_antidistill

    cfg = AntidistillStudyConfig(teacher=str(tiny_model_dir), prompts=str(prompts_file), out=str(tmp_path / "s"),
                                 target_costs=[0.05], temperatures=[1.5], max_prompts=None, heldout=0.3,
                                 max_new_tokens=6, max_steps=2, batch_size=2, top_k=4)
    with one_torch_thread():
        result = run_antidistill(cfg, log=lambda line: None)
    arms = {a["arm"]: a for a in result["arms"]}
    tilted = [a for a in arms.values() if a["lambda"] > 0]
    assert len(tilted) == 1 and tilted[0]["teacher_cost"] == pytest.approx(0.05, rel=0.05)
    assert arms["clean"]["student_loss"] == 0 and "T=1.5" in arms
    assert result["serving"]["slowdown"] > 0
    for name in ("results.json", "table.md", "tradeoff.png"):
        assert (tmp_path / "s" / name).stat().st_size > 0


def test_paired_difference_interval_and_prediction_bound():
    """The e2e test's margin comes from this: per-seed differences, the mean's 95 % t-interval, and the one-seed
    97.5 % t-prediction bound mean - t(n-1) * sd * sqrt(1 + 1/n)."""
    from potstill.studies.antidistill_http import paired_difference

    d = paired_difference([1.0, 2.0, 3.5, 2.5, 3.0], [0.5, 1.0, 2.0, 2.0, 1.5])  # diffs 0.5 1 1.5 0.5 1.5
    assert d["per_seed"] == [0.5, 1.0, 1.5, 0.5, 1.5] and d["n"] == 5 and d["positive"] == 5
    assert d["mean"] == pytest.approx(1.0) and d["sd"] == pytest.approx(0.5)
    assert d["low"] == pytest.approx(1.0 - 2.776 * 0.5 / 5**0.5) and d["high"] == pytest.approx(1.0 + 2.776 * 0.5 / 5**0.5)
    assert d["predict_low"] == pytest.approx(1.0 - 2.776 * 0.5 * 1.2**0.5)
    assert paired_difference([1.0], [0.0])["predict_low"] is None
