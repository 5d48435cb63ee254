"""Top-k log-prob codecs: a teacher's per-token top-k (ids, log-probs) <-> Parquet column values.

Bytes per completion token is a tracked number (`potstill bench codec`), so the codecs are
small and measured. Every codec decodes to a `TopK`: ids [T, k], log-probs [T, k] and the
log-prob of the tail bucket (everything not stored) [T], so that kept + tail sums to one.

- "mass" (default, compact): per token, keep entries until their mass reaches `mass` or `k`;
  store a count (uint8), the ids (smallest unsigned type), the tail log-prob explicitly
  (float16), and each non-top-1 entry relative to the top-1 as one byte on a power grid:
  level = round(255 * (p_j / p_0) ** (1/3)), floored at 1. A uniform log-prob grid wastes
  its levels on entries of negligible mass (an entry's KL term is ~ p_j * err_j^2); a
  sqrt grid (the KL-optimal shape ignoring range) runs out of range at p_j/p_0 < 1.5e-5 on
  flat distributions; the cube-root grid reaches (1/255)^3 = 6.0e-8 and measured best on SmolLM2-135M
  teacher-forced positions (mean KL 9e-6 nats vs 1.5e-5 for sqrt, 3e-5 for a uniform
  log grid over [-12, 0]). The top-1 itself is implied: kept entries are scaled so that
  kept + tail = 1 exactly. (A uint8 tail on a logit grid tripled the KL; float16 is exact-ish.)
- "f16": fixed k, log-probs as float16, tail derived from them at decode.
- "f32": fixed k, log-probs as float32 (lossless anchor for benchmarks).
- "none": text-only capture, no top-k columns.

`fidelity()` measures what a codec loses, in nats: KL(exact || stored) over the same partition for
every codec, the teacher's full top-k ids + one bucket for the rest of the vocabulary. An entry the
mass rule dropped has no probability of its own in the stored data (its mass is in the stored
tail), so the stored side spreads its tail evenly over the vocabulary ids it did not keep (the
maximum-entropy reading); the lost resolution therefore shows in the KL instead of cancelling.
(The KL figures quoted above predate this and merged dropped entries into the tail on both sides.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from potstill.errors import PotstillError

# Smallest tail probability the dense codecs report when rounded log-probs sum to >= 1.
_DENSE_TAIL_FLOOR = 1e-6


@dataclass
class TopK:
    """Decoded top-k of one completion: padding entries have id 0 and log-prob -inf."""

    ids: np.ndarray  # [T, k] int64
    logprobs: np.ndarray  # [T, k] float32, full-distribution log-probs
    tail_logprob: np.ndarray  # [T] float32, log(1 - sum(exp(kept))); -inf when nothing is left


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned integer type that holds every token id of the vocab."""
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    if vocab_size <= 1 << 32:
        return np.dtype(np.uint32)
    return np.dtype(np.uint64)


def _arrow(dtype: np.dtype) -> pa.DataType:
    return pa.from_numpy_dtype(dtype)


