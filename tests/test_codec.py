"""Top-k codecs: round trips, the mass rule, id types, fidelity, and the codec benchmark."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from potstill.bench.codec import bench_codec, format_table, synthetic_topk
from potstill.capture.codec import TopK, fidelity, get_codec, id_dtype
from potstill.errors import PotstillError


@pytest.fixture(scope="module")
def topk():
    return synthetic_topk(512, 5000, 20, seed=1)


def _total_mass(d: TopK) -> np.ndarray:
    return np.exp(d.logprobs.astype(np.float64)).sum(axis=1) + np.exp(d.tail_logprob.astype(np.float64))


def test_id_dtype_is_the_smallest_that_fits():
    assert id_dtype(1000) == np.uint16
    assert id_dtype(65536) == np.uint16
    assert id_dtype(65537) == np.uint32
    assert get_codec("mass", 65536, 4).id_type == pa.uint16()
    assert get_codec("f16", 151_936, 4).arrow_fields()[0].type == pa.list_(pa.uint32())


@pytest.mark.parametrize("name", ["f32", "f16", "mass"])
def test_round_trip(name, topk):
    ids, lps = topk
    codec = get_codec(name, 5000, 20)
    row = codec.encode(ids, lps)
    assert all(np.ndim(v) == 1 for v in row.values())  # flat column values
    assert set(row) == {f.name for f in codec.arrow_fields()}
    decoded = codec.decode(row)
    assert decoded.ids.shape == decoded.logprobs.shape == (512, 20)
    assert decoded.ids.dtype == np.int64 and decoded.logprobs.dtype == np.float32
    kept = np.isfinite(decoded.logprobs)
    assert (decoded.ids[kept] == ids[kept]).all()  # ids exact (mass keeps a prefix of each row)
    assert (decoded.ids[~kept] == 0).all()
    np.testing.assert_allclose(_total_mass(decoded), 1.0, atol=1e-5)  # kept + tail = 1
    err = np.abs(np.exp(decoded.logprobs[kept].astype(np.float64)) - np.exp(lps[kept].astype(np.float64)))
    assert err.max() < {"f32": 1e-6, "f16": 2e-3, "mass": 5e-3}[name]
    fid = fidelity(ids, lps, decoded, 5000)
    # mass drops ~7 of 20 entries (~0.05 % of the mass on average): measured on the full top-k partition
    # that costs ~3e-3 nats/token, far more than its grid's rounding
    assert fid["mean_kl"] < {"f32": 1e-7, "f16": 1e-4, "mass": 1e-2}[name]
    assert fid["max_kl"] < {"f32": 1e-5, "f16": 5e-3, "mass": 0.3}[name]
    assert (fid["max_dropped_mass"] > 0) == (name == "mass")


def test_mass_rule_keeps_entries_until_the_mass_is_reached():
    probs = np.array([[0.5, 0.3, 0.15, 0.04, 0.01], [0.999, 0.0005, 0.0003, 0.0001, 0.00005]])
    ids = np.array([[7, 3, 9, 1, 2], [4, 5, 6, 8, 10]])
    lps = np.log(probs).astype(np.float32)
    for mass, k, want in [(0.9, 5, [3, 1]), (0.98, 5, [4, 1]), (0.98, 2, [2, 1]), (1.0, 5, [5, 5])]:
        codec = get_codec("mass", 100, k, mass=mass)
        row = codec.encode(ids, lps)
        assert row["topk_count"].tolist() == want
        assert len(row["topk_ids"]) == sum(want) and len(row["topk_q"]) == sum(w - 1 for w in want)
        decoded = codec.decode(row)
        assert np.isfinite(decoded.logprobs).sum(axis=1).tolist() == want
    # the tail is stored explicitly: for a near-certain token it is the exact 1 - p
    decoded = get_codec("mass", 100, 5).decode(get_codec("mass", 100, 5).encode(ids, lps))
    assert np.exp(decoded.tail_logprob[1]) == pytest.approx(0.001, rel=3e-3)  # float16 log
    assert np.exp(decoded.logprobs[1, 0]) == pytest.approx(0.999, rel=1e-5)


def test_padding_and_unsorted_input():
    with np.errstate(divide="ignore"):  # -inf = padding
        lps = np.log(np.array([[0.1, 0.6, 0.2, 0.0], [0.0, 0.0, 0.0, 0.0]])).astype(np.float32)
    ids = np.array([[11, 12, 13, 0], [0, 0, 0, 0]])
    for name in ("f16", "mass"):
        codec = get_codec(name, 100, 4, **({"mass": 1.0} if name == "mass" else {}))
        d = codec.decode(codec.encode(ids, lps))
        assert d.ids[0, :3].tolist() == [12, 13, 11]  # sorted by descending log-prob
        assert not np.isfinite(d.logprobs[0, 3]) and d.ids[0, 3] == 0
        assert np.exp(d.tail_logprob[0]) == pytest.approx(0.1, rel=2e-3)
        assert not np.isfinite(d.logprobs[1]).any()
        assert d.tail_logprob[1] == pytest.approx(0.0, abs=1e-6)  # nothing stored: all mass in the tail


def test_fewer_columns_than_k_are_padded_and_more_are_cut(topk):
    ids, lps = topk
    codec = get_codec("f16", 5000, 8)
    d = codec.decode(codec.encode(ids, lps))
    assert d.ids.shape == (512, 8) and (d.ids == ids[:, :8]).all()
    codec = get_codec("f16", 5000, 24)
    d = codec.decode(codec.encode(ids, lps))
    assert d.ids.shape == (512, 24) and not np.isfinite(d.logprobs[:, 20:]).any()


def test_empty_completion_round_trips():
    for name in ("f16", "mass"):
        codec = get_codec(name, 100, 4)
        d = codec.decode(codec.encode(np.zeros((0, 4), np.int64), np.zeros((0, 4), np.float32)))
        assert d.ids.shape == (0, 4) and d.tail_logprob.shape == (0,)


def test_none_codec_and_params_rebuild_the_codec():
    none = get_codec("none", 100, 0)
    assert none.arrow_fields() == [] and none.encode(None, None) == {} and none.decode({}) is None
    for name in ("mass", "f16", "none"):
        codec = get_codec(name, 70000, 16)
        again = get_codec(name, **json.loads(json.dumps(codec.params)))
        assert again.params == codec.params and again.arrow_fields() == codec.arrow_fields()


@pytest.mark.parametrize(
    "args, message",
    [
        (("zip", 100, 4), "unknown codec 'zip'"),
        (("mass", 100, 300), "k must be in 1..255"),
        (("mass", 100, 4, {"mass": 0}), "mass must be in (0, 1]"),
        (("mass", 100, 4, {"bits": 4}), "unknown option"),
        (("f16", 100, 0), "k must be >= 1"),
    ],
)
def test_bad_codec_settings_are_potstill_errors(args, message):
    opts = args[3] if len(args) > 3 else {}
    with pytest.raises(PotstillError, match=message.replace("(", r"\(").replace(")", r"\)")):
        get_codec(*args[:3], **opts)


def test_ids_outside_the_vocab_are_refused():
    with pytest.raises(ValueError, match="outside the vocab"):
        get_codec("mass", 100, 2).encode(np.array([[5, 100]]), np.log(np.array([[0.5, 0.4]])))


def test_fidelity_sees_errors_and_foreign_ids(topk):
    ids, lps = topk
    exact = TopK(ids, lps, np.log1p(-np.exp(lps.astype(np.float64)).sum(axis=1)).astype(np.float32))
    assert fidelity(ids, lps, exact, 5000)["mean_kl"] < 1e-8  # float32 rounding only
    lower = (lps - np.float32(0.05) * (np.arange(20) < 3)).astype(np.float32)  # top-3 down 5%, tail takes it
    skewed = TopK(ids, lower, np.log1p(-np.exp(lower.astype(np.float64)).sum(axis=1)).astype(np.float32))
    assert fidelity(ids, lps, skewed, 5000)["mean_kl"] > 1e-4
    foreign = TopK(ids + 1, lps, exact.tail_logprob)
    with pytest.raises(ValueError, match="not among the exact top-k"):
        fidelity(ids, lps, foreign, 5000)


def test_fidelity_counts_what_the_mass_rule_drops():
    """Every codec is measured on the full top-k partition: entries the mass rule drops cost KL (they used to be
    merged into the tail on both sides, which hid them). Reference: plain Python over one row, V = 100."""
    import math

    probs = [0.5, 0.3, 0.15, 0.04, 0.01]
    ids, lps = np.array([[7, 3, 9, 1, 2]]), np.log(np.array([probs])).astype(np.float32)
    codec = get_codec("mass", 100, 5, mass=0.9)
    decoded = codec.decode(codec.encode(ids, lps))
    assert int(np.isfinite(decoded.logprobs).sum()) == 3  # 0.04 and 0.01 dropped
    fid = fidelity(ids, lps, decoded, 100)
    q = [math.exp(x) for x in decoded.logprobs[0, :3]]
    share = math.exp(float(decoded.tail_logprob[0])) / 97  # the stored tail spread over the 97 ids not kept
    want = sum(p * math.log(p / x) for p, x in zip(probs[:3], q, strict=True))
    want += 0.04 * math.log(0.04 / share) + 0.01 * math.log(0.01 / share)
    assert fid["mean_kl"] == pytest.approx(want, rel=1e-3) and fid["mean_kl"] > 0.1
    assert fid["max_dropped_mass"] == pytest.approx(0.05, rel=1e-4) and fid["mean_kept"] == 3
    # the same row kept whole by f32: no loss
    f32 = get_codec("f32", 100, 5)
    assert fidelity(ids, lps, f32.decode(f32.encode(ids, lps)), 100)["mean_kl"] < 1e-6


def test_bench_codec_writes_json_and_mass_is_smaller(tmp_path):
    out = tmp_path / "codec.json"
    result = bench_codec(n_positions=600, vocab=3000, k=20, out_json=out)
    assert json.loads(out.read_text()) == result
    codecs = result["codecs"]
    assert set(codecs) == {"f32", "f16", "mass"}
    assert codecs["mass"]["topk_bytes_per_token"] < codecs["f16"]["topk_bytes_per_token"] < codecs["f32"]["topk_bytes_per_token"]
    assert codecs["f32"]["size_vs_f32"] == 1.0 and codecs["f16"]["mean_kl"] < codecs["mass"]["mean_kl"] < 1e-2
    table = format_table(result)
    assert "mass" in table and "f16" in table and "B/tok" in table
