"""Small helpers shared across stages: atomic writes, hashing, the potstill home directory, pyplot."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def potstill_home() -> Path:
    """Cache root: $POTSTILL_HOME, else the user's cache dir (~/.cache/potstill)."""
    env = os.environ.get("POTSTILL_HOME")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "potstill"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `path`; rename it onto `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are ordinary files
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def write_json(path: str | os.PathLike, obj) -> None:
    """Write JSON atomically (temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stable_hash(obj) -> str:
    """sha256 of the canonical JSON of `obj` (sorted keys): a stable id for configs and prompts."""
    return sha256_text(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str))


def quiet_transformers() -> None:
    """No per-file progress bars or advisory warnings from transformers in our output."""
    import transformers.utils.logging as tlog

    tlog.disable_progress_bar()
    tlog.set_verbosity_error()


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2 byte-level BPE alphabet: byte -> the printable character that stands for it (b' ' -> 'Ġ')."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs), strict=True))


def pyplot():
    """matplotlib.pyplot on the Agg backend (files only, no display needed); imported on first use."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def cpu_info() -> dict:
    """What the CPU offers torch: its kernel capability (e.g. AVX2, AVX512) and native bf16 (yes/no)."""
    import torch

    from potstill.lm.loading import cpu_has_bf16

    return {"capability": torch.backends.cpu.get_cpu_capability(), "bf16": cpu_has_bf16(), "cpus": os.cpu_count()}


def cpu_line(info: dict) -> str:
    """'CPU AVX2, no bf16, 2 cores' for a table's caption."""
    return f"CPU {info['capability']}, {'bf16' if info['bf16'] else 'no bf16'}, {info['cpus']} cores"


def jsonl_objects(text: str, name: str) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of JSONL `text`; a PotstillError naming `name:line` if not JSON."""
    from potstill.errors import PotstillError

    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PotstillError(f"invalid JSON ({e.msg} at column {e.colno})", where=f"{name}:{n}") from None
        yield n, record
