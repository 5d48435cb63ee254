"""`potstill bench generate`: completion tokens/s of the local teacher engine against its anchors.

Same model, same prompts, same token budget, in one run:
- `hf-naive`: `model.generate` one prompt at a time (no log-probs);
- `hf-batched+logprobs`: batched `model.generate` returning the logits, top-k taken afterwards;
- `potstill`: the batched KV-cache engine of potstill.lm.engine with top-k log-probs, all prompts in
  one call (continuous refill keeps `batch_size` rows decoding);
- `potstill score`: teacher forcing of the completions potstill just wrote (`score_ids`, the path of
  `generate --answers reference`), completion tokens scored per second;
- `potstill int8`: the engine over an int8 copy of the float32 model (lm/quantize.py), decoder-layer
  linears only and with the output head too, each with its top-k (+ tail) KL to the float32 model
  on the completions potstill wrote, teacher-forced (the gate of `generate --quantize int8`: 1e-3).
The HF rows run with transformers' stock SDPA attention; potstill with its CPU decode attention.
Ratios are reported against `hf-batched+logprobs` (the anchor), so machine noise cancels.
"""

from __future__ import annotations

import platform
import time
from typing import Any

import torch

from potstill.bench.config import BenchGenerateConfig
from potstill.present import text_table
from potstill.utils import cpu_info, cpu_line, write_json


def _chat_ids(teacher, prompts) -> list[list[int]]:
    return [teacher.encode_chat(p.messages) for p in prompts]


@torch.no_grad()
def hf_naive(teacher, ids: list[list[int]], max_new_tokens: int) -> int:
    tokens = 0
    for p in ids:
        x = torch.tensor([p])
        out = teacher.model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                     do_sample=True, pad_token_id=teacher.pad_id)
        tokens += _count(out[0, len(p):].tolist(), teacher.eos_ids)
    return tokens


@torch.no_grad()
def hf_batched_logprobs(teacher, ids: list[list[int]], max_new_tokens: int, batch_size: int, k: int) -> int:
    tok = teacher.tokenizer
    tokens = 0
    for s in range(0, len(ids), batch_size):
        chunk = ids[s : s + batch_size]
        width = max(map(len, chunk))
        x = torch.full((len(chunk), width), teacher.pad_id)
        mask = torch.zeros_like(x)
        for i, p in enumerate(chunk):
            x[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        out = teacher.model.generate(x, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=True,
                                     pad_token_id=tok.pad_token_id or teacher.pad_id, output_logits=True,
                                     return_dict_in_generate=True)
        for step_logits in out.logits:  # the log-probs a capture needs, from the logits generate kept
            torch.log_softmax(step_logits.float(), -1).topk(k, dim=-1)
        for row in out.sequences[:, width:].tolist():
            tokens += _count(row, teacher.eos_ids)
    return tokens


def potstill_engine(teacher, ids: list[list[int]], max_new_tokens: int, batch_size: int, k: int) -> list:
    from potstill.lm.types import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_logprobs=k)
    return teacher.complete_ids(ids, params, batch_size=batch_size, include_eos=True)


def stock_attention(teacher, on: bool) -> None:
    """Anchors run transformers as it ships (SDPA); potstill rows with its decode attention."""
    from potstill.lm.attention import use_decode_attention

    if on:
        teacher.model.set_attn_implementation("sdpa")
    else:
        use_decode_attention(teacher.model)


def _count(row: list[int], eos: list[int]) -> int:
    for i, t in enumerate(row):
        if t in eos:
            return i
    return len(row)


_D = BenchGenerateConfig()  # the settings' one home