class Codec:
    """Base: a codec knows the vocab (for the id type) and the k it was asked for."""

    name = "base"

    def __init__(self, vocab_size: int, k: int):
        if vocab_size < 1:
            raise PotstillError(f"codec {self.name!r}: vocab_size must be >= 1, got {vocab_size}")
        self.vocab_size = int(vocab_size)
        self.k = int(k)
        self.id_dtype = id_dtype(self.vocab_size)
        self.id_type = _arrow(self.id_dtype)

    @property
    def params(self) -> dict[str, Any]:
        """Everything `get_codec(name, **params)` needs to rebuild this codec (stored in the manifest)."""
        return {"vocab_size": self.vocab_size, "k": self.k}

    @property
    def columns(self) -> list[str]:
        return [f.name for f in self.arrow_fields()]

    def arrow_fields(self) -> list[pa.Field]:
        return []

    def encode(self, ids: np.ndarray, logprobs: np.ndarray) -> dict[str, Any]:
        return {}

    def decode(self, row: dict[str, Any]) -> TopK | None:
        return None

    def _prepare(self, ids, logprobs) -> tuple[np.ndarray, np.ndarray]:
        """Validate shapes and ids; sort each row by descending log-prob; cut or pad to k columns."""
        ids = np.asarray(ids, dtype=np.int64)
        lps = np.asarray(logprobs, dtype=np.float32)
        if ids.ndim != 2 or ids.shape != lps.shape:
            raise ValueError(f"top-k ids {ids.shape} and log-probs {lps.shape} must both be [T, k]")
        lps = np.where(np.isnan(lps), -np.inf, lps)
        order = np.argsort(-lps, axis=1, kind="stable")
        ids = np.take_along_axis(ids, order, axis=1)[:, : self.k]
        lps = np.take_along_axis(lps, order, axis=1)[:, : self.k]
        valid = np.isfinite(lps)
        bad = valid & ((ids < 0) | (ids >= self.vocab_size))
        if bad.any():
            raise ValueError(f"top-k token id {int(ids[bad][0])} outside the vocab (size {self.vocab_size})")
        if ids.shape[1] < self.k:
            pad = self.k - ids.shape[1]
            ids = np.pad(ids, ((0, 0), (0, pad)))
            lps = np.pad(lps, ((0, 0), (0, pad)), constant_values=-np.inf)
        ids = np.where(np.isfinite(lps), ids, 0)
        return ids, lps


class NoneCodec(Codec):
    """Text-only capture: no top-k columns."""

    name = "none"

    @property
    def params(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "k": 0}


class DenseCodec(Codec):
    """Fixed k per token; log-probs as float16 ("f16") or float32 ("f32"); tail derived at decode."""

    def __init__(self, vocab_size: int, k: int, name: str):
        self.name = name
        super().__init__(vocab_size, k)
        if self.k < 1:
            raise PotstillError(f"codec {name!r}: k must be >= 1, got {k}")
        self.lp_dtype = np.dtype(np.float16 if name == "f16" else np.float32)

    def arrow_fields(self) -> list[pa.Field]:
        return [
            pa.field("topk_ids", pa.list_(self.id_type)),
            pa.field("topk_logprobs", pa.list_(_arrow(self.lp_dtype))),
        ]

    def encode(self, ids, logprobs) -> dict[str, Any]:
        ids, lps = self._prepare(ids, logprobs)
        return {
            "topk_ids": ids.astype(self.id_dtype).reshape(-1),
            "topk_logprobs": lps.astype(self.lp_dtype).reshape(-1),
        }

    def decode(self, row: dict[str, Any]) -> TopK | None:
        flat_ids, flat_lps = row.get("topk_ids"), row.get("topk_logprobs")
        if flat_ids is None or flat_lps is None:
            return None
        ids = np.asarray(flat_ids, dtype=np.int64).reshape(-1, self.k)
        lps = np.asarray(flat_lps, dtype=np.float64).reshape(-1, self.k)
        kept = np.exp(lps).sum(axis=1)
        # Rounded log-probs can sum to >= 1: scale them so a floor of mass is left for the tail.
        over = kept > 1 - _DENSE_TAIL_FLOOR
        scale = np.where(over, np.log((1 - _DENSE_TAIL_FLOOR) / np.maximum(kept, 1e-300)), 0.0)
        lps = lps + scale[:, None]
        tail = np.where(over, _DENSE_TAIL_FLOOR, 1 - kept)
        with np.errstate(divide="ignore"):
            tail_lp = np.log(tail)
        return TopK(ids, lps.astype(np.float32), tail_lp.astype(np.float32))


