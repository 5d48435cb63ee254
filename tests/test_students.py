"""Students: depth pruning drops the least influential layers; fresh configs fit a budget."""

from __future__ import annotations

import pytest
import torch

from potstill.errors import PotstillError
from potstill.students import build_student, parse_amount
from potstill.students.fresh import shape_for_budget
from potstill.students.prune import block_influence, prune_depth
from tests.tiny import make_tiny_model


def _calibration(tok):
    return [tok("The capital of France is Paris. Write a poem about rain.")["input_ids"]] * 2


def test_identity_layers_are_dropped_first(tiny_tokenizer):
    model = make_tiny_model(tiny_tokenizer, layers=5)
    with torch.no_grad():
        for i in (1, 3):  # zero the residual writes: layers 1 and 3 become exact identities
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    scores = block_influence(model, _calibration(tiny_tokenizer))
    assert scores[1] == pytest.approx(0, abs=1e-6) and scores[3] == pytest.approx(0, abs=1e-6)
    assert min(scores[0], scores[2], scores[4]) > 1e-4
    ids = torch.tensor([_calibration(tiny_tokenizer)[0]])
    before = model(input_ids=ids).logits
    info = prune_depth(model, _calibration(tiny_tokenizer), keep=3)
    assert info["dropped_layers"] == [1, 3]
    assert model.config.num_hidden_layers == 3 and len(model.model.layers) == 3
    # dropping identity layers leaves the function unchanged, and the KV-cache layer indices are renumbered
    torch.testing.assert_close(model(input_ids=ids).logits, before, atol=1e-5, rtol=1e-5)
    assert [layer.self_attn.layer_idx for layer in model.model.layers] == [0, 1, 2]


def test_pruned_model_generates_with_cache(tiny_tokenizer, tiny_model_dir):
    from potstill.teachers.base import SamplingParams
    from potstill.teachers.hf import HFTeacher

    model, tok, info = build_student("prune:depth:0.5", tiny_model_dir, _calibration(tiny_tokenizer))
    assert info["layers_after"] == 2
    out = HFTeacher(model, tok, "s").complete([[{"role": "user", "content": "hi"}]], SamplingParams(max_new_tokens=5))
    assert len(out[0].completion_ids) >= 1


def test_fresh_student_fits_budget(tiny_model_dir):
    h, layers = shape_for_budget(60e6, 49152)
    total = 49152 * h + layers * (4 * h * h + 3 * h * int(8 * h / 3))
    assert 0.7 < total / 60e6 < 1.3
    model, tok, info = build_student("fresh:layers=3,hidden=64", tiny_model_dir)
    assert model.config.num_hidden_layers == 3 and model.config.vocab_size == len(tok)


@pytest.mark.parametrize("spec", ["prune:breadth", "bogus:1", "pretrained:/nonexistent", "prune:depth:99"])
def test_bad_student_specs(spec, tiny_model_dir, tiny_tokenizer):
    with pytest.raises(PotstillError):
        build_student(spec, tiny_model_dir, _calibration(tiny_tokenizer))


def test_parse_amount():
    assert parse_amount("0.5", 30, "x") == 15 and parse_amount("12", 30, "x") == 12
