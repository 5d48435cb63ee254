"""MoE upcycling: the Mixtral student starts as the dense function, reloads unchanged, trains with the router loss."""

from __future__ import annotations

import json
import math

import pytest
import torch

from potstill.errors import PotstillError
from potstill.students import build_student
from potstill.students.moe import moe_params, upcycle
from potstill.train.data import collate, examples_from_capture, student_logits
from tests.tiny import make_tiny_model


def _calibration(tok):
    return [tok("The capital of France is Paris. Write a poem about rain.")["input_ids"]]


def _ids(tok):
    return torch.tensor([tok("Name two animals: cat, dog. The rain is falling.")["input_ids"]])


@pytest.fixture(scope="module")
def moe_capture(tmp_path_factory, tiny_model_dir):
    from potstill.capture.generate import generate
    from potstill.config import GenerateConfig

    prompts = tmp_path_factory.mktemp("moe-prompts") / "p.jsonl"
    texts = ["Name a color.", "Say hello to the rain.", "Count to three.", "What is the capital of France?",
             "List two animals.", "Explain gravity.", "Summarize the text.", "Best way to rest?"]
    prompts.write_text("".join(json.dumps({"instruction": t}) + "\n" for t in texts))
    out = tmp_path_factory.mktemp("moe-cap") / "capture"
    generate(GenerateConfig(teacher=str(tiny_model_dir), prompts=str(prompts), out=str(out), max_new_tokens=12,
                            top_k=8, batch_size=4, heldout=0.0, dtype="float32"), log=lambda *_: None)
    return out


def test_upcycled_equals_dense_at_init(tiny_tokenizer):
    dense = make_tiny_model(tiny_tokenizer, layers=2, seed=3, init=0.4)
    moe, info = upcycle(dense, experts=4, top_k=2)
    assert type(moe).__name__ == "MixtralForCausalLM"
    with torch.no_grad():
        want = dense(input_ids=_ids(tiny_tokenizer)).logits
        torch.testing.assert_close(moe(input_ids=_ids(tiny_tokenizer)).logits, want, atol=1e-4, rtol=1e-5)
        noisy, _ = upcycle(dense, experts=4, top_k=2, noise=0.05)
        gap = (noisy(input_ids=_ids(tiny_tokenizer)).logits - want).abs().max()
    assert 0 < gap < 0.2 * want.abs().max()  # noise moves the experts apart, a little
    # parameter accounting against an independent count from the dense model
    mlp = sum(p.numel() for n, p in dense.named_parameters() if ".mlp." in n)
    router = 2 * 4 * dense.config.hidden_size
    dense_n = sum(p.numel() for p in dense.parameters())
    assert info["params"] == dense_n + 3 * mlp + router
    assert info["active_params"] == dense_n + mlp + router == moe_params(moe)["active_params"]


def test_moe_student_reloads_and_decodes(tmp_path, tiny_tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from potstill.teachers.base import SamplingParams
    from potstill.teachers.hf import HFTeacher

    model, tok, info = build_student("moe:upcycle:4:2+prune:depth:2", tiny_model_dir, _calibration(tiny_tokenizer))
    assert model.config.num_hidden_layers == 2 and model.config.num_local_experts == 4
    assert info["moe"]["experts"] == 4 and "active of" in info["summary"]
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "MixtralForCausalLM" and loaded.config.tie_word_embeddings
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_ids(tok)).logits, model(input_ids=_ids(tok)).logits)
    out = HFTeacher(loaded, tok, "s").complete([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=6))
    assert len(out[0].completion_ids) >= 1


def test_aux_loss_matches_transformers(tiny_tokenizer, moe_capture):
    """student_logits' aux term is the one MixtralForCausalLM computes itself (padding masked out)."""
    from potstill.capture.store import Capture

    dense = make_tiny_model(tiny_tokenizer, layers=2, seed=3, init=0.4)
    moe, _ = upcycle(dense, experts=4, top_k=2)
    batch = collate(examples_from_capture(Capture.open(moe_capture))[:3], tiny_tokenizer.pad_token_id)
    assert int(batch.attention_mask.sum()) < batch.attention_mask.numel()  # there is padding to mask
    with torch.no_grad():
        logits, aux = student_logits(moe, batch, with_aux=True)
        ref = moe(input_ids=batch.input_ids, attention_mask=batch.attention_mask, output_router_logits=True)
    torch.testing.assert_close(aux, ref.aux_loss)
    torch.testing.assert_close(logits, ref.logits[batch.rows, batch.cols])
    assert student_logits(dense, batch, with_aux=True)[1] is None


def test_moe_student_trains_with_router_loss(tmp_path, moe_capture, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from potstill.config import TrainConfig
    from potstill.train.loop import train

    out = tmp_path / "moe-student"
    lines = []
    cfg = TrainConfig(capture=str(moe_capture), out=str(out), teacher=str(tiny_model_dir),
                      student="prune:depth:2+moe:upcycle:4:2:0.01", loss="fkl", max_steps=8, batch_size=4,
                      warmup_steps=1, lr=1e-2, checkpoint_every=0, bf16="off", calibration=4)
    train(cfg, log=lines.append)
    assert any("moe: 4 experts top-2" in ln for ln in lines) and "router_aux" in lines[-1]
    metrics = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 8 and all(math.isfinite(m["router_aux"]) and m["router_aux"] > 0 for m in metrics)
    assert metrics[-1]["loss"] < 0.8 * metrics[0]["loss"]
    loaded = AutoModelForCausalLM.from_pretrained(out)
    assert type(loaded).__name__ == "MixtralForCausalLM"
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["student"]["moe"]["active_params"] < prov["student"]["moe"]["params"]


@pytest.mark.parametrize("spec", ["moe:upcycle:2:3", "moe:upcycle:x", "moe:upcycle:4:2:-1", "moe:split"])
def test_bad_moe_specs(spec, tiny_model_dir, tiny_tokenizer):
    with pytest.raises(PotstillError):
        build_student(spec, tiny_model_dir, _calibration(tiny_tokenizer))


def test_width_pruned_then_upcycled(tiny_tokenizer, tiny_model_dir):
    """Upcycling keeps a width-pruned student's explicit head_dim and narrower MLP: same function."""
    dense, _, _ = build_student("prune:width:0.5", tiny_model_dir, _calibration(tiny_tokenizer))
    moe, _, info = build_student("moe:upcycle:2:1+prune:width:0.5", tiny_model_dir, _calibration(tiny_tokenizer))
    assert (moe.config.head_dim, moe.config.num_attention_heads, moe.config.intermediate_size) == (8, 2, 32)
    with torch.no_grad():
        torch.testing.assert_close(moe(input_ids=_ids(tiny_tokenizer)).logits, dense(input_ids=_ids(tiny_tokenizer)).logits,
                                   atol=1e-4, rtol=1e-5)