class MassCodec(Codec):
    """Adaptive k by probability mass; one byte per non-top-1 entry; explicit float16 tail."""

    name = "mass"
    LEVELS = 255  # uint8 grid over (p_j / p_0) ** (1 / GAMMA) in (0, 1]
    GAMMA = 3.0

    def __init__(self, vocab_size: int, k: int, mass: float = 0.98):
        super().__init__(vocab_size, k)
        if not 1 <= self.k <= 255:
            raise PotstillError(f"codec 'mass': k must be in 1..255 (per-token count is uint8), got {k}")
        if not 0 < mass <= 1:
            raise PotstillError(f"codec 'mass': mass must be in (0, 1], got {mass}")
        self.mass = float(mass)

    @property
    def params(self) -> dict[str, Any]:
        return {"vocab_size": self.vocab_size, "k": self.k, "mass": self.mass}

    def arrow_fields(self) -> list[pa.Field]:
        return [
            pa.field("topk_count", pa.list_(pa.uint8())),
            pa.field("topk_ids", pa.list_(self.id_type)),
            pa.field("topk_q", pa.list_(pa.uint8())),
            pa.field("topk_tail", pa.list_(pa.float16())),
        ]

    def encode(self, ids, logprobs) -> dict[str, Any]:
        ids, lps = self._prepare(ids, logprobs)
        k = self.k
        p = np.exp(lps.astype(np.float64))
        cum = np.cumsum(p, axis=1)
        n_valid = np.isfinite(lps).sum(axis=1)
        # entries needed to reach the mass: the first j with cum[j] >= mass, plus one
        count = np.minimum(1 + (cum < self.mass).sum(axis=1), n_valid)
        kept_mass = np.where(count > 0, cum[np.arange(len(cum)), np.maximum(count - 1, 0)], 0.0)
        tail = np.clip(1 - kept_mass, 0.0, 1.0)
        with np.errstate(divide="ignore"):
            tail_lp = np.log(tail)
        cols = np.arange(k)
        keep = cols[None, :] < count[:, None]
        rest = keep & (cols[None, :] >= 1)
        with np.errstate(invalid="ignore"):  # rows with no finite entry: masked out below
            ratio = np.exp((lps.astype(np.float64) - lps[:, :1]) / self.GAMMA)  # (p_j / p_0) ** (1/GAMMA)
        q = np.clip(np.rint(np.nan_to_num(ratio) * self.LEVELS), 1, self.LEVELS).astype(np.uint8)
        return {
            "topk_count": count.astype(np.uint8),
            "topk_ids": ids[keep].astype(self.id_dtype),
            "topk_q": q[rest],
            "topk_tail": tail_lp.astype(np.float16),
        }

    def decode(self, row: dict[str, Any]) -> TopK | None:
        count = row.get("topk_count")
        if count is None:
            return None
        count = np.asarray(count, dtype=np.int64)
        t, k = len(count), self.k
        cols = np.arange(k)
        keep = cols[None, :] < count[:, None]
        rest = keep & (cols[None, :] >= 1)
        ids = np.zeros((t, k), dtype=np.int64)
        ids[keep] = np.asarray(row["topk_ids"], dtype=np.int64)
        rel = np.zeros((t, k), dtype=np.float64)
        rel[:, 0] = count > 0
        rel[rest] = (np.asarray(row["topk_q"], dtype=np.float64) / self.LEVELS) ** self.GAMMA
        tail = np.minimum(np.exp(np.asarray(row["topk_tail"], dtype=np.float64)), 1.0)
        tail = np.where(count > 0, tail, 1.0)
        # scale the kept entries so that kept + tail = 1 (the top-1 is implied by this)
        norm = (1 - tail) / np.maximum(rel.sum(axis=1), 1e-300)
        with np.errstate(divide="ignore"):
            lps = np.log(rel * norm[:, None])
            tail_lp = np.log(tail)
        return TopK(ids, lps.astype(np.float32), tail_lp.astype(np.float32))


CODECS = ("mass", "f16", "f32", "none")


