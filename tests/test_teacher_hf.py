"""The local engine: sampling is per-row seeded and unbiased; top-k come from the sampling distribution."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from potstill.lm.sampling import sample
from potstill.teachers.base import SamplingParams
from potstill.teachers.hf import HFTeacher


def test_sampler_matches_distribution():
    probs = torch.tensor([[0.1, 0.0, 0.6, 0.3]])
    logits = torch.log(probs.clamp_min(1e-30))
    rng = [np.random.default_rng(0)]
    counts = np.bincount([int(sample(logits, None, SamplingParams(), rng)) for _ in range(6000)],
                         minlength=4)
    freq = counts / counts.sum()
    assert counts[1] == 0
    np.testing.assert_allclose(freq, probs[0].numpy(), atol=0.03)


def test_top_p_excludes_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    rng = [np.random.default_rng(1)]
    seen = {int(sample(logits, None, SamplingParams(top_p=0.75), rng)) for _ in range(500)}
    assert seen == {0, 1}


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 1.0), (1.3, 0.9)])
def test_sampler_tail_and_nucleus_beyond_candidates(temperature, top_p):
    """Draws that land past the top candidates (the slow path) keep the distribution exact,
    with temperature and with a top-p nucleus wider than the candidates."""
    from potstill.lm.sampling import SAMPLE_TOP

    vocab, rows = 300, 2000
    logits = torch.cat([torch.linspace(4.0, 1.0, 20), torch.zeros(vocab - 20)])  # long flat tail
    probs = torch.softmax(logits / temperature, -1)
    sorted_p, order = probs.sort(descending=True)
    kept = sorted_p.masked_fill(sorted_p.cumsum(-1) - sorted_p >= top_p, 0.0)
    expected = torch.zeros(vocab).scatter(0, order, kept / kept.sum())
    assert expected[order[SAMPLE_TOP:]].sum() > 0.1  # a real share of draws takes the slow path
    batch = logits.expand(rows, vocab).clone()
    gens = [np.random.default_rng(i) for i in range(rows)]
    params = SamplingParams(temperature=temperature, top_p=top_p)
    draws = torch.cat([sample(batch, None, params, gens) for _ in range(10)])
    freq = torch.bincount(draws, minlength=vocab).double() / len(draws)
    groups = [order[:5], order[5:20], order[20:SAMPLE_TOP], order[SAMPLE_TOP:160], order[160:]]
    for g in groups:
        assert abs(float(freq[g].sum() - expected[g].sum())) < 0.015
    assert float(freq[expected == 0].sum()) == 0.0


def test_completion_independent_of_batch(tiny_model_dir):
    teacher = HFTeacher.load(str(tiny_model_dir), dtype="float32")
    prompts = [teacher.encode_chat([{"role": "user", "content": t}]) for t in ["hello", "write a poem about rain"]]
    params = SamplingParams(max_new_tokens=8, top_logprobs=5)
    both = teacher.complete_ids(prompts, params, seeds=[11, 22])
    alone = teacher.complete_ids(prompts[1:], params, seeds=[22])
    assert both[1].completion_ids == alone[0].completion_ids
    np.testing.assert_allclose(both[1].topk_logprobs, alone[0].topk_logprobs, atol=1e-4)
    # top-k are sorted log-probs of a distribution and contain the sampled token when it is likely
    lp = both[0].topk_logprobs
    assert np.all(np.diff(lp, axis=1) <= 1e-6) and np.all(np.exp(lp).sum(1) <= 1 + 1e-4)


def test_stop_strings_trim(tiny_model_dir):
    teacher = HFTeacher.load(str(tiny_model_dir), dtype="float32")
    ids = teacher.encode_chat([{"role": "user", "content": "hello"}])
    free = teacher.complete_ids([ids], SamplingParams(max_new_tokens=12, temperature=0), seeds=[0])[0]
    assert len(free.text) > 2
    stop = free.text[2:4]
    cut = teacher.complete_ids([ids], SamplingParams(max_new_tokens=12, temperature=0, stop=[stop]), seeds=[0])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and free.text.startswith(cut.text)


def test_continuous_refill_matches_rows_alone(tiny_model_dir):
    """Rows merged into a running batch (KV cache left-padded) decode exactly as they would alone."""
    teacher = HFTeacher.load(str(tiny_model_dir), dtype="float32")
    texts = ["hello", "write a poem about rain", "count", "name three colors please now", "the capital of Italy"]
    prompts = [teacher.encode_chat([{"role": "user", "content": t}]) for t in texts]
    params = SamplingParams(max_new_tokens=40, top_logprobs=4)  # past the KV slab's slack: it moves
    seeds = [5, 6, 7, 8, 9]
    done = []
    refilled = teacher.complete_ids(prompts, params, seeds, batch_size=2, on_token=lambda t, d: done.append(d))
    assert sum(done) == len(prompts)
    for i, p in enumerate(prompts):
        alone = teacher.complete_ids([p], params, [seeds[i]])[0]
        assert refilled[i].completion_ids == alone.completion_ids, i
        np.testing.assert_allclose(refilled[i].topk_logprobs, alone.topk_logprobs, atol=1e-4)
        assert refilled[i].finish_reason == alone.finish_reason


def test_row_params_in_one_batch_match_rows_alone(tiny_model_dir):
    """Rows with their own temperature, top-p, stop strings and max_new_tokens share one batch exactly."""
    teacher = HFTeacher.load(str(tiny_model_dir), dtype="float32")
    prompts = [teacher.encode_chat([{"role": "user", "content": t}]) for t in ["hello", "rain", "count", "colors"]]
    free = teacher.complete_ids(prompts[3:], SamplingParams(max_new_tokens=12, temperature=0), seeds=[0])[0]
    rows = [SamplingParams(max_new_tokens=10, temperature=0.0), SamplingParams(max_new_tokens=6, temperature=0.7),
            SamplingParams(max_new_tokens=12, temperature=1.3, top_p=0.8),
            SamplingParams(max_new_tokens=12, temperature=0.0, stop=[free.text[2:4]])]
    params = SamplingParams(max_new_tokens=12, top_logprobs=3)
    together = teacher.complete_ids(prompts, params, seeds=[1, 2, 3, 4], row_params=rows)
    for i, (p, rp) in enumerate(zip(prompts, rows, strict=True)):
        alone = teacher.complete_ids([p], SamplingParams(**{**rp.to_dict(), "top_logprobs": 3}), seeds=[i + 1])[0]
        assert (together[i].completion_ids, together[i].text, together[i].finish_reason) == \
            (alone.completion_ids, alone.text, alone.finish_reason), i
        assert len(together[i].completion_ids) <= rp.max_new_tokens
    assert together[3].finish_reason == "stop"


def test_batch_lowered_to_fit_memory_decodes_the_same(tiny_model_dir, caplog):
    """Where 64 rows of KV cache would not fit, the engine takes as many rows as fit, says so, and
    every completion is the one an unbounded batch gives."""
    from potstill.lm.kvslab import available_memory, rows_that_fit

    teacher = HFTeacher.load(str(tiny_model_dir), dtype="float32")
    cfg = teacher.model.config
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    texts = ["hello", "write a poem about rain", "count", "name three colors please now", "the capital of Italy"]
    prompts = [teacher.encode_chat([{"role": "user", "content": t}]) for t in texts]
    params = SamplingParams(max_new_tokens=12, top_logprobs=4)
    seeds = [5, 6, 7, 8, 9]
    max_len = max(map(len, prompts)) + params.max_new_tokens
    per_row = 2 * (max_len + 32) * per_token
    memory = int((8192 * per_token + 2.5 * per_row) / 0.8)  # room for two rows and a half
    assert rows_that_fit(64, max_len, per_token, memory, 8192) == 2

    free = teacher.complete_ids(prompts, params, seeds, batch_size=64)
    rows = []
    with caplog.at_level("WARNING", logger="potstill.teachers.hf"):
        bounded = teacher.complete_ids(prompts, params, seeds, batch_size=64, memory=memory,
                                       on_token=lambda t, d: rows.append(t))
    assert teacher._kv_token_bytes == per_token
    assert max(rows) == 2 and "batch lowered from 5 to 2 rows" in caplog.text
    for a, b in zip(free, bounded, strict=True):
        assert a.completion_ids == b.completion_ids
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-4)
    assert available_memory(torch.device("cpu")) > 0  # Linux: MemAvailable
    assert rows_that_fit(64, max_len, per_token, 10**12, 8192) == 64 and rows_that_fit(64, max_len, per_token, 0, 8192) == 1


def test_decode_attention_equals_sdpa(tiny_model_dir):
    """The CPU decode attention (matmuls, grouped queries) gives SDPA's logits, padding included."""
    from transformers import AutoModelForCausalLM

    from potstill.lm.attention import NAME, use_decode_attention

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation="sdpa")
    assert model.config.num_key_value_heads < model.config.num_attention_heads  # GQA is exercised

    def decode(m):
        ids = torch.randint(3, 100, (3, 9), generator=torch.Generator().manual_seed(0))
        attn = torch.ones_like(ids)
        attn[0, :4] = 0  # left padding must stay masked
        with torch.no_grad():
            out = m(input_ids=ids, attention_mask=attn, use_cache=True)
            cache, logits = out.cache, [out.logits[:, -1]]
            for _ in range(4):
                attn = torch.cat([attn, attn.new_ones((3, 1))], 1)
                step = logits[-1].argmax(-1)[:, None]
                out = m(input_ids=step, attention_mask=attn, position_ids=attn.sum(-1, keepdim=True) - 1,
                        cache=cache, use_cache=True)
                cache = out.cache
                logits.append(out.logits[:, -1])
        return torch.stack(logits)

    ref = decode(model)
    assert use_decode_attention(model) and model.config._attn_implementation == NAME
    torch.testing.assert_close(decode(model), ref, atol=1e-5, rtol=1e-5)


