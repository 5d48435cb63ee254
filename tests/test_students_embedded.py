"""Width pruning and MoE upcycling on the real embedded teacher (SmolLM2-135M: 9 query heads in 3 KV groups)."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

TEXTS = [
    "The capital of France is Paris, and the capital of Italy is Rome.",
    "Write a short poem about the rain falling on a quiet town at night.",
    "Explain in one sentence why the sky looks blue during the day.",
]


def test_width_and_moe_on_embedded_teacher(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.students import build_student
    from potstill.teachers.hf import resolve_model_dir

    torch.set_num_threads(1)
    tdir = resolve_model_dir("embedded")
    tok = AutoTokenizer.from_pretrained(tdir)
    calib = [tok(t)["input_ids"] for t in TEXTS]
    ids = torch.tensor([calib[0]])

    model, _, info = build_student("prune:width:0.5", tdir, calib)
    cfg = model.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (768, 6, 3, 64)
    # 30 layers lose 768 MLP channels (3 x 576 weights each) and 3 query heads (2 x 576 x 64 each)
    assert info["params"] == info["teacher_params"] - 30 * (768 * 3 * 576 + 3 * 2 * 576 * 64)
    model.save_pretrained(tmp_path / "w")
    with torch.no_grad():
        torch.testing.assert_close(AutoModelForCausalLM.from_pretrained(tmp_path / "w")(input_ids=ids).logits,
                                   model(input_ids=ids).logits)
    del model

    model, _, info = build_student("prune:width:60M", tdir, calib)
    assert abs(info["params"] - 60e6) / 60e6 < 0.01
    del model

    dense, _, _ = build_student("prune:depth:0.5", tdir, calib)
    moe, _, info = build_student("prune:depth:0.5+moe:upcycle:4:2", tdir, calib)
    moe.save_pretrained(tmp_path / "m")
    with torch.no_grad():
        want = dense(input_ids=ids).logits
        got = AutoModelForCausalLM.from_pretrained(tmp_path / "m")(input_ids=ids).logits
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    m = info["moe"]
    mlp = 15 * 3 * 576 * 1536
    assert m["params"] == m["dense_params"] + 3 * mlp + 15 * 4 * 576
    assert m["active_params"] == m["dense_params"] + mlp + 15 * 4 * 576  # top-2 of 4: one MLP more than dense
