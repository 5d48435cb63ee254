"""Green-list watermark: the hash, the processor, de-duplicated scoring and the exact binomial test."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import pytest
import torch

from potstill.errors import PotstillError
from potstill.guard.watermark import (
    Watermark,
    WatermarkConfig,
    WatermarkScore,
    _fmix,
    binomial_logsf,
    detect_ids,
    detect_text,
)
from tests.guard_fixtures import wm_key

MASK = (1 << 64) - 1


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models gain nothing from threads; on a busy 2-core box they lose a lot."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _fmix_ref(x: int) -> int:
    """splitmix64's finaliser on Python ints (uint64 arithmetic by masking)."""
    x &= MASK
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & MASK
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & MASK
    return x ^ (x >> 31)


def test_int64_hash_matches_uint64_reference():
    rng = random.Random(0)
    vals = [rng.getrandbits(64) for _ in range(2000)] + [0, 1, MASK, 1 << 63]
    signed = torch.tensor([v - (1 << 64) if v >= 1 << 63 else v for v in vals], dtype=torch.int64)
    got = [v & MASK for v in _fmix(signed).tolist()]
    assert got == [_fmix_ref(v) for v in vals]


@pytest.mark.parametrize("gamma,self_hash,h", [(0.25, False, 1), (0.5, False, 2), (0.25, True, 3)])
def test_green_fraction_near_gamma(gamma, self_hash, h):
    wm = Watermark(
        WatermarkConfig(key=wm_key("k"), gamma=gamma, self_hash=self_hash, context_width=h, vocab_size=2000)
    )
    mask = wm.green_mask(torch.randint(0, 2000, (1000, h), generator=torch.Generator().manual_seed(1)))
    assert mask.shape == (1000, 2000) and mask.dtype == torch.bool
    frac = mask.float().mean().item()
    assert abs(frac - gamma) < 0.003  # 2M Bernoulli(gamma) draws: sd ~ 3e-4
    # each row is Bernoulli too: per-row fractions spread like Binomial(V, gamma) / V
    row_sd = mask.float().mean(1).std().item()
    assert row_sd == pytest.approx(math.sqrt(gamma * (1 - gamma) / 2000), rel=0.2)


def test_deterministic_per_key_and_keys_differ():
    ctx = torch.randint(0, 500, (64, 1), generator=torch.Generator().manual_seed(0))
    a = Watermark(WatermarkConfig(key=wm_key("secret-a"), vocab_size=500)).green_mask(ctx)
    assert torch.equal(a, Watermark(WatermarkConfig(key=wm_key("secret-a"), vocab_size=500)).green_mask(ctx))
    b = Watermark(WatermarkConfig(key=wm_key("secret-b"), vocab_size=500)).green_mask(ctx)
    # independent lists agree on gamma^2 + (1 - gamma)^2 = 62.5% of ids
    assert (a == b).float().mean().item() == pytest.approx(0.625, abs=0.02)
    # different contexts give different lists under one key
    assert (a[0] == a[1]).float().mean().item() < 0.8


def test_context_width_respected():
    wm1 = Watermark(WatermarkConfig(key=wm_key("k"), context_width=1, vocab_size=300))
    wm2 = Watermark(WatermarkConfig(key=wm_key("k"), context_width=2, vocab_size=300))
    m = lambda wm, c: wm.green_mask(torch.tensor([c]))[0]  # noqa: E731
    # h=2: both context tokens matter, and their order
    assert not torch.equal(m(wm2, [5, 7]), m(wm2, [6, 7]))
    assert not torch.equal(m(wm2, [5, 7]), m(wm2, [7, 5]))
    # only the last h ids of a longer context count
    v = int(m(wm1, [7]).nonzero()[0])
    assert wm1.is_green([1, 2, 3, 7], v) and wm1.is_green([9, 7], v)
    assert all(wm2.is_green([1, 5, 7], t) == wm2.is_green([4, 5, 7], t) for t in range(300))
    with pytest.raises(PotstillError):
        wm2.green_mask(torch.tensor([[1]]))
    with pytest.raises(PotstillError):
        wm2.is_green([3], 4)


