"""Online / on-policy training, the hidden-state loss and the loss-health checks, on tiny real models.

    OMP_NUM_THREADS=1 PYTHONPATH=src python -m pytest -q tests/test_modes.py
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from potstill.config import GenerateConfig, TrainConfig
from potstill.errors import PotstillError

QUIET = lambda *_: None  # noqa: E731


def _capture(out, teacher, prompts, **kw):
    from potstill.capture.generate import generate

    base = dict(teacher=str(teacher), prompts=str(prompts), out=str(out), max_new_tokens=12, top_k=8,
                batch_size=4, heldout=0.25, dtype="float32")
    generate(GenerateConfig(**{**base, **kw}), log=QUIET)
    return out


@pytest.fixture(scope="module")
def capture_dir(tmp_path_factory, tiny_model_dir, prompts_file):
    return _capture(tmp_path_factory.mktemp("cap") / "capture", tiny_model_dir, prompts_file)


def cfg(capture, out, teacher, **kw):
    base = dict(capture=str(capture), out=str(out), teacher=str(teacher), student="prune:depth:2", loss="fkl",
                max_steps=3, batch_size=2, warmup_steps=1, lr=1e-2, checkpoint_every=0, bf16="off", calibration=4,
                mode="online", teacher_dtype="float32")
    base.update(kw)
    return TrainConfig(**base)


def metrics(out) -> list[dict]:
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]


def examples_of(capture, split="train"):
    from potstill.capture.store import Capture
    from potstill.train.data import examples_from_capture

    return examples_from_capture(Capture.open(capture), split=split)


def load(path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# -- the live teacher ------------------------------------------------------------------------------


def test_live_topk_with_full_k_is_the_dense_loss(capture_dir, tiny_model_dir, tiny_tokenizer):
    """k = vocab: distill_loss on the live top-k equals each divergence computed over the full vocabulary."""
    from potstill.train.data import collate, student_logits
    from potstill.train.losses import LossConfig, distill_loss
    from potstill.train.online import LiveTeacher
    from tests.tiny import make_tiny_model

    teacher_model, tok = load(tiny_model_dir)
    v = teacher_model.config.vocab_size
    live = LiveTeacher(teacher_model, tok, k=v)
    batch = live.score(collate(examples_of(capture_dir)[:4], tok.pad_token_id))
    assert torch.isneginf(batch.tail_logprob).all() and batch.topk_ids.shape[1] == v
    student = make_tiny_model(tiny_tokenizer, layers=2, seed=3, init=0.2)
    with torch.no_grad():
        zs = student_logits(student, batch).float()
        zt = teacher_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.rows, batch.cols]
    p, q = torch.log_softmax(zt.float(), -1), torch.log_softmax(zs, -1)

    def kl(a, b):
        return (a.exp() * (a - b)).sum(-1)

    def mix(w):
        return torch.log(w * p.exp() + (1 - w) * q.exp())

    dense = {
        "fkl": (LossConfig("fkl"), kl(p, q)),
        "rkl": (LossConfig("rkl"), kl(q, p)),
        "jsd": (LossConfig("jsd", beta=0.3), 0.3 * kl(p, mix(0.3)) + 0.7 * kl(q, mix(0.3))),
        "skl": (LossConfig("skl", alpha=0.2), kl(p, mix(0.2))),
        "srkl": (LossConfig("srkl", alpha=0.2), kl(q, mix(0.8))),
        "tvd": (LossConfig("tvd"), 0.5 * (p.exp() - q.exp()).abs().sum(-1)),
    }
    for name, (lcfg, ref) in dense.items():
        got = distill_loss(zs, batch.targets, batch.topk_ids, batch.topk_logprobs, batch.tail_logprob, lcfg)["kd_sum"]
        assert got == pytest.approx(float(ref.sum()), rel=1e-4, abs=1e-5), name
        assert float(ref.sum()) > 0.1, name  # the comparison is not between two zeros


def test_online_teacher_equal_to_student_gives_zero_kd(tmp_path, capture_dir, tiny_model_dir):
    from potstill.train.loop import train

    out = tmp_path / "s"
    train(cfg(capture_dir, out, tiny_model_dir, student=f"pretrained:{tiny_model_dir}", loss="jsd"), log=QUIET)
    assert metrics(out)[0]["kd"] < 1e-6
    assert metrics(out)[0]["ce"] > 1.0  # the batch is real: the hard-label term is not zero


def test_online_equals_offline_on_a_full_k_capture(tmp_path, tiny_model_dir, prompts_file, tiny_tokenizer):
    """A capture holding the teacher's whole distribution (f32, k = vocab) trains like the live teacher."""
    from potstill.train.loop import train

    v = len(tiny_tokenizer)
    cap = _capture(tmp_path / "cap", tiny_model_dir, prompts_file, codec="f32", top_k=v)
    logs = []
    train(cfg(cap, tmp_path / "off", tiny_model_dir, mode="offline"), log=logs.append)
    train(cfg(cap, tmp_path / "on", tiny_model_dir, online_k=v), log=logs.append)
    off, on = metrics(tmp_path / "off"), metrics(tmp_path / "on")
    assert on[0]["loss"] == pytest.approx(off[0]["loss"], rel=1e-4)
    assert [m["loss"] for m in on] == pytest.approx([m["loss"] for m in off], rel=2e-3)
    assert not any("WARNING" in line for line in logs)


