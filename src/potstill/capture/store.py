"""Capture directory: `manifest.json` + `shard-NNNNN.parquet` (zstd). Resumable writer, verifying reader.

Writing: rows are buffered and written `shard_rows` at a time to a hidden temp file, fsynced,
renamed to `shard-NNNNN.parquet`, and only then listed (with its sha256) in manifest.json,
which is itself replaced atomically. The manifest is the truth: a shard it does not list is
not part of the capture. So after a kill -9 at any moment, reopening the directory with the
same run fields drops temp and unlisted files, and `done_ids` are exactly the rows in listed
shards; the caller skips those and nothing is lost or written twice.

Reading: `Capture.open(dir)` checks the manifest and every shard's sha256, then `rows()`
yields dicts with numpy arrays and a decoded `TopK` per row. Shards are plain Parquet: they
load with pyarrow.parquet.read_table or `datasets.load_dataset("parquet", data_files=...)`.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from potstill import __version__
from potstill.capture.codec import Codec, get_codec
from potstill.errors import PotstillError
from potstill.utils import atomic_path, sha256_file, stable_hash

try:  # an advisory lock keeps two writers out of one directory (released by the OS on kill -9)
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX
    fcntl = None

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SHARD_RE = re.compile(r"^shard-\d{5}\.parquet$")
# Manifest keys the writer owns; every other key defines the run and must match on resume.
WRITER_KEYS = frozenset(
    {"potstill_version", "created", "updated", "complete", "shards", "counts", "bytes_on_disk",
     "bytes_per_completion_token", "topk_bytes_per_completion_token", "timings",
     "yield", "episodes_this_run",  # these two: agent captures (potstill.agent.generate)
     "quantize"}  # an int8 teacher's measured fidelity, this run's (capture/generate.py)
)
BASE_COLUMNS = ("id", "prompt", "reference", "split", "prompt_ids", "completion_ids",
                "completion_text", "finish_reason", "sampled_logprob")


def row_id(messages: list[dict], sampling: dict[str, Any], sample_index: int) -> str:
    """Stable id of one completion: hash of the prompt, the sampling params and the sample index."""
    return stable_hash({"messages": messages, "sampling": sampling, "sample": int(sample_index)})[:16]


def capture_schema(codec: Codec) -> pa.Schema:
    ids = pa.list_(codec.id_type)
    return pa.schema(
        [
            pa.field("id", pa.string(), nullable=False),
            pa.field("prompt", pa.string(), nullable=False),
            pa.field("reference", pa.string()),
            pa.field("split", pa.string(), nullable=False),
            pa.field("prompt_ids", ids),
            pa.field("completion_ids", ids),
            pa.field("completion_text", pa.string()),
            pa.field("finish_reason", pa.string()),
            pa.field("sampled_logprob", pa.list_(pa.float32())),
            *codec.arrow_fields(),
        ]
    )


class CaptureWriter:
    """Write rows into a capture directory, resuming one that holds the same run.

    `manifest` holds the caller's run fields (teacher identity, sampling, k, prompt source and
    hash, split seed, ...). After construction `done_ids` holds the ids already captured.
    """

    def __init__(self, directory: str | os.PathLike, manifest: dict[str, Any], codec: Codec,
                 shard_rows: int = 256, compression_level: int = 15, extra_fields: list[pa.Field] | None = None):
        if shard_rows < 1:
            raise PotstillError(f"shard_rows must be >= 1, got {shard_rows}")
        self.directory = Path(directory)
        self.codec = codec
        self.shard_rows = shard_rows
        self.compression_level = compression_level
        # extra list columns (e.g. an agent capture's per-token role_mask), named in the manifest
        self.extra_fields = list(extra_fields or [])
        self.schema = capture_schema(codec)
        for f in self.extra_fields:
            self.schema = self.schema.append(f)
        # Dictionary pages pay off only for few distinct values (splits, finish reasons, uint8 codes);
        # on token ids and floats they cost 5-40% (measured).
        self._dictionary_columns = ["split", "finish_reason"] + [
            f"{f.name}.list.element" for f in codec.arrow_fields() if f.type.value_type == pa.uint8()
        ]
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = _lock(self.directory)
        self._buffer: list[dict[str, Any]] = []
        self._closed = False
        try:
            self._open(manifest)
        except BaseException:
            self._release()
            raise

    def _open(self, manifest: dict[str, Any]) -> None:
        run = json.loads(json.dumps(manifest, default=str))  # JSON-normalised: what we will read back
        run = {k: v for k, v in run.items() if k not in WRITER_KEYS}
        run.update(format_version=FORMAT_VERSION, codec={"name": self.codec.name, "params": self.codec.params})
        if self.extra_fields:
            run["extra_columns"] = [f.name for f in self.extra_fields]
        path = self.directory / MANIFEST
        if path.exists():
            old = read_manifest(self.directory)
            diff = _difference({k: v for k, v in old.items() if k not in WRITER_KEYS}, run)
            if diff:
                raise PotstillError(f"capture exists with different {diff}; use a new --out", where=str(self.directory))
            self.manifest = old
            self._remove_strays(listed={s["file"] for s in old.get("shards", [])})
            verify_shards(self.directory, old)
            self.done_ids = set()
            for s in old.get("shards", []):
                ids = pq.read_table(self.directory / s["file"], columns=["id"]).column("id").to_pylist()
                self.done_ids.update(ids)
        else:
            if any(SHARD_RE.match(p.name) for p in self.directory.iterdir()):
                raise PotstillError("holds shard files but no manifest.json; use a new --out", where=str(self.directory))
            self._remove_strays(listed=set())
            self.manifest = {**run, "potstill_version": __version__, "created": _now(), "complete": False,
                             "shards": []}
            self.done_ids = set()
            self._write_manifest()
        self._seen = set(self.done_ids)

    # -- writing ---------------------------------------------------------------------------------

    def add(self, row: dict[str, Any]) -> None:
        """Buffer one completion; writes a shard when `shard_rows` are buffered.

        `row`: id, prompt (messages or their JSON), reference (str|None), split, prompt_ids,
        completion_ids, completion_text, finish_reason, sampled_logprob ([T] or None), and
        topk_ids / topk_logprobs ([T, k]; None or absent for a text-only row).
        """
        if self._closed:
            raise RuntimeError("CaptureWriter is closed")
        rid = str(row["id"])
        if rid in self._seen:
            raise PotstillError(f"row id {rid} is already in the capture (duplicate prompt + sample?)",
                                where=str(self.directory))
        self._buffer.append(self._encode(row))
        self._seen.add(rid)
        if len(self._buffer) >= self.shard_rows:
            self.flush()

    def _encode(self, row: dict[str, Any]) -> dict[str, Any]:
        completion = self._token_ids(row["completion_ids"], "completion_ids")
        t = len(completion)
        prompt = row["prompt"]
        out = {
            "id": str(row["id"]),
            "prompt": prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False),
            "reference": row.get("reference"),
            "split": str(row["split"]),
            "prompt_ids": self._token_ids(row["prompt_ids"], "prompt_ids"),
            "completion_ids": completion,
            "completion_text": row.get("completion_text", ""),
            "finish_reason": row.get("finish_reason"),
            "sampled_logprob": None,
        }
        if row.get("sampled_logprob") is not None:
            out["sampled_logprob"] = np.asarray(row["sampled_logprob"], dtype=np.float32).reshape(-1)
            if len(out["sampled_logprob"]) != t:
                raise ValueError(f"row {out['id']}: sampled_logprob has {len(out['sampled_logprob'])} values for {t} tokens")
        for f in self.extra_fields:
            value = row.get(f.name)
            out[f.name] = None if value is None else np.asarray(value).reshape(-1)
            if value is not None and len(out[f.name]) != t:
                raise ValueError(f"row {out['id']}: {f.name} has {len(out[f.name])} values for {t} tokens")
        columns = self.codec.columns
        if columns and row.get("topk_ids") is not None and row.get("topk_logprobs") is not None:
            ids, lps = np.asarray(row["topk_ids"]), np.asarray(row["topk_logprobs"])
            if ids.ndim != 2 or lps.ndim != 2:  # e.g. an empty completion's arrays of shape (0,)
                ids, lps = ids.reshape(t, -1 if t else self.codec.k), lps.reshape(t, -1 if t else self.codec.k)
            if ids.shape[0] != t:
                raise ValueError(f"row {out['id']}: top-k has {ids.shape[0]} rows for {t} completion tokens")
            out.update(self.codec.encode(ids, lps))
        else:
            out.update(dict.fromkeys(columns))  # text-only row (or codec "none")
        return out

    def _token_ids(self, values, field: str) -> np.ndarray:
        ids = np.asarray(values, dtype=np.int64).reshape(-1)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.codec.vocab_size):
            raise ValueError(f"{field}: token id outside the vocab (size {self.codec.vocab_size})")
        return ids.astype(self.codec.id_dtype)

    def flush(self) -> None:
        """Write the buffered rows as one shard (temp file, fsync, rename), then list it in the manifest."""
        if not self._buffer:
            return
        rows, self._buffer = self._buffer, []
        table = pa.Table.from_pydict({name: [r[name] for r in rows] for name in self.schema.names}, schema=self.schema)
        name = f"shard-{len(self.manifest['shards']):05d}.parquet"
        final, tmp = self.directory / name, self.directory / f".{name}.tmp"
        pq.write_table(table, tmp, compression="zstd", compression_level=self.compression_level,
                       use_dictionary=self._dictionary_columns)
        _fsync(tmp)
        os.replace(tmp, final)
        _fsync(self.directory)
        meta = pq.ParquetFile(final).metadata
        codec_cols = set(self.codec.columns)
        topk_bytes = sum(
            meta.row_group(g).column(c).total_compressed_size
            for g in range(meta.num_row_groups)
            for c in range(meta.num_columns)
            if meta.row_group(g).column(c).path_in_schema.split(".")[0] in codec_cols
        )
        splits: dict[str, dict[str, int]] = {}
        for r in rows:
            s = splits.setdefault(r["split"], {"rows": 0, "completion_tokens": 0, "prompt_tokens": 0})
            s["rows"] += 1
            s["completion_tokens"] += len(r["completion_ids"])
            s["prompt_tokens"] += len(r["prompt_ids"])
        self.manifest["shards"].append(
            {
                "file": name,
                "sha256": sha256_file(final),
                "rows": len(rows),
                "completion_tokens": sum(s["completion_tokens"] for s in splits.values()),
                "prompt_tokens": sum(s["prompt_tokens"] for s in splits.values()),
                "bytes": final.stat().st_size,
                "topk_bytes": topk_bytes,
                "splits": splits,
            }
        )
        self.done_ids.update(r["id"] for r in rows)
        self.manifest["complete"] = False
        self._write_manifest()

    def close(self) -> None:
        """Flush the last partial shard and mark the capture complete."""
        if self._closed:
            return
        self.flush()
        self.manifest["complete"] = True
        self._write_manifest()
        self._release()

    def _write_manifest(self) -> None:
        self.manifest.update(_totals(self.manifest["shards"]))
        self.manifest["updated"] = _now()
        with atomic_path(self.directory / MANIFEST) as tmp:
            os.chmod(tmp, 0o644)  # mkstemp makes it 0600; a capture is meant to be shared
            with open(tmp, "w") as f:
                f.write(json.dumps(self.manifest, indent=2, default=str) + "\n")
                f.flush()
                os.fsync(f.fileno())
        _fsync(self.directory)

    def _remove_strays(self, listed: set[str]) -> None:
        """Temp files of a killed run, and shards renamed but never listed in the manifest."""
        for p in self.directory.iterdir():
            temp = p.name.startswith((".shard-", f".{MANIFEST}.")) and p.name.endswith(".tmp")
            if temp or (SHARD_RE.match(p.name) and p.name not in listed):
                p.unlink()

    def _release(self) -> None:
        self._closed = True
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    def __enter__(self) -> CaptureWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the complete rows we have; the capture stays incomplete and resumable
            try:
                self.flush()
            finally:
                self._release()


class Capture:
    """A capture on disk, opened for reading."""

    def __init__(self, directory: Path, manifest: dict[str, Any]):
        self.directory = directory
        self.manifest = manifest
        codec = manifest["codec"]
        self.codec = get_codec(codec["name"], **codec["params"])

    @classmethod
    def open(cls, directory: str | os.PathLike, verify: bool = True, allow_incomplete: bool = False) -> Capture:
        directory = Path(directory)
        manifest = read_manifest(directory)
        if not manifest.get("complete") and not allow_incomplete:
            raise PotstillError(
                "capture is incomplete (generation stopped early); rerun the same `potstill generate` to finish it",
                where=str(directory / MANIFEST),
            )
        if verify:
            verify_shards(directory, manifest)
        return cls(directory, manifest)

    @property
    def text_only(self) -> bool:
        return self.codec.name == "none"

    @property
    def shard_paths(self) -> list[Path]:
        return [self.directory / s["file"] for s in self.manifest["shards"]]

    def __len__(self) -> int:
        return sum(s["rows"] for s in self.manifest["shards"])

    def table(self, columns: list[str] | None = None) -> pa.Table:
        """All shards as one pyarrow table (raw stored columns)."""
        tables = [pq.read_table(p, columns=columns) for p in self.shard_paths]
        if not tables:
            schema = capture_schema(self.codec)
            return schema.empty_table() if columns is None else schema.empty_table().select(columns)
        return pa.concat_tables(tables)

    def rows(self, split: str | None = None, columns: list[str] | None = None) -> Iterator[dict[str, Any]]:
        """Rows as dicts: token ids as int64 arrays, `prompt` as messages, `topk` as a decoded TopK.

        `columns` picks fields among BASE_COLUMNS, the manifest's `extra_columns` and "topk" (default: all).
        """
        extra = list(self.manifest.get("extra_columns", []))
        wanted = list(columns) if columns is not None else [*BASE_COLUMNS, *extra, "topk"]
        unknown = set(wanted) - {*BASE_COLUMNS, *extra, "topk"}
        if unknown:
            raise ValueError(f"unknown capture column(s) {sorted(unknown)}")
        read = [c for c in (*BASE_COLUMNS, *extra) if c in wanted]
        if split is not None and "split" not in read:
            read.append("split")
        codec_cols = self.codec.columns if "topk" in wanted else []
        for path in self.shard_paths:
            table = pq.read_table(path, columns=read + codec_cols)
            if split is not None:
                table = table.filter(pc.equal(table["split"], split))
            values = {name: _column_values(table.column(name)) for name in table.column_names}
            for i in range(table.num_rows):
                row = {c: values[c][i] for c in read if c in wanted}
                if "prompt" in row:
                    row["prompt"] = json.loads(row["prompt"])
                for c in ("prompt_ids", "completion_ids"):
                    if c in row:
                        row[c] = row[c].astype(np.int64) if row[c] is not None else np.zeros(0, np.int64)
                if "topk" in wanted:
                    row["topk"] = None if self.text_only else self.codec.decode({c: values[c][i] for c in codec_cols})
                yield row


def read_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / MANIFEST
    if not path.exists():
        raise PotstillError("no manifest.json here: not a capture (or generation never started)", where=str(directory))
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PotstillError(f"unreadable manifest ({e})", where=str(path)) from None
    if not isinstance(manifest, dict):
        raise PotstillError("manifest is not a JSON object", where=str(path))
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise PotstillError(f"format_version {version!r} is not {FORMAT_VERSION} (another potstill version?)",
                            where=f"{path}: format_version")
    for key, kind in (("codec", dict), ("shards", list)):
        if not isinstance(manifest.get(key), kind):
            raise PotstillError(f"field '{key}' missing or not a {kind.__name__}", where=str(path))
    codec = manifest["codec"]
    if not isinstance(codec.get("name"), str) or not isinstance(codec.get("params"), dict):
        raise PotstillError("field 'codec' needs 'name' and 'params'", where=str(path))
    for i, s in enumerate(manifest["shards"]):
        if not isinstance(s, dict) or not all(k in s for k in ("file", "sha256", "rows")):
            raise PotstillError(f"field 'shards[{i}]' needs file, sha256 and rows", where=str(path))
    return manifest


def verify_shards(directory: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Every listed shard exists and has the sha256 the manifest recorded."""
    for s in manifest["shards"]:
        path = Path(directory) / s["file"]
        if not path.exists():
            raise PotstillError("shard listed in manifest.json is missing", where=str(path))
        if sha256_file(path) != s["sha256"]:
            raise PotstillError("sha256 mismatch (corrupt or modified)", where=str(path))


