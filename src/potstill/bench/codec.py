"""`potstill bench codec`: bytes per completion token and fidelity (KL, nats) of each top-k codec.

Each codec writes the same positions through the real `CaptureWriter` (zstd Parquet shards),
so bytes/token are measured on disk, not estimated. "f32" (lossless) is the anchor the others
are read against. Positions are synthetic teacher-like distributions (a Gaussian background
over the vocab plus a heavy head of a few boosted tokens, calibrated to SmolLM2-135M
teacher-forced on seed-task answers), or the stored top-k of a real capture (`source=`).

    from potstill.bench.codec import bench_codec, format_table
    print(format_table(bench_codec(4096, 49152, 20, "codec.json")))
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

import numpy as np

from potstill import __version__
from potstill.capture.codec import fidelity, get_codec
from potstill.capture.store import Capture, CaptureWriter
from potstill.utils import atomic_path

ROW_TOKENS = 256  # completion tokens per synthetic row


def synthetic_topk(n_positions: int, vocab: int, k: int, seed: int = 0, chunk: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """Teacher-like top-k ([n, k] ids, [n, k] full-distribution log-probs), sorted descending.

    Per position: logits = N(0, sigma^2) over the vocab plus a head of 1-8 tokens (geometric,
    mostly 1-2) raised to a random height. Top-1 probability quantiles p10/p25/p50/p75/p90 are
    0.16/0.32/0.54/0.87/0.99, SmolLM2-135M's on seed-task answers are 0.16/0.28/0.53/0.87/0.99;
    the flattest 10% carry more mass outside the top-k than the real model's (a harder case).
    """
    rng = np.random.default_rng(seed)
    ids = np.empty((n_positions, k), dtype=np.int64)
    lps = np.empty((n_positions, k), dtype=np.float32)
    for s in range(0, n_positions, chunk):
        n = min(chunk, n_positions - s)
        sigma = rng.uniform(0.5, 1.5, size=(n, 1)).astype(np.float32)
        logits = rng.standard_normal((n, vocab), dtype=np.float32) * sigma
        background = np.log(vocab) + 0.5 * sigma[:, 0] ** 2  # ~ logsumexp of the Gaussian part
        height = background + rng.normal(3.5, 3.0, size=n)
        n_head = np.minimum(rng.geometric(0.4, size=n), 8)
        for i in range(n):
            head = rng.choice(vocab, size=n_head[i], replace=False)
            logits[i, head] = height[i] - np.sort(rng.exponential(1.5, size=n_head[i]))
        m = logits.max(axis=1, keepdims=True)
        logz = m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True))
        top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
        top_lp = np.take_along_axis(logits, top, axis=1) - logz
        order = np.argsort(-top_lp, axis=1)
        ids[s : s + n] = np.take_along_axis(top, order, axis=1)
        lps[s : s + n] = np.take_along_axis(top_lp, order, axis=1)
    return ids, lps


def capture_topk(directory: str, n_positions: int) -> tuple[np.ndarray, np.ndarray, int, int]:
    """The stored top-k of a real capture (as decoded), up to n_positions tokens."""
    capture = Capture.open(directory)
    if capture.text_only:
        raise ValueError(f"{directory}: text-only capture, no top-k to benchmark")
    ids, lps, n = [], [], 0
    for row in capture.rows(columns=["topk"]):
        if row["topk"] is None:
            continue
        ids.append(row["topk"].ids)
        lps.append(row["topk"].logprobs)
        n += len(row["topk"].ids)
        if n >= n_positions:
            break
    params = capture.manifest["codec"]["params"]
    return np.concatenate(ids)[:n_positions], np.concatenate(lps)[:n_positions], params["vocab_size"], params["k"]


def bench_codec(
    n_positions: int = 4096,
    vocab: int = 49152,
    k: int = 20,
    out_json: str | os.PathLike | None = None,
    source: str | None = None,
    codecs: tuple[str, ...] = ("f32", "f16", "mass"),
    seed: int = 0,
) -> dict[str, Any]:
    """Run every codec on the same positions; returns (and writes, atomically) the result dict."""
    if source:
        ids, lps, vocab, k = capture_topk(source, n_positions)
    else:
        ids, lps = synthetic_topk(n_positions, vocab, k, seed)
    n_positions = len(ids)
    p = np.exp(lps.astype(np.float64))
    result: dict[str, Any] = {
        "bench": "codec",
        "potstill_version": __version__,
        "source": source or "synthetic",
        "n_positions": n_positions,
        "vocab": vocab,
        "k": k,
        "distribution": {
            "top1_prob_quantiles": dict(zip(("p10", "p50", "p90"), np.quantile(p[:, 0], [0.1, 0.5, 0.9]).round(4).tolist(), strict=True)),
            "topk_mass_median": round(float(np.median(p.sum(axis=1))), 4),
        },
        "codecs": {},
    }
    for name in codecs:
        codec = get_codec(name, vocab_size=vocab, k=k)
        t0 = time.perf_counter()
        encoded = codec.encode(ids, lps)
        encode_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        decoded = codec.decode(encoded)
        decode_s = time.perf_counter() - t0
        fid = fidelity(ids, lps, decoded, vocab)
        with tempfile.TemporaryDirectory(prefix="potstill-bench-") as tmp:
            with CaptureWriter(tmp, {"bench": "codec"}, codec) as writer:
                for r, s in enumerate(range(0, n_positions, ROW_TOKENS)):
                    sl = slice(s, s + ROW_TOKENS)
                    writer.add({
                        "id": f"row-{r}", "prompt": "[]", "split": "train", "prompt_ids": [],
                        "completion_ids": ids[sl, 0], "completion_text": "", "finish_reason": "length",
                        "sampled_logprob": lps[sl, 0], "topk_ids": ids[sl], "topk_logprobs": lps[sl],
                    })
            manifest = writer.manifest
        result["codecs"][name] = {
            "params": codec.params,
            "topk_bytes_per_token": manifest["topk_bytes_per_completion_token"],
            "bytes_per_token": manifest["bytes_per_completion_token"],
            "mean_kl": fid["mean_kl"],
            "max_kl": fid["max_kl"],
            "mean_kept": round(fid["mean_kept"], 2),
            "mean_dropped_mass": fid["mean_dropped_mass"],
            "max_dropped_mass": fid["max_dropped_mass"],
            "encode_tokens_per_s": round(n_positions / max(encode_s, 1e-9)),
            "decode_tokens_per_s": round(n_positions / max(decode_s, 1e-9)),
        }
    anchor = result["codecs"].get("f32")
    if anchor:
        for entry in result["codecs"].values():
            entry["size_vs_f32"] = round(entry["topk_bytes_per_token"] / anchor["topk_bytes_per_token"], 3)
    if out_json:
        with atomic_path(out_json) as tmp:
            tmp.write_text(json.dumps(result, indent=2) + "\n")
    return result


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of a bench_codec result, with its heading and a note."""
    head = (f"codec bench: {result['n_positions']} positions ({result['source']}), vocab {result['vocab']}, "
            f"k {result['k']}; top-1 p50 {result['distribution']['top1_prob_quantiles']['p50']}")
    cols = ("codec", "top-k B/tok", "all B/tok", "vs f32", "kept/tok", "max dropped", "mean KL", "max KL",
            "enc tok/s", "dec tok/s")
    from potstill.present import text_table

    rows = [(name, f"{r['topk_bytes_per_token']:.2f}", f"{r['bytes_per_token']:.2f}", f"{r.get('size_vs_f32', 1):.3f}",
             f"{r['mean_kept']:.1f}", f"{r.get('max_dropped_mass', 0.0):.2%}", f"{r['mean_kl']:.2e}", f"{r['max_kl']:.2e}",
             f"{r['encode_tokens_per_s']:.3g}", f"{r['decode_tokens_per_s']:.3g}") for name, r in result["codecs"].items()]
    lines = [head, text_table(cols, rows)]
    lines.append(f"KL over the full top-{result['k']} + rest partition for every codec (a dropped entry gets an even "
                 "share of the stored tail); max dropped = the largest top-k mass a codec did not store")
    return "\n".join(lines)
