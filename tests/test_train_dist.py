"""Training at scale: torchrun with 2 CPU processes (gloo), DDP and FSDP2, against one process;
resume across process counts; gradient checkpointing; peak memory in the step log.

Each launch is a real `torchrun --standalone --nproc_per_node 2 -m potstill.cli train` subprocess
on a tiny random teacher. Tolerances (fp32, bf16 off): the per-step loss and grad-norm curves of
DDP and FSDP differ from one process with the same global batch by < 1e-4 (measured: DDP 0,
bit-exact; FSDP ~3e-7), final weights by < 5e-5 (FSDP measured ~8e-6: its reduce-scatter sums in
another order and Adam magnifies the last bits of tiny gradients).

    OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_train_dist.py
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import potstill
from potstill.config import TrainConfig
from potstill.errors import PotstillError
from tests.pipeline_fixtures import PROMPTS, gen_cfg

LOSS_TOL = 1e-4
WEIGHT_TOL = 5e-5

COMMON = dict(student="prune:depth:2", loss="fkl", max_steps=6, batch_size=2, warmup_steps=2, lr=1e-2,
              checkpoint_every=3, bf16="off", calibration=4)


@pytest.fixture(scope="module")
def capture_dir(tmp_path_factory, tiny_model_dir):
    from potstill.capture.generate import generate

    root = tmp_path_factory.mktemp("dist")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in PROMPTS))
    generate(gen_cfg(tiny_model_dir, prompts, root / "capture"), log=lambda *_: None)
    return root / "capture"


def flags(**kw) -> list[str]:
    out = []
    for k, v in kw.items():
        name = "--" + k.replace("_", "-")
        out += [name] if v is True else [name, str(v)]
    return out


def torchrun(**kw) -> subprocess.CompletedProcess:
    """2 processes on this machine; --standalone picks a free port (other runs may be going on)."""
    src = str(Path(potstill.__file__).resolve().parents[1])
    path = src + os.pathsep + os.environ.get("PYTHONPATH", "")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "potstill.cli", "train", *flags(**kw)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def metrics(out: Path) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def weights(out: Path) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(out).state_dict()


def assert_same_run(out: Path, ref: Path) -> None:
    got, want = metrics(out), metrics(ref)
    assert [m["step"] for m in got] == [m["step"] for m in want] == [1, 2, 3, 4, 5, 6]
    assert [m["target_tokens"] for m in got] == [m["target_tokens"] for m in want]
    for key in ("loss", "grad_norm"):
        diff = max(abs(a[key] - b[key]) for a, b in zip(got, want, strict=True))
        assert diff < LOSS_TOL, (key, diff)
    wa, wb = weights(out), weights(ref)
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=WEIGHT_TOL)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, capture_dir, tiny_model_dir):
    """One process (batch 2 x accumulation 2) and 2 processes (batch 2 each) under DDP and FSDP
    (the latter with activation checkpointing)."""
    from potstill.train.loop import train

    root = tmp_path_factory.mktemp("runs")
    base = dict(COMMON, capture=str(capture_dir), teacher=str(tiny_model_dir))
    train(TrainConfig(**base, grad_accum=2, out=str(root / "one")), log=lambda *_: None)
    torchrun(**base, dist="ddp", out=root / "ddp")
    # checkpointing does not change gradients, so FSDP with it must still match (and must work with it)
    r = torchrun(**base, dist="fsdp", grad_checkpointing=True, out=root / "fsdp")
    return root, base, r


@pytest.mark.slow
@pytest.mark.subprocess
def test_ddp_and_fsdp_match_one_process(runs):
    root, _, fsdp_proc = runs
    for mode in ("ddp", "fsdp"):
        out = root / mode
        assert_same_run(out, root / "one")  # also: one metrics line per step, so only rank 0 wrote
        summary = json.loads((out / "train_summary.json").read_text())
        assert summary["dist"] == mode and summary["world_size"] == 2
        assert summary["grad_checkpointing"] == (mode == "fsdp")
        assert len(summary["peak_mem_mb_per_rank"]) == 2 and min(summary["peak_mem_mb_per_rank"]) > 50
        assert all(m["peak_mem_mb"] >= 50 for m in metrics(out))
        assert (out / "checkpoints" / "step-0000003" / "state.json").exists()
        # the saved student is what one process saves: same files, no duplicated tied head
        size = (out / "model.safetensors").stat().st_size
        assert size == (root / "one" / "model.safetensors").stat().st_size
    # only rank 0 logs: each step line once
    assert fsdp_proc.stdout.count("step 6/6") == 1


@pytest.mark.slow
@pytest.mark.subprocess
def test_resume_across_process_counts(runs, tmp_path):
    """A crash after the step-3 checkpoint (only checkpoints survive), resumed under another mode
    and another process count, reaches the uninterrupted run's weights."""
    from potstill.train.loop import train

    root, base, _ = runs
    for src, dst in (("ddp", "r-fsdp"), ("fsdp", "r-one")):
        shutil.copytree(root / src, tmp_path / dst)
        for f in (tmp_path / dst).iterdir():
            if f.is_file() and f.name != "metrics.jsonl":
                f.unlink()
    # a 2-process DDP checkpoint resumed by 2 FSDP processes (loaded full, then sharded)
    r = torchrun(**base, dist="fsdp", out=tmp_path / "r-fsdp", resume=True)
    assert "resumed from" in r.stdout and "step 4/6" in r.stdout and "step 3/6" not in r.stdout
    assert_same_run(tmp_path / "r-fsdp", root / "one")
    # a 2-process FSDP checkpoint resumed by one process with the same global batch
    train(TrainConfig(**base, grad_accum=2, out=str(tmp_path / "r-one"), resume=True), log=lambda *_: None)
    assert_same_run(tmp_path / "r-one", root / "one")
    state = json.loads((root / "fsdp" / "checkpoints" / "step-0000003" / "state.json").read_text())
    assert state == {"step": 3, "micro_batches": 6}


