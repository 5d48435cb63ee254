"""Packed training batches (train/data.py collate_packed): several examples per row, kept apart by position
ids. The student's logits at the learned positions, the loss and its gradients equal the padded batch's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from potstill.train.data import Example, collate, collate_packed, student_logits
from tests.tiny import make_tiny_model, make_tiny_tokenizer


def examples(lengths: list[int], prompt: int = 5, k: int = 4, vocab: int = 300, seed: int = 0) -> list[Example]:
    rng = np.random.default_rng(seed)
    out = []
    for n in lengths:
        t = n - prompt
        ids = rng.integers(3, vocab, size=(t, k))
        lps = np.log(rng.dirichlet(np.ones(k + 1), size=t)[:, :k]).astype(np.float32)
        out.append(Example(input_ids=rng.integers(3, vocab, size=n).astype(np.int64), prompt_len=prompt, topk_ids=ids,
                           topk_logprobs=lps, tail_logprob=np.full(t, -3.0, dtype=np.float32)))
    return out


@pytest.fixture(scope="module")
def model():
    return make_tiny_model(make_tiny_tokenizer(), layers=2, hidden=32, init=0.2)


LENGTHS = [40, 9, 17, 33, 8, 12, 40, 6]


def test_packing_fills_rows_and_keeps_the_learned_positions_in_order():
    ex = examples(LENGTHS)
    padded, packed = collate(ex, 0), collate_packed(ex, 0)
    assert packed.input_ids.shape[0] < padded.input_ids.shape[0]  # 8 rows of 40 -> fewer rows of <= 40
    assert packed.input_ids.shape[1] <= max(LENGTHS)
    assert int(packed.attention_mask.sum()) == int(padded.attention_mask.sum()) == sum(LENGTHS)
    assert packed.input_ids.numel() < 0.75 * padded.input_ids.numel()
    # the same targets, top-k and tails, in the same order; each target sits after its position in the row
    assert torch.equal(packed.targets, padded.targets) and torch.equal(packed.topk_ids, padded.topk_ids)
    assert torch.equal(packed.input_ids[packed.rows, packed.cols + 1], packed.targets)
    # positions restart at each example (and at the padding)
    assert int((packed.position_ids == 0).sum()) >= len(LENGTHS)


def test_packed_logits_loss_and_gradients_equal_the_padded(model):
    from potstill.train.losses import LossConfig, distill_loss

    ex = examples(LENGTHS, seed=1)
    cfg = LossConfig(kind="fkl")
    grads, logits, losses = [], [], []
    for batch in (collate(ex, 0), collate_packed(ex, 0)):
        model.zero_grad(set_to_none=True)
        lg = student_logits(model, batch)
        loss = distill_loss(lg, batch.targets, batch.topk_ids, batch.topk_logprobs, batch.tail_logprob, cfg)["loss_sum"]
        loss.backward()
        logits.append(lg.detach())
        losses.append(float(loss.detach()))
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    torch.testing.assert_close(logits[1], logits[0], atol=2e-5, rtol=1e-4)
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-5, rtol=1e-4)


def test_without_positions_the_packed_rows_would_leak(model):
    """The check above can fail: the same packed rows read as one sequence (no position ids) give other logits."""
    ex = examples(LENGTHS, seed=2)
    packed = collate_packed(ex, 0)
    with torch.no_grad():
        right = student_logits(model, packed)
        packed.position_ids = None
        packed.attention_mask = torch.ones_like(packed.attention_mask)
        wrong = student_logits(model, packed)
        reference = student_logits(model, collate(ex, 0))
    torch.testing.assert_close(right, reference, atol=2e-5, rtol=1e-4)
    assert (wrong - reference).abs().max() > 1e-3
