"""Prompts from a Hugging Face dataset on the Hub: `--prompts hf:ORG/NAME[/CONFIG][:SPLIT]`.

Only the dataset's data files (Parquet, JSONL) are fetched, with `huggingface_hub.snapshot_download`
(already a dependency of transformers; no `datasets` needed), into the usual Hub cache, so a
second run, or a run with HF_HUB_OFFLINE=1 after one online run, reads the cache. Datasets whose
repository holds no Parquet/JSONL (scripts, CSV) are read from the Hub's own Parquet conversion
(revision `refs/convert/parquet`). The files found are then read like local prompt files.

    potstill generate --prompts hf:tatsu-lab/alpaca:train --max-prompts 500 --out runs/cap
"""

from __future__ import annotations

import re
from pathlib import Path

from potstill.errors import PotstillError

PATTERNS = ["*.parquet", "*.jsonl"]


def parse_spec(spec: str) -> tuple[str, str | None, str]:
    """'hf:org/name/config:split' -> (repo id, config or None, split); split defaults to 'train'."""
    body = spec[3:] if spec.startswith("hf:") else spec
    path, _, split = body.partition(":")
    parts = [p for p in path.split("/") if p]
    if len(parts) not in (2, 3) or not split and body.endswith(":"):
        raise PotstillError("expected hf:ORG/NAME[/CONFIG][:SPLIT]", where=spec)
    return "/".join(parts[:2]), parts[2] if len(parts) == 3 else None, split or "train"


def dataset_files(spec: str, cache_dir: str | Path | None = None) -> list[Path]:
    """The local paths of the data files of one split (and config) of a Hub dataset, fetched if needed."""
    repo, config, split = parse_spec(spec)
    for revision in (None, "refs/convert/parquet"):
        folder = _snapshot(repo, revision, spec, cache_dir)
        files = sorted(p for pattern in PATTERNS for p in Path(folder).rglob(pattern))
        if files:
            break
    else:
        raise PotstillError("the dataset has no Parquet or JSONL data files", where=spec)
    rel = {f: f.relative_to(folder).as_posix() for f in files}
    if config:
        files = [f for f in files if rel[f].split("/")[0] == config]
        if not files:
            raise PotstillError(f"no data files for config {config!r}", where=spec)
    # a split is named by a path component or a file-name prefix: train/…, train-0000…, train.jsonl
    named = re.compile(rf"(^|/)(partial-)?{re.escape(split)}([-_./]|$)")
    chosen = [f for f in files if named.search(rel[f])]
    any_split = re.compile(r"(^|/)(partial-)?(train|test|validation|valid|dev)([-_./]|$)")
    if not chosen and not any(any_split.search(rel[f]) for f in files) and split == "train":
        chosen = files  # an unsplit dataset: all of it is 'train'
    if not chosen:
        raise PotstillError(f"no data files for split {split!r} (have: {', '.join(sorted(rel.values())[:5])})",
                            where=spec)
    return chosen


def _snapshot(repo: str, revision: str | None, spec: str, cache_dir) -> str:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        return snapshot_download(repo, repo_type="dataset", revision=revision, allow_patterns=PATTERNS,
                                 cache_dir=cache_dir)
    except RevisionNotFoundError:
        raise PotstillError("the dataset has no Parquet or JSONL data files", where=spec) from None
    except GatedRepoError:
        raise PotstillError("the dataset is gated: accept its terms on the Hub and set HF_TOKEN", where=spec) from None
    except RepositoryNotFoundError:
        raise PotstillError("no such dataset on the Hub (or it is private: set HF_TOKEN)", where=spec) from None
    except LocalEntryNotFoundError:
        raise PotstillError(
            "not in the local Hugging Face cache, and the Hub is unreachable (offline, or HF_HUB_OFFLINE=1)",
            where=spec,
        ) from None
    except OSError as e:
        raise PotstillError(f"cannot fetch the dataset ({e})", where=spec) from None