def _column_values(column: pa.ChunkedArray) -> list:
    """Python values for scalars, numpy arrays (or None) for list columns."""
    if not pa.types.is_list(column.type):
        return column.to_pylist()
    arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
    if len(arr) == 0:
        return []
    offsets = arr.offsets.to_numpy()
    flat = arr.values.to_numpy(zero_copy_only=False)
    valid = arr.is_valid().to_numpy(zero_copy_only=False)
    return [flat[offsets[i] : offsets[i + 1]] if valid[i] else None for i in range(len(arr))]


def _totals(shards: list[dict[str, Any]]) -> dict[str, Any]:
    counts: dict[str, Any] = {"rows": 0, "completion_tokens": 0, "prompt_tokens": 0, "splits": {}}
    for s in shards:
        for key in ("rows", "completion_tokens", "prompt_tokens"):
            counts[key] += s.get(key, 0)
        for split, c in s.get("splits", {}).items():
            mine = counts["splits"].setdefault(split, {"rows": 0, "completion_tokens": 0, "prompt_tokens": 0})
            for key in mine:
                mine[key] += c.get(key, 0)
    nbytes = sum(s.get("bytes", 0) for s in shards)
    topk = sum(s.get("topk_bytes", 0) for s in shards)
    tokens = counts["completion_tokens"]
    return {
        "counts": counts,
        "bytes_on_disk": nbytes,
        "bytes_per_completion_token": round(nbytes / tokens, 3) if tokens else None,
        "topk_bytes_per_completion_token": round(topk / tokens, 3) if tokens else None,
    }


def _difference(old: Any, new: Any, path: str = "") -> str | None:
    """Dotted path of the first field that differs between two JSON values, or None."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            sub = f"{path}.{key}" if path else str(key)
            if key not in old or key not in new:
                return sub
            found = _difference(old[key], new[key], sub)
            if found:
                return found
        return None
    return None if old == new else (path or "manifest")


def _lock(directory: Path):
    if fcntl is None:
        return None
    f = open(directory / ".lock", "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise PotstillError("another process is writing this capture", where=str(directory)) from None
    return f


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")

