"""Watermark benchmark: detection power by length, false positives, and what the mark costs in quality.

With one teacher (the embedded SmolLM2 by default) it generates watermarked completions (the
green-list processor on) and unwatermarked ones (off) for the same prompts, then reports:

- TPR at p < threshold (1e-4) for each length L: each completion with at least L tokens, cut to
  its first L tokens, scored alone (prompt ids as context only);
- FPR at the same threshold over >= `min_null_tests` null tests per length. Null tests are cheap:
  the unwatermarked completions under the true key, plus every completion (watermarked or not)
  under extra random keys. The keyed hash makes a text written without key K look like any
  other text to K, so each (text, foreign key) pair is a valid null test; tests that share a
  text are not independent, so the FPR's spread is a little wider than binomial. With 500 tests
  and no false positive, the FPR is below ~0.6% (95%); the p < 0.01 and p < 0.05 rates show
  the calibration with more resolution;
- quality cost: perplexity of the watermarked and the unwatermarked completions under the
  unwatermarked teacher (teacher forcing, completion tokens only), pooled over tokens with a
  bootstrap interval over completions: sampled text from a small model has heavy-tailed
  perplexity, so 64 completions still give intervals of about -20%/+30%.

    python -m potstill.bench.watermark --n-pos 48 --n-neg 48 --threads 1 --out runs/bench-watermark.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import time
from dataclasses import replace
from importlib import resources
from typing import Any

import torch

from potstill.guard.watermark import Watermark, WatermarkConfig, WatermarkScore, detect_ids
from potstill.lm.types import Completion, SamplingParams
from potstill.teachers.hf import HFTeacher, row_seed
from potstill.utils import write_json


def seed_prompts(limit: int | None = None) -> list[list[dict]]:
    """Chat prompts from the packaged seed tasks: instruction + "\\n\\n" + first instance input."""
    text = resources.files("potstill").joinpath("data/seed_tasks.jsonl").read_text(encoding="utf-8")
    prompts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        inp = (row.get("instances") or [{}])[0].get("input", "")
        content = row["instruction"] + ("\n\n" + inp if inp else "")
        prompts.append([{"role": "user", "content": content}])
    return prompts[:limit] if limit else prompts


def _generate(teacher: HFTeacher, prompt_ids, params, tag: str, batch_size: int, processor, log) -> tuple:
    """Completions for all prompts (batched, shortest prompts together); returns (completions, seconds)."""
    order = sorted(range(len(prompt_ids)), key=lambda i: len(prompt_ids[i]))
    out: list[Completion | None] = [None] * len(prompt_ids)
    t0, tokens = time.perf_counter(), 0
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        seeds = [row_seed(params.seed, f"{tag}-{i}") for i in idx]
        done = teacher.complete_ids([prompt_ids[i] for i in idx], params, seeds, logits_processor=processor)
        for i, c in zip(idx, done, strict=True):
            out[i] = c
            tokens += len(c.completion_ids)
        dt = time.perf_counter() - t0
        log(f"[{tag}] {min(b + batch_size, len(order))}/{len(order)} completions, {tokens / dt:.0f} tok/s")
    return out, time.perf_counter() - t0


@torch.no_grad()
def completion_nll(
    teacher: HFTeacher, completions: list[Completion], batch_size: int = 4
) -> list[tuple[float, int]]:
    """(summed NLL in nats, token count) of each non-empty completion under the teacher (no processor)."""
    out = []
    rows = [c for c in completions if c.completion_ids]
    for b in range(0, len(rows), batch_size):
        batch = rows[b : b + batch_size]
        seqs = [c.prompt_ids + c.completion_ids for c in batch]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), teacher.pad_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
        logits = teacher.model(
            input_ids=ids.to(teacher.device), attention_mask=attn.to(teacher.device)
        ).logits
        for i, c in enumerate(batch):
            p, n = len(c.prompt_ids), len(c.completion_ids)
            lp = logits[i, p - 1 : p + n - 1].float().log_softmax(-1)
            target = torch.tensor(c.completion_ids, device=lp.device)
            out.append((-float(lp.gather(1, target[:, None]).sum()), n))
    return out


def perplexity_stats(nll: list[tuple[float, int]], seed: int = 0, resamples: int = 1000) -> dict[str, float]:
    """Pooled perplexity (exp of total NLL / tokens), a bootstrap 90% interval over completions,
    and the median per-completion perplexity (robust to a few rambling outliers)."""
    if not nll:
        return {
            "ppl": float("nan"),
            "ppl_lo": float("nan"),
            "ppl_hi": float("nan"),
            "median_ppl": float("nan"),
        }
    pooled = lambda rows: math.exp(sum(r[0] for r in rows) / max(sum(r[1] for r in rows), 1))  # noqa: E731
    rng = random.Random(seed)
    boots = sorted(pooled(rng.choices(nll, k=len(nll))) for _ in range(resamples))
    return {
        "ppl": pooled(nll),
        "ppl_lo": boots[int(0.05 * resamples)],
        "ppl_hi": boots[int(0.95 * resamples) - 1],
        "median_ppl": statistics.median(math.exp(s / n) for s, n in nll),
    }


def _score(c: Completion, length: int, cfg: WatermarkConfig) -> WatermarkScore:
    return detect_ids(c.prompt_ids + c.completion_ids[:length], cfg, ignore_first=len(c.prompt_ids))


def _rates(ps: list[float], threshold: float) -> dict[str, float]:
    n = max(len(ps), 1)
    return {
        f"rate_p<{threshold:g}": sum(p < threshold for p in ps) / n,
        "rate_p<0.01": sum(p < 0.01 for p in ps) / n,
        "rate_p<0.05": sum(p < 0.05 for p in ps) / n,
    }


def bench_watermark(
    teacher: HFTeacher,
    prompts: list[list[dict]],
    cfg: WatermarkConfig,
    lengths: tuple[int, ...] = (50, 100, 200),
    n_pos: int = 32,
    n_neg: int = 32,
    out_json: str | None = None,
    *,
    params: SamplingParams | None = None,
    threshold: float = 1e-4,
    min_null_tests: int = 500,
    batch_size: int = 16,
    seed: int = 0,
    log=print,
) -> dict[str, Any]:
    """Generate, score and measure (see the module docstring); writes `out_json` atomically if given."""
    params = params or SamplingParams(max_new_tokens=max(lengths), temperature=1.0, top_logprobs=0, seed=seed)
    wm = Watermark(cfg)
    all_ids = [teacher.encode_chat(m) for m in prompts]
    pos_ids = [all_ids[i % len(all_ids)] for i in range(n_pos)]
    neg_ids = [all_ids[i % len(all_ids)] for i in range(n_neg)]
    pos, t_pos = _generate(teacher, pos_ids, params, "watermarked", batch_size, wm.logits_processor, log)
    neg, t_neg = _generate(teacher, neg_ids, params, "plain", batch_size, None, log)

    per_length = []
    for length in lengths:
        pos_l = [c for c in pos if len(c.completion_ids) >= length]
        neg_l = [c for c in neg if len(c.completion_ids) >= length]
        hits = [_score(c, length, cfg) for c in pos_l]
        null_true = [_score(c, length, cfg).p_value for c in neg_l]
        n_texts = len(pos_l) + len(neg_l)
        n_keys = math.ceil(max(min_null_tests - len(neg_l), 0) / n_texts) if n_texts else 0
        null_other = [
            _score(c, length, replace(cfg, key=f"{cfg.key}/null-{j}")).p_value
            for j in range(n_keys)
            for c in pos_l + neg_l
        ]
        nulls = null_true + null_other
        per_length.append(
            {
                "length": length,
                "n_watermarked": len(hits),
                "tpr": sum(s.p_value < threshold for s in hits) / len(hits) if hits else None,
                "median_z": statistics.median(s.z for s in hits) if hits else None,
                "median_log10_p": statistics.median(s.log10_p for s in hits) if hits else None,
                "mean_green_fraction": statistics.fmean(s.green_fraction for s in hits) if hits else None,
                "mean_pairs_scored": statistics.fmean(s.tokens_scored for s in hits) if hits else None,
                "n_null": len(nulls),
                "n_null_unwatermarked_true_key": len(null_true),
                "n_null_foreign_keys": n_keys,
                "fpr": sum(p < threshold for p in nulls) / len(nulls) if nulls else None,
                "null": _rates(nulls, threshold),
                "null_true_key_only": _rates(null_true, threshold),
            }
        )

    ppl_pos = perplexity_stats(completion_nll(teacher, pos), seed)
    ppl_neg = perplexity_stats(completion_nll(teacher, neg), seed)
    n_tok_pos = sum(len(c.completion_ids) for c in pos)
    n_tok_neg = sum(len(c.completion_ids) for c in neg)
    result = {
        "bench": "watermark",
        "teacher": teacher.name,
        "dtype": str(next(teacher.model.parameters()).dtype).replace("torch.", ""),
        "watermark": cfg.public_dict(),
        "sampling": params.to_dict(),
        "threshold": threshold,
        "n_prompts": len(prompts),
        "n_watermarked": n_pos,
        "n_unwatermarked": n_neg,
        "completion_tokens": {"watermarked": n_tok_pos, "unwatermarked": n_tok_neg},
        "mean_completion_tokens": {
            "watermarked": n_tok_pos / max(n_pos, 1),
            "unwatermarked": n_tok_neg / max(n_neg, 1),
        },
        "lengths": per_length,
        "perplexity": {
            "watermarked": ppl_pos,
            "unwatermarked": ppl_neg,
            "ratio": ppl_pos["ppl"] / ppl_neg["ppl"],
        },
        "timing": {
            "watermarked_s": t_pos,
            "unwatermarked_s": t_neg,
            "watermarked_tok_s": n_tok_pos / t_pos if t_pos else None,
            "unwatermarked_tok_s": n_tok_neg / t_neg if t_neg else None,
        },
        "null_method": "unwatermarked completions under the true key + all completions under foreign keys",
    }
    if out_json:
        write_json(out_json, result)
    return result


def format_table(result: dict[str, Any]) -> str:
    """The result as a small text table (one row per length) plus perplexity and speed lines."""
    wmc, thr = result["watermark"], result["threshold"]
    fmt = lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    lines = [
        f"watermark bench: {result['teacher']} ({result['dtype']}), gamma={wmc['gamma']} delta={wmc['delta']} "
        f"h={wmc['context_width']} {wmc['scheme']}, threshold p<{thr:g}",
        f"{'len':>5} {'n_wm':>5} {'TPR':>6} {'med z':>6} {'green':>6} {'n_null':>7} {'FPR':>7} "
        f"{'p<.01':>6} {'p<.05':>6}",
    ]
    for r in result["lengths"]:
        null = r["null"]
        lines.append(
            f"{r['length']:>5} {r['n_watermarked']:>5} {fmt(r['tpr'], '.3f'):>6} {fmt(r['median_z'], '.1f'):>6} "
            f"{fmt(r['mean_green_fraction'], '.2f'):>6} {r['n_null']:>7} {fmt(r['fpr'], '.4f'):>7} "
            f"{null['rate_p<0.01']:>6.3f} {null['rate_p<0.05']:>6.3f}"
        )
    ppl, t = result["perplexity"], result["timing"]
    w, u = ppl["watermarked"], ppl["unwatermarked"]
    lines.append(
        f"perplexity under the unwatermarked teacher (90% CI; median per text): watermarked {w['ppl']:.2f} "
        f"[{w['ppl_lo']:.2f}, {w['ppl_hi']:.2f}; {w['median_ppl']:.2f}], unwatermarked {u['ppl']:.2f} "
        f"[{u['ppl_lo']:.2f}, {u['ppl_hi']:.2f}; {u['median_ppl']:.2f}] (x{ppl['ratio']:.3f})"
    )
    lines.append(
        f"speed: {fmt(t['watermarked_tok_s'], '.0f')} tok/s watermarked, "
        f"{fmt(t['unwatermarked_tok_s'], '.0f')} tok/s plain"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description="Watermark benchmark on the embedded teacher.")
    ap.add_argument("--key", default="potstill-bench-key-public-3c9e17f05b2a48d6")
    ap.add_argument("--gamma", type=float, default=0.25)
    ap.add_argument("--delta", type=float, default=2.0)
    ap.add_argument("--context-width", type=int, default=1)
    ap.add_argument("--self-hash", action="store_true")
    ap.add_argument("--lengths", default="50,100,200")
    ap.add_argument("--n-pos", type=int, default=32)
    ap.add_argument("--n-neg", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--threads", type=int, default=None, help="torch threads (1 is fastest on a busy box)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    teacher = HFTeacher.load("embedded")
    teacher.model.to(getattr(torch, args.dtype))
    cfg = WatermarkConfig(
        key=args.key,
        gamma=args.gamma,
        delta=args.delta,
        context_width=args.context_width,
        self_hash=args.self_hash,
        vocab_size=teacher.model.config.vocab_size,
    )
    lengths = tuple(int(x) for x in args.lengths.split(","))
    result = bench_watermark(
        teacher, seed_prompts(), cfg, lengths, args.n_pos, args.n_neg, args.out, batch_size=args.batch_size
    )
    print(format_table(result))
    return result


if __name__ == "__main__":
    main()