def test_shared_prefix_prefilled_once_decodes_the_same(tiny_model_dir):
    """Prompts that share a system turn: prefilling it once and copying its KV gives the same
    completions and top-k as prefilling every prompt whole."""
    teacher = HFTeacher.load(str(tiny_model_dir), dtype="float32")
    system = {"role": "system", "content": "You are a careful assistant who answers briefly."}
    texts = ["hello", "write a poem about rain", "count to five", "name three colors please now"]
    prompts = [teacher.encode_chat([system, {"role": "user", "content": t}]) for t in texts]
    shared = teacher._shared_prefix(prompts)
    assert shared is not None and shared[0] >= len(teacher.encode_chat([system])) // 2
    params = SamplingParams(max_new_tokens=10, top_logprobs=4)
    with_prefix = teacher.complete_ids(prompts, params, seeds=[1, 2, 3, 4], batch_size=3)
    whole = teacher.complete_ids(prompts, params, seeds=[1, 2, 3, 4], batch_size=3, share_prefix=False)
    for a, b in zip(with_prefix, whole, strict=True):
        assert a.completion_ids == b.completion_ids
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-4)
    # n samples of one prompt share all of it but the last token
    same = teacher.complete_ids([prompts[1]] * 3, params, seeds=[7, 8, 9])
    alone = teacher.complete_ids([prompts[1]], params, seeds=[8])[0]
    assert teacher._shared_prefix([prompts[1]] * 3)[0] == len(prompts[1]) - 1
    assert same[1].completion_ids == alone.completion_ids