@pytest.mark.parametrize("self_hash", [False, True])
def test_processor_adds_delta_to_green_ids_only(self_hash):
    wm = Watermark(WatermarkConfig(key=wm_key("k"), delta=1.5, context_width=2, self_hash=self_hash, vocab_size=97))
    logits = torch.randn(3, 97)
    contexts = [[4, 8, 15], [16], [23, 42]]  # row 1 is shorter than h: left alone
    out = wm.logits_processor(contexts, logits)
    assert torch.equal(out[1], logits[1])
    for row in (0, 2):
        green = torch.tensor([wm.is_green(contexts[row], v) for v in range(97)])
        assert torch.allclose(out[row] - logits[row], green.float() * 1.5)
    assert torch.equal(logits, logits.clone())  # input untouched
    # a processor with delta=0 is the identity
    assert Watermark(WatermarkConfig(key=wm_key("k"), delta=0.0)).logits_processor(contexts, logits) is logits


def test_config_validation_and_public_dict():
    for bad in [
        dict(key=""),
        dict(key=wm_key("k"), gamma=0.0),
        dict(key=wm_key("k"), gamma=1.0),
        dict(key=wm_key("k"), delta=-1),
        dict(key=wm_key("k"), context_width=0),
        dict(key=wm_key("k"), vocab_size=1),
    ]:
        with pytest.raises(PotstillError):
            WatermarkConfig(**bad)
    cfg = WatermarkConfig(key=wm_key("hunter2-but-longer"), vocab_size=10)
    pub = cfg.public_dict()
    assert "key" not in pub and cfg.key not in repr(pub) and cfg.key not in repr(cfg)
    assert cfg.check_fingerprint(pub["key_fingerprint"])
    assert pub["gamma"] == 0.25 and pub["scheme"] == "kgw-lefthash"


# ---- scoring ---------------------------------------------------------------------------------


def test_repeated_text_is_scored_once_per_pair():
    cfg = WatermarkConfig(key=wm_key("k"), vocab_size=1000)
    wm = Watermark(cfg)
    # even a forger who picks a cycle of 5 all-green pairs gets at most 5 pairs scored
    cycle = [1]
    while len(cycle) < 5:
        cycle.append(next(t for t in range(2, 1000) if t not in cycle and wm.is_green(cycle[-1:], t)))
    ids = cycle * 100
    count = wm.score_ids(ids)
    assert count.scored <= 5
    score = detect_ids(ids, cfg)
    assert score.tokens_scored <= 5 and score.p_value >= 0.25**5
    # a shared `seen` set de-duplicates across texts
    seen: set = set()
    assert wm.score_ids(ids, seen=seen).scored == count.scored
    assert wm.score_ids(ids, seen=seen).scored == 0


def test_ignore_first_skips_prompt_positions_but_uses_them_as_context():
    cfg = WatermarkConfig(key=wm_key("k"), vocab_size=1000)
    wm = Watermark(cfg)
    ids = list(range(100, 140))
    full = wm.score_ids(ids)
    assert full.scored == 39  # position 0 has no context (h=1)
    tail = wm.score_ids(ids, ignore_first=30)
    assert tail.scored == 10
    assert tail.green == sum(wm.is_green(ids[:t], ids[t]) for t in range(30, 40))


def test_binomial_tail_matches_exact_sum():
    for n in (1, 5, 17, 40):
        for p in (Fraction(1, 4), Fraction(1, 2), Fraction(9, 10)):
            for k in range(0, n + 2):
                exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
                got = math.exp(binomial_logsf(k, n, float(p)))
                assert got == pytest.approx(float(exact), rel=1e-10, abs=1e-300), (n, p, k)
    # large n, far in the tail: exact rational arithmetic vs the log-space sum
    n, p = 2000, Fraction(1, 4)
    for k in (480, 520, 700, 1500):
        exact = sum(math.comb(n, i) * p**i * (1 - p) ** (n - i) for i in range(k, n + 1))
        log_exact = math.log(exact.numerator) - math.log(exact.denominator)
        assert binomial_logsf(k, n, 0.25) == pytest.approx(log_exact, rel=1e-9)


def test_extreme_scores_stay_finite_in_log_space():
    s = WatermarkScore.from_counts(100_000, 100_000, 0.25)
    assert s.p_value == 0.0 and math.isfinite(s.log10_p)
    assert s.log10_p == pytest.approx(100_000 * math.log10(0.25), rel=1e-9)
    s = WatermarkScore.from_counts(5000, 2100, 0.25)  # ~1e-151: representable, accurate
    assert 0 < s.p_value < 1e-100 and s.log10_p == pytest.approx(math.log10(s.p_value), rel=1e-9)
    assert WatermarkScore.from_counts(0, 0, 0.25).p_value == 1.0
    assert WatermarkScore.from_counts(100, 0, 0.25).p_value == 1.0


