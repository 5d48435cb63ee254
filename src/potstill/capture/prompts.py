"""Prompts for a capture: load (JSONL / Parquet / built-in seed tasks), de-duplicate, split.

Accepted records (one JSON object per line, or one Parquet row):
- chat: `{"messages": [{"role", "content"}, ...]}`; reference from `reference` or `output`,
  or a final assistant message (which is then taken off the prompt);
- instruction: `{"instruction", "input"?, "output"?}` -> one user message, instruction and
  input separated by a blank line;
- self-instruct seed: `{"instruction", "instances": [{"input", "output"}, ...]}` -> one prompt
  per instance (the format of `builtin:seed_tasks`, the 175 self-instruct seed tasks;
  `builtin:heldout_v1`, 60 instructions with human answers written for potstill, is the held-out set);
- plain: `{"prompt": str}` (reference as for chat).
Every error names the file, line and field: `prompts.jsonl:17: field 'instruction' missing`.
"""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from potstill.errors import PotstillError
from potstill.utils import jsonl_objects, stable_hash

ROLES = ("system", "user", "assistant", "tool")
BUILTIN = {"seed_tasks": "seed_tasks.jsonl", "heldout_v1": "heldout_v1.jsonl"}


@dataclass
class Prompt:
    messages: list[dict[str, str]]
    reference: str | None = None
    where: str = ""  # "file:line" it came from