def test_kv_slab_matches_plain_tensor_ops_and_writes_in_place():
    """Decode steps, dropping rows, adding wider rows, trimming: every live row's visible keys equal
    the same edits done with torch.cat/indexing, and the masks show each row only its own columns."""
    from transformers.cache_utils import DynamicCache

    from potstill.lm.kvslab import SlabCache

    g = torch.Generator().manual_seed(0)

    def kv(b, w):
        return torch.randn(b, 2, w, 4, generator=g), torch.randn(b, 2, w, 4, generator=g)

    def visible(layer, slab, attn):  # each row's unmasked keys, in order
        window = layer.kbuf[: slab.rows, :, slab.lo : slab.hi]
        return [window[r][:, attn[r].bool()] for r in range(slab.rows)]

    k0, v0 = kv(3, 5)
    attn = torch.ones(3, 5, dtype=torch.long)
    attn[0, :2] = 0  # a left-padded row
    slab = SlabCache(DynamicCache(ddp_cache_data=[(k0, v0)]), attn, row_capacity=4, max_len=30, slack=4)
    layer = slab.cache.layers[0]
    ref = [k0[r][:, attn[r].bool()] for r in range(3)]
    buffers = set()
    for _ in range(6):  # decode steps
        attn = torch.cat([attn, attn.new_ones((3, 1))], 1)
        mask = slab.step_mask(attn)
        assert mask.shape == (3, 1, 1, slab.columns) and mask[:, 0, 0].sum() == attn.sum()
        k1, v1 = kv(3, 1)
        keys, _ = layer.update(k1, v1)
        assert keys.is_contiguous() and keys.shape[2] == slab.columns
        slab.advance()
        ref = [torch.cat([ref[r], k1[r]], 1) for r in range(3)]
        buffers.add(layer.kbuf.data_ptr())
    assert len(buffers) <= 2  # written in place; one move when the window reached the edge
    for got, want in zip(visible(layer, slab, attn), ref, strict=True):
        torch.testing.assert_close(got, want)
    order = slab.keep_rows([0, 2])  # row 2 moves into the free slot 1
    assert order == [0, 2]
    attn, ref = attn[order], [ref[r] for r in order]
    k2, _ = kv(2, 14)  # wider than the live rows: they get hidden columns on the left
    attn = slab.add_rows(DynamicCache(ddp_cache_data=[(k2, k2)]), attn, torch.ones(2, 14, dtype=torch.long))
    ref += [k2[0], k2[1]]
    assert attn.shape == (4, 14)
    for got, want in zip(visible(layer, slab, attn), ref, strict=True):
        torch.testing.assert_close(got, want)
    order = slab.keep_rows([2, 3])
    attn, ref = slab.trim_left(attn[order]), [ref[r] for r in order]
    assert attn.shape == (2, 14)  # the new rows use every column
    attn[:, :4] = 0
    attn = slab.trim_left(attn)
    assert attn.shape == (2, 10) and slab.hi - slab.lo == 10
    torch.testing.assert_close(layer.kbuf[:2, :, slab.lo : slab.hi], k2[:, :, 4:])


def test_kv_slab_takes_sliding_window_layers_only_while_sequences_fit():
    from transformers.cache_utils import DynamicCache, DynamicSlidingWindowLayer

    from potstill.errors import PotstillError
    from potstill.lm.kvslab import SlabCache

    def cache(window):
        c = DynamicCache()
        layer = DynamicSlidingWindowLayer(sliding_window=window)
        layer.update(torch.zeros(2, 1, 6, 4), torch.zeros(2, 1, 6, 4))
        c.layers = [layer]
        return c

    attn = torch.ones(2, 6, dtype=torch.long)
    assert SlabCache(cache(64), attn, row_capacity=2, max_len=40).rows == 2
    with pytest.raises(PotstillError, match="16-token window < prompt \\+ new tokens \\(40\\)"):
        SlabCache(cache(16), attn, row_capacity=2, max_len=40)
