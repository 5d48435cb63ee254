"""Radioactivity detection: null models give no evidence, a student of watermarked text is caught.

Tokenizer-free: a tiny random llama over 32 ids plays the watermarked teacher; a student of the
same shape is fit by plain cross-entropy on its watermarked samples.
"""

from __future__ import annotations

import types

import pytest
import torch

from potstill.guard.detect import DetectResult, detect_generations, detect_model
from potstill.guard.watermark import Watermark, WatermarkConfig
from tests.detect_fixtures import V, random_sequences, tiny_llama
from tests.guard_fixtures import wm_key

KEY = wm_key("radioactive-secret")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core box they lose a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@torch.no_grad()
def sample(model, wm: Watermark | None, n: int, length: int, seed: int) -> list[list[int]]:
    """Sample n sequences (random first token), optionally through the watermark processor."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (n, 1), generator=g)
    for _ in range(length - 1):
        logits = model(input_ids=ids).logits[:, -1].float()
        if wm is not None:
            logits = wm.logits_processor(ids.tolist(), logits)
        ids = torch.cat([ids, torch.multinomial(logits.softmax(-1), 1, generator=g)], dim=1)
    return ids.tolist()


@pytest.fixture(scope="module")
def cfg():
    return WatermarkConfig(key=KEY, vocab_size=V)


@pytest.fixture(scope="module")
def watermarked(cfg):
    return sample(tiny_llama(0), Watermark(cfg), n=96, length=48, seed=0)


@pytest.fixture(scope="module")
def student(watermarked):
    """A fresh tiny llama fit to the teacher's watermarked samples (plain CE, ~300 steps)."""
    model = tiny_llama(1).train()
    data = torch.tensor(watermarked)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(300):
        batch = data[torch.randint(0, len(data), (32,), generator=g)]
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def test_null_model_gives_no_evidence(cfg):
    res = detect_model(tiny_llama(5), None, random_sequences(32, 48, seed=1), cfg)
    assert res.tokens_scored > 30 and res.p_value > 0.01
    assert isinstance(res, DetectResult) and res.mode == "model"


def test_null_p_values_over_keys_look_uniform():
    """One never-watermarked model scored under 60 keys: p-values spread over (0, 1]."""
    model, seqs = tiny_llama(6), random_sequences(16, 48, seed=2)
    ps = [
        detect_model(model, None, seqs, WatermarkConfig(key=wm_key(f"k{i}"), vocab_size=V)).p_value for i in range(60)
    ]
    assert sum(p < 0.05 for p in ps) <= 9  # 3 expected; the discrete test is conservative
    assert sum(p > 0.5 for p in ps) >= 18


def test_student_of_watermarked_teacher_is_caught(cfg, student):
    probes = random_sequences(32, 48, seed=3)  # unwatermarked probes: nothing to copy from
    res = detect_model(student, None, probes, cfg)
    assert res.p_value < 1e-6 and res.green_fraction > 0.35, res.summary()
    assert "WATERMARK FOUND" in res.summary()
    d = res.to_dict()
    assert d["tokens_scored"] == res.tokens_scored and cfg.check_fingerprint(d["key_fingerprint"])
    assert KEY not in repr(d)
    # under another key the same student is a null model
    other = detect_model(student, None, probes, WatermarkConfig(key=wm_key("someone-else"), vocab_size=V))
    assert other.p_value > 0.01


class CopyModel(torch.nn.Module):
    """A never-trained 'induction head': predicts the token that followed the last earlier
    occurrence of the current token. Shown watermarked text, it repeats green pairs."""

    def __init__(self):
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids, attention_mask=None):
        b, n = input_ids.shape
        pred = torch.zeros(b, n, dtype=torch.long)
        for i in range(b):
            row, last = input_ids[i].tolist(), {}
            for t, tok in enumerate(row):
                if tok in last:
                    pred[i, t] = row[last[tok] + 1]
                last[tok] = t
        return types.SimpleNamespace(logits=torch.nn.functional.one_hot(pred, V).float())


def test_copying_watermarked_input_is_not_evidence(cfg, watermarked):
    naive = detect_model(CopyModel(), None, watermarked[:32], cfg, exclude_input_pairs=False)
    assert naive.p_value < 1e-6  # why the filter exists: copies of green pairs look radioactive
    res = detect_model(CopyModel(), None, watermarked[:32], cfg)
    assert res.input_pairs_skipped > 0 and res.p_value > 0.01


def test_prompt_lengths_and_max_tokens(cfg):
    model, seqs = tiny_llama(7), random_sequences(8, 40, seed=4)
    full = detect_model(model, None, seqs, cfg, exclude_input_pairs=False)
    assert full.positions == 8 * 40  # t = 1..40 per sequence (h=1)
    part = detect_model(model, None, seqs, cfg, prompt_lengths=[30] * 8, exclude_input_pairs=False)
    assert part.positions == 8 * 11  # t = 30..40
    capped = detect_model(model, None, seqs, cfg, max_tokens=10)
    assert capped.tokens_scored == 10
    # batching does not change the answer
    assert (
        detect_model(model, None, seqs, cfg, batch_size=3).to_dict()
        == detect_model(model, None, seqs, cfg).to_dict()
    )


def test_detect_generations(cfg, watermarked, student):
    hit = detect_generations(watermarked[:16], None, cfg)
    assert hit.p_value < 1e-10 and hit.mode == "generations"
    assert detect_generations(random_sequences(16, 48, seed=5), None, cfg).p_value > 0.01
    # the student's own samples carry the mark too
    assert detect_generations(sample(student, None, n=16, length=48, seed=6), None, cfg).p_value < 1e-4
    # a prompt part is context only; repeats count once
    rep = detect_generations([[1, 2, 3, 4, 5] * 50], None, cfg)
    assert rep.tokens_scored <= 5 and rep.duplicates_skipped >= 240
    skip = detect_generations([list(range(20))], None, cfg, prompt_lengths=[15])
    assert skip.positions == 5


class LookAheadModel(CopyModel):
    """Predicts the actual next token (0 after the last): only pairs read earlier are filtered."""

    def forward(self, input_ids, attention_mask=None):
        pred = torch.cat([input_ids[:, 1:], torch.zeros_like(input_ids[:, :1])], dim=1)
        return types.SimpleNamespace(logits=torch.nn.functional.one_hot(pred, V).float())


def test_input_filter_only_drops_pairs_already_read(cfg):
    res = detect_model(LookAheadModel(), None, [[1, 2, 3, 1, 2, 4]], cfg)
    # t=1..6 -> (1,2) (2,3) (3,1) (1,2) (2,4) (4,0): only t=4 repeats a pair read at t=1
    assert res.positions == 6 and res.input_pairs_skipped == 1 and res.tokens_scored == 5