@pytest.mark.parametrize("self_hash,h", [(False, 1), (True, 2)])
def test_null_p_values_are_uniform(self_hash, h):
    """Unwatermarked id sequences: p-values roughly uniform (the discrete test is conservative)."""
    cfg = WatermarkConfig(key=wm_key("null-check"), context_width=h, self_hash=self_hash, vocab_size=5000)
    rng = random.Random(7)
    ps = sorted(detect_ids([rng.randrange(5000) for _ in range(400)], cfg).p_value for _ in range(200))
    assert 0.01 <= sum(p < 0.05 for p in ps) / len(ps) <= 0.12
    ks = max(max(abs((i + 1) / len(ps) - p), abs(i / len(ps) - p)) for i, p in enumerate(ps))
    assert ks < 0.15, ks


# ---- the processor on a real (tiny) model ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_teacher(tiny_tokenizer):
    from potstill.teachers.hf import HFTeacher
    from tests.tiny import make_tiny_model

    return HFTeacher(make_tiny_model(tiny_tokenizer, seed=3), tiny_tokenizer, name="tiny")


def _generate(teacher, wm, n=8, tokens=64, seed=0):
    from potstill.teachers.base import SamplingParams

    rng = random.Random(seed)
    vocab = len(teacher.tokenizer)
    prompts = [[rng.randrange(3, vocab) for _ in range(6)] for _ in range(n)]
    params = SamplingParams(max_new_tokens=tokens, top_logprobs=0, seed=seed)
    return teacher.complete_ids(prompts, params, logits_processor=wm)


def test_processor_watermarks_samples_and_detection_finds_it(tiny_teacher):
    vocab = len(tiny_teacher.tokenizer)
    cfg = WatermarkConfig(key=wm_key("our-secret"), vocab_size=vocab)
    marked = _generate(tiny_teacher, Watermark(cfg), seed=1)
    plain = _generate(tiny_teacher, None, seed=2)
    seqs = lambda cs: [c.prompt_ids + c.completion_ids for c in cs]  # noqa: E731
    skips = lambda cs: [len(c.prompt_ids) for c in cs]  # noqa: E731

    hit = detect_ids(seqs(marked), cfg, ignore_first=skips(marked))
    assert hit.tokens_scored > 200 and hit.green_fraction > 0.5 and hit.p_value < 1e-10
    assert detect_ids(seqs(plain), cfg, ignore_first=skips(plain)).p_value > 1e-3
    wrong = WatermarkConfig(key=wm_key("not-our-secret"), vocab_size=vocab)
    assert detect_ids(seqs(marked), wrong, ignore_first=skips(marked)).p_value > 1e-3
    # detection from the decoded text alone (re-tokenised)
    assert detect_text([c.text for c in marked], tiny_teacher.tokenizer, cfg).p_value < 1e-6


def test_bench_watermark_smoke(tiny_teacher, tmp_path):
    import json

    from potstill.bench.watermark import bench_watermark, format_table, seed_prompts

    prompts = seed_prompts(limit=4)
    assert len(prompts) == 4 and prompts[0][0]["role"] == "user"
    cfg = WatermarkConfig(key=wm_key("s3cr3t-bench-key"), vocab_size=len(tiny_teacher.tokenizer))
    out = tmp_path / "bench.json"
    res = bench_watermark(
        tiny_teacher,
        prompts,
        cfg,
        lengths=(8, 24),
        n_pos=4,
        n_neg=4,
        out_json=out,
        min_null_tests=50,
        log=lambda _: None,
    )
    assert json.loads(out.read_text())["lengths"][0]["length"] == 8
    assert "s3cr3t" not in out.read_text()  # the key is never written
    first = res["lengths"][0]
    assert first["n_null"] >= 50 and 0 <= first["fpr"] <= 1 and first["n_watermarked"] <= 4
    ppl = res["perplexity"]["watermarked"]
    assert ppl["ppl_lo"] <= ppl["ppl"] <= ppl["ppl_hi"] and "TPR" in format_table(res)
