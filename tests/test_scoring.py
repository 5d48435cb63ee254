"""Teacher forcing at prefill speed (`score_ids`), EOS kept in captures, and `generate --answers reference`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from potstill.config import GenerateConfig
from potstill.errors import PotstillError
from potstill.teachers.base import SamplingParams
from potstill.teachers.hf import HFTeacher

TEXTS = ["hello", "write a poem about rain", "count", "name three colors please now", "the capital of Italy"]


@pytest.fixture(scope="module")
def teacher(tiny_model_dir):
    return HFTeacher.load(str(tiny_model_dir), dtype="float32")


def dense_reference(teacher, prompt, completion, k):
    """One sequence, one plain full forward, log-softmax over the whole vocabulary."""
    ids = torch.tensor([prompt + completion])
    with torch.no_grad():
        lp = torch.log_softmax(teacher.model(input_ids=ids).logits[0].float(), dim=-1)
    rows = lp[len(prompt) - 1 : len(prompt) + len(completion) - 1]
    chosen = rows.gather(1, torch.tensor(completion)[:, None])[:, 0]
    top_lp, top_ids = rows.topk(k, dim=-1)
    return top_ids.numpy(), top_lp.numpy(), chosen.numpy()


def test_score_ids_equals_dense_reference_and_decoding(teacher):
    prompts = [teacher.encode_chat([{"role": "user", "content": t}]) for t in TEXTS]
    decoded = teacher.complete_ids(prompts, SamplingParams(max_new_tokens=9, top_logprobs=6), seeds=list(range(5)))
    completions = [d.completion_ids for d in decoded]
    # batches of 2 with mixed lengths: right padding must not leak into any row
    scored = teacher.score_ids(prompts, completions, k=6, batch_size=2)
    for p, c, s, d in zip(prompts, completions, scored, decoded, strict=True):
        ids, lp, chosen = dense_reference(teacher, p, c, 6)
        np.testing.assert_array_equal(s.topk_ids, ids)
        np.testing.assert_allclose(s.topk_logprobs, lp, atol=1e-5)
        np.testing.assert_allclose(s.sampled_logprob, chosen, atol=1e-5)
        # the KV-cache decoder saw the same distributions one token at a time
        np.testing.assert_allclose(s.topk_logprobs, d.topk_logprobs, atol=1e-4)
        assert s.finish_reason == "reference" and s.completion_ids == c


def test_score_ids_token_budget_splits_batches(teacher):
    prompts = [teacher.encode_chat([{"role": "user", "content": t}]) for t in TEXTS]
    completions = [[5, 6, 7, 8][: 1 + i % 4] for i in range(len(prompts))]
    seen = []
    a = teacher.score_ids(prompts, completions, k=3, batch_size=5, max_batch_tokens=40,
                          on_rows=lambda t, r: seen.append(r))
    b = teacher.score_ids(prompts, completions, k=3, batch_size=5)
    assert len(seen) > 1 and sum(seen) == len(prompts)
    for x, y in zip(a, b, strict=True):
        np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=1e-5)


def test_include_eos_keeps_the_stop_token(teacher):
    ids = teacher.encode_chat([{"role": "user", "content": "hello"}])
    eos = teacher.eos_ids[0]

    def stop_after_three(contexts, logits):
        for b, ctx in enumerate(contexts):
            if len(ctx) == len(ids) + 3:
                logits[b] = -1e9
                logits[b, eos] = 0.0
            else:
                logits[b, teacher.eos_ids] = -1e9
        return logits

    params = SamplingParams(max_new_tokens=10, top_logprobs=4)
    kept = teacher.complete_ids([ids], params, [1], logits_processor=stop_after_three, include_eos=True)[0]
    plain = teacher.complete_ids([ids], params, [1], logits_processor=stop_after_three)[0]
    assert plain.finish_reason == kept.finish_reason == "stop"
    assert len(plain.completion_ids) == 3 and kept.completion_ids == plain.completion_ids + [eos]
    assert kept.topk_ids.shape == (4, 4) and kept.topk_ids[-1, 0] == eos and len(kept.sampled_logprob) == 4
    assert kept.text == plain.text


def test_generate_answers_reference(tmp_path, teacher, tiny_model_dir):
    from potstill.capture.generate import generate, reference_ids
    from potstill.capture.store import Capture

    records = [{"instruction": f"Say {w}.", "output": f"{w} {w}."} for w in ("blue", "rain", "seven", "cat")]
    prompts = tmp_path / "qa.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = GenerateConfig(teacher=str(tiny_model_dir), prompts=str(prompts), out=str(tmp_path / "cap"), top_k=5,
                         heldout=0.0, dtype="float32", answers="reference", codec="f16")
    generate(cfg, teacher=teacher, log=lambda *_: None)
    cap = Capture.open(tmp_path / "cap")
    assert cap.manifest["sampling"]["answers"] == "reference"
    rows = {r["reference"]: r for r in cap.rows()}
    assert set(rows) == {r["output"] for r in records}
    for ref, r in rows.items():
        assert r["completion_text"] == ref and r["finish_reason"] == "reference"
        assert r["completion_ids"][-1] in teacher.eos_ids
        assert list(r["completion_ids"]) == reference_ids(teacher, r["prompt"], ref, list(r["prompt_ids"]))
        ids, lp, _ = dense_reference(teacher, list(r["prompt_ids"]), list(r["completion_ids"]), 5)
        np.testing.assert_array_equal(r["topk"].ids[:, :5], ids)
        np.testing.assert_allclose(r["topk"].logprobs[:, :5], lp, atol=2e-3)  # f16 codec


def test_answers_reference_needs_references(tmp_path, teacher, tiny_model_dir):
    from potstill.capture.generate import generate

    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"instruction": "a", "output": "b"}) + "\n" + json.dumps({"instruction": "c"}) + "\n")
    cfg = GenerateConfig(teacher=str(tiny_model_dir), prompts=str(prompts), out=str(tmp_path / "cap"),
                         answers="reference")
    with pytest.raises(PotstillError, match=r"1 of 2 prompts have no reference") as e:
        generate(cfg, teacher=teacher, log=lambda *_: None)
    assert str(e.value).startswith(f"{prompts}:2")
    assert not (tmp_path / "cap").exists()
    with pytest.raises(PotstillError, match="samples 1"):
        GenerateConfig(prompts=str(prompts), answers="reference", samples=2)