@pytest.mark.slow
@pytest.mark.subprocess
def test_resume_from_a_checkpoint_of_the_older_format(runs, tmp_path):
    """Checkpoints written before they were keyed by name (model.state_dict() + optimizer.state_dict(),
    no micro_batches in state.json) still resume in one process to the same weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    from transformers import AutoModelForCausalLM

    from potstill.train.loop import train

    root, base, _ = runs
    out = tmp_path / "legacy"
    shutil.copytree(root / "one" / "checkpoints", out / "checkpoints")
    ckpt = out / "checkpoints" / "step-0000003"
    state = torch.load(ckpt / "weights.pt", weights_only=True)
    model = AutoModelForCausalLM.from_pretrained(root / "one")
    params = dict(model.named_parameters())
    groups = [[p for p in params.values() if p.ndim >= 2], [p for p in params.values() if p.ndim < 2]]
    optimizer = torch.optim.AdamW([{"params": g} for g in groups], lr=1e-2, betas=(0.9, 0.95))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(full_state_dict=True))
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, ckpt / "weights.pt")
    (ckpt / "state.json").write_text(json.dumps({"step": 3}))
    train(TrainConfig(**base, grad_accum=2, out=str(out), resume=True), log=lambda *_: None)
    assert [m["step"] for m in metrics(out)] == [4, 5, 6]
    wa, wb = weights(out), weights(root / "one")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def _grads(model, batch, loss_cfg):
    from potstill.train.data import student_logits
    from potstill.train.losses import distill_loss

    model.zero_grad(set_to_none=True)
    logits = student_logits(model, batch)
    parts = distill_loss(
        logits, batch.targets, batch.topk_ids, batch.topk_logprobs, batch.tail_logprob, loss_cfg
    )
    (parts["loss_sum"] / batch.n_targets).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_grad_checkpointing_gives_same_gradients(capture_dir, tiny_tokenizer):
    from potstill.capture.store import Capture
    from potstill.train.data import collate, examples_from_capture
    from potstill.train.dist import enable_activation_checkpointing
    from potstill.train.losses import LossConfig
    from tests.tiny import make_tiny_model

    examples = examples_from_capture(Capture.open(capture_dir), split="train")
    batch = collate(examples[:4], tiny_tokenizer.pad_token_id)
    model = make_tiny_model(tiny_tokenizer, layers=3, seed=1).train()
    model.config.use_cache = False
    plain = _grads(model, batch, LossConfig(kind="jsd"))
    calls = []
    # transformers checkpoints the layer's forward (its own hooks stay outside): watch a module inside it
    model.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))
    enable_activation_checkpointing(model)
    ckpt = _grads(model, batch, LossConfig(kind="jsd"))
    assert len(calls) == 2  # the layer ran again in backward: checkpointing is really on
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7)
    assert any(float(g.abs().max()) > 0 for g in plain.values())


def test_grad_checkpointing_flag_trains_the_same(tmp_path, capture_dir, tiny_model_dir):
    from potstill.train.loop import train

    base = dict(COMMON, capture=str(capture_dir), teacher=str(tiny_model_dir))
    base.update(max_steps=2, checkpoint_every=0)
    train(TrainConfig(**base, out=str(tmp_path / "a")), log=lambda *_: None)
    lines = []
    summary = train(TrainConfig(**base, out=str(tmp_path / "b"), grad_checkpointing=True), log=lines.append)
    assert summary["grad_checkpointing"] and summary["dist"] == "none" and summary["world_size"] == 1
    assert summary["peak_mem_mb_per_rank"][0] > 50 and "peak" in lines[-1] and "MB" in lines[-1]
    wa, wb = weights(tmp_path / "a"), weights(tmp_path / "b")
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=0, atol=1e-6)


def test_dist_setting_is_checked():
    with pytest.raises(PotstillError, match="dist"):
        TrainConfig(dist="mpi")