def test_online_refuses_bad_settings(tmp_path, capture_dir, tiny_model_dir):
    from potstill.train.online import LiveTeacher
    from tests.tiny import make_tiny_tokenizer

    with pytest.raises(PotstillError, match="needs the teacher's hidden states"):
        cfg(capture_dir, tmp_path, tiny_model_dir, mode="offline", hidden_weight=1.0)
    with pytest.raises(PotstillError, match="mode must be one of"):
        cfg(capture_dir, tmp_path, tiny_model_dir, mode="live")
    with pytest.raises(PotstillError, match="lmbda"):
        cfg(capture_dir, tmp_path, tiny_model_dir, mode="on-policy", lmbda=1.5)
    model, tok = load(tiny_model_dir)
    other = make_tiny_tokenizer(vocab_size=280)
    with pytest.raises(PotstillError, match="tokenizer differs"):
        LiveTeacher(model, tok).check_student(other, model.config.vocab_size)


# -- on-policy -------------------------------------------------------------------------------------


def test_onpolicy_batches_are_the_students_samples(tmp_path, capture_dir, tiny_model_dir):
    from potstill.capture.store import Capture
    from potstill.students import build_student
    from potstill.teachers.hf import HFTeacher
    from potstill.train.online import engine_keeps_eos, sample_from_student, setup_modes

    examples = examples_of(capture_dir)
    model, tok, info = build_student("prune:depth:2", tiny_model_dir, [e.input_ids.tolist() for e in examples[:4]])
    model.train()
    greedy = cfg(capture_dir, tmp_path, tiny_model_dir, mode="on-policy", lmbda=1.0, sample_temperature=0.0)
    modes = setup_modes(greedy, model, tok, info, Capture.open(capture_dir), torch.device("cpu"), 0, QUIET)
    group = examples[:3]
    batch = modes.batches(0, [group])[0]
    assert modes.kinds == ["student"] and model.training  # back in train mode after sampling
    rows = [batch.input_ids[b, : int(batch.attention_mask[b].sum())] for b in range(3)]
    eos = tok.eos_token_id
    for e, row in zip(group, rows, strict=True):
        assert row[: e.prompt_len].tolist() == e.input_ids[: e.prompt_len].tolist()
        with torch.no_grad():  # independent reference: transformers' own greedy decoding
            ref = model.eval().generate(torch.from_numpy(e.input_ids[None, : e.prompt_len]), max_new_tokens=12,
                                        do_sample=False, eos_token_id=eos, pad_token_id=tok.pad_token_id)
        model.train()
        ref = ref[0, e.prompt_len :].tolist()
        keep_eos = bool(engine_keeps_eos(HFTeacher(model, tok, name="s")))
        model.train()
        ref = ref[: ref.index(eos) + keep_eos] if eos in ref else ref
        assert row[e.prompt_len :].tolist() == ref
    # sampled at T=1 with the step's seeds: reproducible, and not the capture's completions
    sampled = cfg(capture_dir, tmp_path, tiny_model_dir, mode="on-policy", lmbda=1.0)
    modes.cfg, modes.sampling = sampled, {**modes.sampling, "temperature": 1.0}
    batch = modes.batches(5, [group])[0]
    again = sample_from_student(model, tok, [e.input_ids[: e.prompt_len] for e in group], 12, 1.0, 1.0,
                                modes.sample_seeds(5, 0, 3))
    got = [batch.input_ids[b, group[b].prompt_len : int(batch.attention_mask[b].sum())].tolist() for b in range(3)]
    assert got == again
    assert got != [e.input_ids[e.prompt_len :].tolist() for e in group]
    scored = modes.score(batch)
    assert scored.topk_ids.shape == (batch.n_targets, 64)  # the teacher scores the student's tokens