def load_prompts(path: str | os.PathLike) -> list[Prompt]:
    """Prompts from a JSONL or Parquet file, `builtin:<name>` (builtin:seed_tasks), or a Hugging Face
    dataset `hf:ORG/NAME[/CONFIG][:SPLIT]` (see hub.py)."""
    name = str(path)
    if name.startswith("builtin:"):
        key = name.split(":", 1)[1]
        if key not in BUILTIN:
            raise PotstillError(f"no built-in prompt set {key!r}; choose one of {', '.join(BUILTIN)}")
        file = Path(str(resources.files("potstill") / "data" / BUILTIN[key]))
        return _from_records(jsonl_records(file, name), name)
    if name.startswith("hf:"):
        from potstill.capture.hub import dataset_files

        folder_files = dataset_files(name)
        out: list[Prompt] = []
        for f in folder_files:
            out += load_prompts(f)
        return out
    file = Path(path)
    try:
        with open(file, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise PotstillError(f"cannot read prompts ({e.strerror or e})", where=name) from None
    if magic == b"PAR1":
        return _from_records(_parquet_records(file, name), name)
    return _from_records(jsonl_records(file, name), name)


def jsonl_records(file: Path, name: str):
    """(line number, parsed object) for each non-blank line; PotstillError naming file:line otherwise."""
    try:
        text = file.read_bytes().decode("utf-8")
    except OSError as e:
        raise PotstillError(f"cannot read prompts ({e.strerror or e})", where=name) from None
    except UnicodeDecodeError as e:
        line = e.object.count(b"\n", 0, e.start) + 1
        raise PotstillError("not UTF-8 text", where=f"{name}:{line}") from None
    yield from jsonl_objects(text, name)


def _parquet_records(file: Path, name: str):
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(file)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise PotstillError(f"cannot read Parquet ({e})", where=name) from None
    yield from enumerate(table.to_pylist(), 1)


def _from_records(records, name: str) -> list[Prompt]:
    out: list[Prompt] = []
    for n, record in records:
        out.extend(_parse(record, f"{name}:{n}"))
    return out


def _parse(record: Any, where: str) -> list[Prompt]:
    if not isinstance(record, dict):
        raise PotstillError(f"expected a JSON object, got {type(record).__name__}", where=where)
    reference = _optional_str(record, "reference", where)
    if reference is None:
        reference = _optional_str(record, "output", where)
    if "messages" in record:
        messages = _messages(record["messages"], where)
        if messages[-1]["role"] == "assistant" and len(messages) > 1:
            last = messages.pop()
            reference = reference if reference is not None else last["content"]
        return [Prompt(messages, reference, where)]
    if "instruction" in record:
        instruction = _required_str(record, "instruction", where)
        if "instances" in record and record["instances"] is not None:
            instances = record["instances"]
            if not isinstance(instances, list) or not instances:
                raise PotstillError("field 'instances' must be a non-empty list", where=where)
            prompts = []
            for i, inst in enumerate(instances):
                if not isinstance(inst, dict):
                    raise PotstillError(f"field 'instances[{i}]' must be an object", where=where)
                text = _join(instruction, _optional_str(inst, "input", where, f"instances[{i}]."))
                ref = _optional_str(inst, "output", where, f"instances[{i}].")
                prompts.append(Prompt([{"role": "user", "content": text}], ref, where))
            return prompts
        text = _join(instruction, _optional_str(record, "input", where))
        return [Prompt([{"role": "user", "content": text}], reference, where)]
    if "prompt" in record:
        return [Prompt([{"role": "user", "content": _required_str(record, "prompt", where)}], reference, where)]
    raise PotstillError("field 'instruction' missing (or give 'messages' or 'prompt')", where=where)


def _messages(value: Any, where: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise PotstillError("field 'messages' must be a non-empty list of {role, content}", where=where)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise PotstillError(f"field 'messages[{i}]' must be an object with role and content", where=where)
        for key in ("role", "content"):
            if key not in m:
                raise PotstillError(f"field 'messages[{i}].{key}' missing", where=where)
            if not isinstance(m[key], str):
                raise PotstillError(f"field 'messages[{i}].{key}' must be a string", where=where)
        if m["role"] not in ROLES:
            raise PotstillError(f"field 'messages[{i}].role' is {m['role']!r}; expected one of {', '.join(ROLES)}",
                                where=where)
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" for m in out):
        raise PotstillError("field 'messages' has no user message", where=where)
    return out


def _required_str(record: dict, key: str, where: str) -> str:
    value = record.get(key)
    if value is None:
        raise PotstillError(f"field '{key}' missing", where=where)
    if not isinstance(value, str):
        raise PotstillError(f"field '{key}' must be a string, got {type(value).__name__}", where=where)
    if not value.strip():
        raise PotstillError(f"field '{key}' is empty", where=where)
    return value


def _optional_str(record: dict, key: str, where: str, prefix: str = "") -> str | None:
    value = record.get(key)
    if value is not None and not isinstance(value, str):
        raise PotstillError(f"field '{prefix}{key}' must be a string, got {type(value).__name__}", where=where)
    return value


def _join(instruction: str, extra: str | None) -> str:
    return f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction


# -- de-duplication ---------------------------------------------------------------------------------

SHINGLE = 5  # characters (bytes of UTF-8) per shingle
NEAR = 0.8  # Jaccard similarity of shingle sets at which two prompts are near duplicates
_BANDS, _ROWS = 20, 5  # MinHash LSH: a pair with Jaccard 0.8 becomes a candidate with p = 0.9996
_MASK64 = np.uint64((1 << 64) - 1)


def normalise(prompt: Prompt) -> str:
    """Case- and whitespace-folded text of all messages (role-tagged): the key for exact duplicates."""
    text = "\n".join(f"{m['role']}: {m['content']}" for m in prompt.messages)
    return re.sub(r"\s+", " ", text.lower()).strip()


def dedupe(prompts: list[Prompt]) -> tuple[list[Prompt], int, int]:
    """Drop exact duplicates (after case/whitespace folding) and near duplicates; keep the first.

    Near duplicates: Jaccard >= 0.8 between sets of character 5-gram shingles. Candidates come
    from MinHash LSH (100 hashes, 20 bands x 5 rows), are screened by the signature estimate
    (>= 0.6) and confirmed with the exact Jaccard; a 0.8-similar pair is missed with p < 1e-3.
    Linear in the number of prompts. Returns (kept, n_exact, n_near).
    """
    seen: set[str] = set()
    kept: list[Prompt] = []
    kept_shingles: list[np.ndarray] = []
    kept_sigs = np.zeros((len(prompts), _BANDS * _ROWS), dtype=np.uint64)
    buckets: dict[tuple[int, bytes], list[int]] = {}
    n_exact = n_near = 0
    rng = np.random.default_rng(0x5EED)
    a = rng.integers(1, 1 << 63, size=_BANDS * _ROWS, dtype=np.uint64) | np.uint64(1)
    b = rng.integers(0, 1 << 63, size=_BANDS * _ROWS, dtype=np.uint64)
    for p in prompts:
        key = normalise(p)
        if key in seen:
            n_exact += 1
            continue
        seen.add(key)
        sh = _shingles(key)
        with np.errstate(over="ignore"):
            sig = (sh[:, None] * a[None, :] + b[None, :]).min(axis=0)
        bands = [(i, sig[i * _ROWS : (i + 1) * _ROWS].tobytes()) for i in range(_BANDS)]
        candidates = sorted({j for band in bands for j in buckets.get(band, ())})
        if candidates:  # estimate Jaccard from the signatures; confirm only the plausible ones exactly
            estimate = (kept_sigs[candidates] == sig).mean(axis=1)
            candidates = [j for j, e in zip(candidates, estimate, strict=True) if e >= NEAR - 0.2]
        if any(_jaccard(sh, kept_shingles[j]) >= NEAR for j in candidates):
            n_near += 1
            continue
        for band in bands:
            buckets.setdefault(band, []).append(len(kept))
        kept_sigs[len(kept)] = sig
        kept.append(p)
        kept_shingles.append(sh)
    return kept, n_exact, n_near


def _shingles(text: str) -> np.ndarray:
    """Sorted unique 64-bit hashes of the text's 5-byte windows (the whole text when shorter)."""
    data = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.uint64)
    if len(data) < SHINGLE:
        return np.array([zlib.crc32(text.encode("utf-8"))], dtype=np.uint64)
    h = np.zeros(len(data) - SHINGLE + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(SHINGLE):
            h = h * np.uint64(1099511628211) + data[j : len(data) - SHINGLE + 1 + j]
        h ^= h >> np.uint64(29)
        h *= np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(32)
    return np.unique(h)


def _jaccard(x: np.ndarray, y: np.ndarray) -> float:
    inter = len(np.intersect1d(x, y, assume_unique=True))
    return inter / (len(x) + len(y) - inter)


# -- splits and identity ----------------------------------------------------------------------------


def assign_split(prompts: list[Prompt], heldout_fraction: float, seed: int) -> list[str]:
    """"train" / "heldout" per prompt, from a hash of its content and the seed.

    The prompts with the smallest hashes are held out, round(fraction * n) of them (at least
    one when fraction > 0 and n >= 2, and at least one train prompt when fraction < 1), so a
    prompt's split does not depend on the order of the list, and barely on the other prompts.
    """
    if not 0 <= heldout_fraction <= 1:
        raise PotstillError(f"held-out fraction must be in [0, 1], got {heldout_fraction}")
    n = len(prompts)
    n_heldout = int(heldout_fraction * n + 0.5)
    if n >= 2:
        if heldout_fraction > 0:
            n_heldout = max(n_heldout, 1)
        if heldout_fraction < 1:
            n_heldout = min(n_heldout, n - 1)
    elif heldout_fraction < 1:
        n_heldout = 0
    keys = [stable_hash({"messages": p.messages, "seed": seed}) for p in prompts]
    order = sorted(range(n), key=lambda i: (keys[i], i))
    heldout = set(order[:n_heldout])
    return ["heldout" if i in heldout else "train" for i in range(n)]


def prompts_hash(prompts: list[Prompt]) -> str:
    """sha256 of the prompts (messages and references, in order): identifies a capture's inputs."""
    return stable_hash([{"messages": p.messages, "reference": p.reference} for p in prompts])
