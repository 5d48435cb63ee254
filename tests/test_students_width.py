"""Width pruning: dead channels and heads go first, the pruned model round-trips through transformers."""

from __future__ import annotations

import pytest
import torch

from potstill.errors import PotstillError
from potstill.students import build_student
from potstill.students.width import prune_width, unit_params, width_importance
from tests.tiny import make_tiny_model


def _calibration(tok):
    return [tok("The capital of France is Paris. Write a poem about rain.")["input_ids"], tok("Count to ten.")["input_ids"]]


def _ids(tok):
    return torch.tensor([tok("Name two animals: cat, dog. The rain is falling.")["input_ids"]])


def _model(tok, layers=3):
    # 4 query heads in 2 KV groups of 2, head_dim 8, MLP 64 channels
    return make_tiny_model(tok, layers=layers, seed=1, init=0.4)


def test_keep_all_is_the_same_function(tiny_tokenizer):
    model = _model(tiny_tokenizer)
    new, info = prune_width(model, _calibration(tiny_tokenizer), ratio=1.0)
    assert info["params_before"] == info["params_after"]
    with torch.no_grad():
        torch.testing.assert_close(new(input_ids=_ids(tiny_tokenizer)).logits, model(input_ids=_ids(tiny_tokenizer)).logits)


def test_dead_channels_and_heads_go_first(tiny_tokenizer):
    """Units that write nothing are pruned, so cutting exactly them leaves the function unchanged."""
    model = _model(tiny_tokenizer)
    g = torch.Generator().manual_seed(0)
    dead_chan, dead_heads = [], []
    with torch.no_grad():
        for layer in model.model.layers:
            chans = torch.randperm(64, generator=g)[:32]
            layer.mlp.gate_proj.weight[chans] = 0  # silu(0) * up = 0: the channel never fires
            # one query head per KV group writes nothing (its o_proj columns are zero)
            heads = [int(torch.randint(0, 2, (1,), generator=g)), 2 + int(torch.randint(0, 2, (1,), generator=g))]
            for h in heads:
                layer.self_attn.o_proj.weight[:, h * 8 : (h + 1) * 8] = 0
            dead_chan.append(set(chans.tolist()))
            dead_heads.append(heads)
    chan_imp, head_imp = width_importance(model, _calibration(tiny_tokenizer))
    for i in range(3):
        assert all(chan_imp[i][c] == 0 for c in dead_chan[i]) and all(head_imp[i][h] == 0 for h in dead_heads[i])
        live = [c for c in range(64) if c not in dead_chan[i]]
        assert float(chan_imp[i][live].min()) > 0 and float(head_imp[i].max()) > 0
    before = model(input_ids=_ids(tiny_tokenizer)).logits
    new, info = prune_width(model, _calibration(tiny_tokenizer), ratio=0.5)
    assert info["intermediate_size"] == [64, 32] and info["num_attention_heads"] == [4, 2]
    assert info["kept_heads"] == [sorted({0, 1, 2, 3} - set(h)) for h in dead_heads]
    assert info["kept_channel_importance"] == [1.0, 1.0, 1.0]
    with torch.no_grad():
        torch.testing.assert_close(new(input_ids=_ids(tiny_tokenizer)).logits, before, atol=1e-5, rtol=1e-5)


def test_pruned_student_reloads_unchanged(tmp_path, tiny_tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from potstill.teachers.base import SamplingParams
    from potstill.teachers.hf import HFTeacher

    model, tok, info = build_student("prune:width:0.5", tiny_model_dir, _calibration(tiny_tokenizer))
    w = info["width"]
    assert w["intermediate_size"] == [64, 32] and w["num_attention_heads"] == [4, 2]
    assert info["params"] == w["params_after"] < w["params_before"] == info["teacher_params"]
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (32, 2, 2, 8)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded).__name__ == "LlamaForCausalLM"
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=_ids(tok)).logits, model(input_ids=_ids(tok)).logits)
    # the narrower attention still decodes with a KV cache
    out = HFTeacher(loaded, tok, "s").complete([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=5))
    assert len(out[0].completion_ids) >= 1


def test_parameter_target_is_met(tiny_tokenizer):
    model = _model(tiny_tokenizer, layers=4)
    total = sum(p.numel() for p in model.parameters())
    per_channel = unit_params(model)["channel"]
    for target in (0.8 * total, 0.6 * total):
        new, info = prune_width(model, _calibration(tiny_tokenizer), params=target)
        # channels are whole (one per layer at worst off by half): within one channel in every layer
        assert abs(info["params_after"] - target) <= per_channel * 4, (target, info["params_after"])
        assert info["params_after"] == sum(p.numel() for p in new.parameters())
    with pytest.raises(ValueError):
        prune_width(model, _calibration(tiny_tokenizer), params=total * 2)


def test_parameter_target_keeps_the_closest_split(tiny_tokenizer):
    """The split chosen for a target has the lowest calibration KL, and the masked KL is the sliced model's KL."""
    model = _model(tiny_tokenizer, layers=4)
    total = sum(p.numel() for p in model.parameters())
    calib = _calibration(tiny_tokenizer)
    new, info = prune_width(model, calib, params=0.7 * total)
    cands = info["candidates"]
    assert len(cands) == 2 and {c["num_attention_heads"] for c in cands} == {4, 2}
    best = min(cands, key=lambda c: c["calibration_kl"])
    assert (new.config.intermediate_size, new.config.num_attention_heads) == (
        best["intermediate_size"], best["num_attention_heads"])
    with torch.no_grad():
        kl, n = 0.0, 0
        for ids in calib:
            p = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits, -1)
            q = torch.log_softmax(new(input_ids=torch.tensor([ids])).logits, -1)
            kl, n = kl + float((p.exp() * (p - q)).sum()), n + len(ids)
    assert kl / n == pytest.approx(best["calibration_kl"], rel=1e-3, abs=1e-5)


def test_depth_and_width_combine(tiny_tokenizer, tiny_model_dir):
    model, _, info = build_student("prune:width:0.5+prune:depth:2", tiny_model_dir, _calibration(tiny_tokenizer))
    assert model.config.num_hidden_layers == 2 and len(info["dropped_layers"]) == 2
    assert model.config.intermediate_size == 32 and len(info["width"]["kept_heads"]) == 2
    assert "width: MLP 64->32" in info["summary"]


@pytest.mark.parametrize("spec", ["prune:width:0", "prune:width:abc", "prune:width:1e9", "prune:width:0.5+prune:width:0.5",
                                  "prune:height:2"])
def test_bad_width_specs(spec, tiny_model_dir, tiny_tokenizer):
    with pytest.raises(PotstillError):
        build_student(spec, tiny_model_dir, _calibration(tiny_tokenizer))