def test_short_onpolicy_run_lowers_heldout_kl(tmp_path, capture_dir, tiny_model_dir):
    from potstill.evaluate.metrics import fidelity
    from potstill.students import build_student
    from potstill.train.loop import train

    held = examples_of(capture_dir, "heldout")
    # a fresh student starts far from the teacher, so 12 steps move held-out KL well beyond noise
    student = "fresh:layers=1,hidden=32"
    start, _, _ = build_student(student, tiny_model_dir, seed=0)
    out = tmp_path / "s"
    c = cfg(capture_dir, out, tiny_model_dir, mode="on-policy", lmbda=0.5, max_steps=12, loss="jsd", beta=0.5,
            batch_size=4, lr=1e-2, student=student)
    train(c, log=QUIET)
    kinds = [m["batch_kinds"][0] for m in metrics(out)]
    assert set(kinds) == {"student", "capture"}
    from potstill.train.online import TrainModes

    draws = TrainModes(c, None, None, None, 0, {})
    assert kinds == ["student" if draws.is_onpolicy(s, 0) else "capture" for s in range(12)]
    before = fidelity(start, held, 0)["kl"]
    after = fidelity(load(out)[0], held, 0)["kl"]
    assert after < 0.92 * before, (before, after)


# -- hidden-state loss -----------------------------------------------------------------------------


def test_hidden_loss_zero_for_teacher_copy(tmp_path, capture_dir, tiny_model_dir):
    from potstill.train.loop import train

    out = tmp_path / "s"
    train(cfg(capture_dir, out, tiny_model_dir, student=f"pretrained:{tiny_model_dir}", hidden_weight=1.0), log=QUIET)
    assert metrics(out)[0]["hidden"] < 1e-8


def test_hidden_loss_positive_for_pruned_and_decreases(tmp_path, capture_dir, tiny_model_dir):
    from potstill.students.prune import keep_layers
    from potstill.train.loop import train

    model, tok = load(tiny_model_dir)
    keep_layers(model, [0, 2, 3])  # drop a middle layer: layers 2 and 3 now see other inputs
    info = {"dropped_layers": [1], "layers_before": 4}
    out = tmp_path / "s"
    c = cfg(capture_dir, out, tiny_model_dir, student="pretrained:x", hidden_weight=5.0, max_steps=16,
            checkpoint_every=5, lr=3e-3, batch_size=4)
    logs = []
    train(c, log=logs.append, model=model, tokenizer=tok, student_info=info)
    h = [m["hidden"] for m in metrics(out)]
    assert h[0] > 0.01
    assert np.mean(h[-4:]) < 0.8 * np.mean(h[:4]), h
    assert any("teacher layer [0, 2, 3]" in line for line in logs)
    assert (out / "checkpoints" / "step-0000015" / "hidden_projections.pt").exists()
    assert not list(out.glob("hidden_projections*"))  # not part of the saved HF student