def get_codec(name: str, vocab_size: int, k: int, **opts: Any) -> Codec:
    """Build a codec by name; `get_codec(m["codec"]["name"], **m["codec"]["params"])` rebuilds a capture's."""
    if name == "none":
        return NoneCodec(vocab_size, 0)
    if name in ("f16", "f32"):
        if opts:
            raise PotstillError(f"codec {name!r} takes no options, got {sorted(opts)}")
        return DenseCodec(vocab_size, k, name)
    if name == "mass":
        unknown = set(opts) - {"mass"}
        if unknown:
            raise PotstillError(f"codec 'mass': unknown option(s) {sorted(unknown)}; it takes 'mass'")
        return MassCodec(vocab_size, k, **opts)
    raise PotstillError(f"unknown codec {name!r}; choose one of {', '.join(CODECS)}")


def fidelity(ids: np.ndarray, logprobs: np.ndarray, decoded: TopK, vocab_size: int,
             chunk: int = 4096) -> dict[str, float]:
    """KL(exact || stored) per token in nats, over the exact top-k ids + one bucket for the rest.

    `ids`, `logprobs` are the exact top-k as the teacher gave them ([T, k], full-distribution
    log-probs; -inf = padding). The stored side gives an exact id its decoded probability, or,
    when the codec dropped it, an even share of the decoded tail over the `vocab_size` - kept ids
    it did not store; the rest bucket gets the remaining shares. Returns mean_kl, max_kl,
    mean_kept (stored entries per token) and mean/max_dropped_mass (exact mass not stored).
    """
    ids = np.asarray(ids, dtype=np.int64)
    lps = np.asarray(logprobs, dtype=np.float64)
    kls, dropped = [], []
    kept_total = 0
    for s in range(0, len(ids), chunk):
        ex_ids, ex_p = ids[s : s + chunk], np.exp(lps[s : s + chunk])
        d_ids = decoded.ids[s : s + chunk]
        d_lp = decoded.logprobs[s : s + chunk].astype(np.float64)
        d_valid = np.isfinite(d_lp)
        ex_valid = ex_p > 0
        match = (d_ids[:, :, None] == ex_ids[:, None, :]) & d_valid[:, :, None] & ex_valid[:, None, :]
        if (d_valid & ~match.any(axis=2)).any():
            raise ValueError("decoded top-k holds an id that is not among the exact top-k")
        q_dec = np.where(d_valid, np.exp(d_lp), 0.0)
        stored = match.any(axis=1)  # [t, k]: exact entry j is in the decoded top-k
        q_tail = np.exp(decoded.tail_logprob[s : s + chunk].astype(np.float64))
        n_kept = d_valid.sum(axis=1)
        n_drop = (ex_valid & ~stored).sum(axis=1)
        share = q_tail / np.maximum(vocab_size - n_kept, 1)  # the stored tail spread over the ids not kept
        q = np.where(stored, (match * q_dec[:, :, None]).sum(axis=1), share[:, None])
        p = np.where(ex_valid, ex_p, 0.0)
        p_rest = np.clip(1 - p.sum(axis=1), 0.0, 1.0)
        q_rest = share * np.maximum(vocab_size - n_kept - n_drop, 0)
        kl = _xlogy_ratio(p, q).sum(axis=1) + _xlogy_ratio(p_rest, q_rest)
        kls.append(np.maximum(kl, 0.0))
        dropped.append(np.where(ex_valid & ~stored, p, 0.0).sum(axis=1))
        kept_total += int(d_valid.sum())
    kl = np.concatenate(kls) if kls else np.zeros(0)
    lost = np.concatenate(dropped) if dropped else np.zeros(0)
    n = max(len(kl), 1)
    return {
        "mean_kl": float(kl.mean()) if len(kl) else 0.0,
        "max_kl": float(kl.max()) if len(kl) else 0.0,
        "mean_kept": kept_total / n,
        "mean_dropped_mass": float(lost.mean()) if len(lost) else 0.0,
        "max_dropped_mass": float(lost.max()) if len(lost) else 0.0,
    }


def _xlogy_ratio(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """p * log(p / q) with 0 log 0 = 0 and q floored (a lost bucket costs a lot but stays finite)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = p * (np.log(np.maximum(p, 1e-300)) - np.log(np.maximum(q, 1e-30)))
    return np.where(p > 0, out, 0.0)