def bench_generate(teacher, prompts, max_new_tokens: int = _D.max_new_tokens, batch_size: int = _D.batch_size,
                   k: int = _D.k, naive_prompts: int = _D.naive_prompts, out_json: str | None = None, log=print,
                   max_prompt_tokens: int | None = 512, quantize: str = _D.quantize) -> dict[str, Any]:
    """Run the decoders on the same prompts; returns (and writes) tokens/s and ratios.

    Prompts longer than `max_prompt_tokens` are left out: one very long prompt pads a whole
    `model.generate` batch to its length, which measures padding rather than decoding.
    """
    ids = sorted(_chat_ids(teacher, prompts), key=len)
    if max_prompt_tokens:
        dropped = sum(len(p) > max_prompt_tokens for p in ids)
        ids = [p for p in ids if len(p) <= max_prompt_tokens]
        if dropped:
            log(f"left out {dropped} prompt(s) longer than {max_prompt_tokens} tokens")
    torch.manual_seed(0)
    potstill_engine(teacher, ids[:2], 4, 2, k)  # warm-up
    results = []
    written: list = []

    def run_potstill() -> int:
        written[:] = potstill_engine(teacher, ids, max_new_tokens, batch_size, k)
        return sum(len(c.completion_ids) for c in written)

    def run_score() -> int:
        teacher.score_ids([c.prompt_ids for c in written], [c.completion_ids for c in written], k, batch_size)
        return sum(len(c.completion_ids) for c in written)

    runs = [
        ("hf-naive (per prompt, no log-probs)", lambda: hf_naive(teacher, ids[:naive_prompts], max_new_tokens),
         naive_prompts, True),
        ("hf-batched+logprobs (anchor)", lambda: hf_batched_logprobs(teacher, ids, max_new_tokens, batch_size, k),
         len(ids), True),
        ("potstill", run_potstill, len(ids), False),
        ("potstill score (teacher forcing)", run_score, len(ids), False),
    ]
    for name, fn, n, stock in runs:
        stock_attention(teacher, stock)
        t0 = time.perf_counter()
        tokens = fn()
        seconds = time.perf_counter() - t0
        results.append({"decoder": name, "prompts": n, "tokens": tokens, "seconds": round(seconds, 2),
                        "tokens_per_s": round(tokens / seconds, 1)})
        log(f"{name}: {tokens} tokens in {seconds:.1f}s = {tokens / seconds:.1f} tok/s")
    stock_attention(teacher, False)
    if quantize != "none":
        results += int8_rows(teacher, ids, written, max_new_tokens, batch_size, k, log)
    anchor = results[1]["tokens_per_s"]
    for r in results:
        r["vs_anchor"] = round(r["tokens_per_s"] / anchor, 2)
    out = {
        "model": teacher.name,
        "dtype": str(next(teacher.model.parameters()).dtype),
        "max_new_tokens": max_new_tokens,
        "batch_size": batch_size,
        "top_k": k,
        "max_prompt_tokens": max_prompt_tokens,
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "cpu": cpu_info(),
        "results": results,
    }
    if out_json:
        write_json(out_json, out)
    return out


def int8_rows(teacher, ids: list[list[int]], written: list, max_new_tokens: int, batch_size: int, k: int,
              log=print) -> list[dict[str, Any]]:
    """The engine over int8 copies of the model (layers; layers + head): tokens/s and KL to float32."""
    from potstill.errors import PotstillError
    from potstill.lm.quantize import (
        MAX_KL,
        QUANTIZE_HEAD,
        bucket_kl,
        check_quantizable,
        input_maxima,
        quantized_copy,
        reference_buckets,
    )

    try:
        check_quantizable(teacher.model, "int8")
    except PotstillError as e:
        log(f"int8 rows left out: {e}")
        return []
    prompts, completions = [c.prompt_ids for c in written], [c.completion_ids for c in written]
    with input_maxima(teacher.model) as input_max:  # SmoothQuant's calibration, in the reference pass
        reference = reference_buckets(teacher, prompts, completions, k)
    rows = []
    for head in (False, True):
        engine = quantized_copy(teacher, head=head, input_max=input_max)
        potstill_engine(engine, ids[:2], 4, 2, k)  # warm-up
        t0 = time.perf_counter()
        tokens = sum(len(c.completion_ids) for c in potstill_engine(engine, ids, max_new_tokens, batch_size, k))
        seconds = time.perf_counter() - t0
        kl, n = bucket_kl(engine, prompts, completions, reference)
        name = f"potstill int8 ({'layers + head' if head else 'layers'})"
        rows.append({"decoder": name, "prompts": len(ids), "tokens": tokens, "seconds": round(seconds, 2),
                     "tokens_per_s": round(tokens / seconds, 1), "kl_topk_vs_fp32": kl, "kl_tokens": n,
                     "meets_bar": kl <= MAX_KL, "generate_uses": head == QUANTIZE_HEAD})
        log(f"{name}: {tokens} tokens in {seconds:.1f}s = {tokens / seconds:.1f} tok/s; top-{k} KL to float32 "
            f"{kl:.2e} nats/token over {n} tokens")
        del engine
    return rows


def format_table(result: dict[str, Any]) -> str:
    lines = [f"bench generate: {result['model']} ({result['dtype']}), {result['max_new_tokens']} new tokens, "
             f"batch {result['batch_size']}, top-{result['top_k']} log-probs, {result['threads']} threads"
             + (f", {cpu_line(result['cpu'])}" if result.get("cpu") else "")]
    rows = [[r["decoder"], r["prompts"], r["tokens"], f"{r['tokens_per_s']:.1f}", f"{r['vs_anchor']:.2f}",
             f"{r['kl_topk_vs_fp32']:.1e}" if "kl_topk_vs_fp32" in r else ""] for r in result["results"]]
    table = text_table(["decoder", "prompts", "tokens", "tok/s", "vs anchor", f"top-{result['top_k']} KL vs fp32"], rows)
    return "\n".join([*lines, table])