def test_hidden_projections_resume_exactly(tmp_path, capture_dir, tiny_model_dir):
    """--resume restores the projections from the checkpoint: same final weights as an uninterrupted run."""
    from potstill.train.loop import train

    def run(out, **kw):
        from potstill.students.prune import keep_layers

        model, tok = load(tiny_model_dir)
        keep_layers(model, [0, 2, 3])
        c = cfg(capture_dir, out, tiny_model_dir, student="pretrained:x", hidden_weight=5.0, max_steps=6,
                checkpoint_every=3, **kw)
        train(c, log=QUIET, model=model, tokenizer=tok, student_info={"dropped_layers": [1], "layers_before": 4})

    run(tmp_path / "full")
    run(tmp_path / "part")
    for f in (tmp_path / "part").glob("*.safetensors"):
        f.unlink()
    run(tmp_path / "part", resume=True)
    a, b = load(tmp_path / "full")[0].state_dict(), load(tmp_path / "part")[0].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_online_mode_distils_from_a_text_only_capture(tmp_path, tiny_model_dir, prompts_file):
    from potstill.train.loop import train

    cap = _capture(tmp_path / "cap", tiny_model_dir, prompts_file, codec="none")
    out = tmp_path / "s"
    logs = []
    train(cfg(cap, out, tiny_model_dir), log=logs.append)
    assert not any("text-only" in line for line in logs)
    assert all(m["kd"] > 0 for m in metrics(out))  # KD from the live teacher, not CE only


# -- loss health -----------------------------------------------------------------------------------


def _warnings(out) -> list[str]:
    return json.loads((out / "train_summary.json").read_text())["loss_health"]["warnings"]


def test_negligible_kd_warning(tmp_path, capture_dir, tiny_model_dir):
    from potstill.train.loop import train

    kw = dict(mode="offline", health_steps=3)
    train(cfg(capture_dir, tmp_path / "bad", tiny_model_dir, ce_weight=0.999, **kw), log=QUIET)
    train(cfg(capture_dir, tmp_path / "good", tiny_model_dir, ce_weight=0.5, **kw), log=QUIET)
    bad = _warnings(tmp_path / "bad")
    assert len(bad) == 1 and "KD term" in bad[0]
    assert _warnings(tmp_path / "good") == []


def test_self_check_offline(capture_dir):
    from potstill.train.health import LossHealth
    from potstill.train.losses import LossConfig

    c = TrainConfig(capture=str(capture_dir), batch_size=4)
    examples = examples_of(capture_dir)
    good = LossHealth(c, LossConfig("fkl"), QUIET).self_check(examples, 0, 300)
    assert good["warnings"] == [] and abs(good["self_check_kd"]) < 1e-4 and good["targets_in_topk"] > 0.5
    # a corrupt capture: the first stored id repeated in every slot
    dup = [replace(e, topk_ids=np.repeat(e.topk_ids[:, :1], e.topk_ids.shape[1], axis=1)) for e in examples]
    bad = LossHealth(c, LossConfig("fkl"), QUIET).self_check(dup, 0, 300)
    assert any("self-check failed" in w for w in bad["warnings"])
    # top-k rows shifted by one token against the completion tokens
    shifted = [replace(e, topk_ids=np.roll(e.topk_ids, 1, axis=0), topk_logprobs=np.roll(e.topk_logprobs, 1, axis=0),
                       tail_logprob=np.roll(e.tail_logprob, 1)) for e in examples]
    bad = LossHealth(c, LossConfig("fkl"), QUIET).self_check(shifted, 0, 300)
    assert any("shifted" in w for w in bad["warnings"])


def test_self_check_online_catches_misaligned_teacher(capture_dir, tiny_model_dir):
    from potstill.train.health import LossHealth
    from potstill.train.losses import LossConfig
    from potstill.train.online import LiveTeacher

    class OffByOne(LiveTeacher):  # scores the position after the one the student predicts from
        def logits(self, batch):
            width = batch.input_ids.shape[1]
            return super().logits(replace(batch, cols=(batch.cols + 1).clamp(max=width - 1)))

    model, tok = load(tiny_model_dir)
    c = TrainConfig(capture=str(capture_dir), batch_size=4, mode="online")
    examples = examples_of(capture_dir)
    good = LossHealth(c, LossConfig("srkl"), QUIET).self_check(examples, 0, 300, LiveTeacher(model, tok))
    assert good["warnings"] == [] and abs(good["self_check_kd"]) < 1e-5
    bad = LossHealth(c, LossConfig("srkl"), QUIET).self_check(examples, 0, 300, OffByOne(model, tok))
    assert len(bad["warnings"]) == 1 and "self-check failed" in bad["warnings"][0]
