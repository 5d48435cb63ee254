"""What `potstill report` reads: run directories, their artefacts, capture statistics, Pareto fronts.

A run directory is what `potstill run` / `potstill demo` write: capture/, student/ (+ metrics.jsonl,
train_config.json, train_summary.json, provenance.json), optional student-before/, eval.json (at
the top or under eval/) and recipe.resolved.yaml. A bare student directory, eval directory or
capture directory is accepted too; the paths recorded inside it (provenance.json, eval.json) lead
to the rest when they still exist. Nothing here loads a model: see report_examples.py for that.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from potstill.errors import PotstillError
from potstill.evaluate.report_config import QUALITY
from potstill.utils import sha256_file, sha256_text


@dataclass
class Student:
    """One student model of a run: its eval label, directory (None if gone) and training record."""

    label: str
    path: Path | None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    provenance: dict[str, Any] | None = None
    train_config: dict[str, Any] | None = None
    train_summary: dict[str, Any] | None = None


@dataclass
class Run:
    name: str
    path: Path
    kind: str  # "run", "student", "eval" or "capture": what the user pointed at
    capture: Path | None = None
    manifest: dict[str, Any] | None = None
    students: list[Student] = field(default_factory=list)
    eval: dict[str, Any] | None = None
    eval_path: Path | None = None
    recipe_text: str | None = None
    agent_eval: dict[str, Any] | None = None  # `potstill agent eval` results.json (an agent run)
    agent_eval_path: Path | None = None

    def eval_row(self, label: str) -> dict[str, Any] | None:
        for row in (self.eval or {}).get("rows", []):
            if row.get("model") == label:
                return row
        return None


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PotstillError(f"unreadable JSON ({e})", where=str(path)) from None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """metrics.jsonl: one JSON object per optimizer step."""
    from potstill.capture.prompts import jsonl_records

    out = []
    for i, rec in jsonl_records(path, str(path)):
        if not isinstance(rec, dict) or "step" not in rec:
            raise PotstillError("a metrics line needs a 'step'", where=f"{path}:{i}")
        out.append(rec)
    return out


def _existing(recorded: str | None, base: Path) -> Path | None:
    """A path recorded in an artefact, or the same name next to `base` if the run was moved."""
    if not recorded:
        return None
    p = Path(recorded)
    if p.exists():
        return p
    moved = base / p.name
    return moved if moved.exists() else None


def load_student(path: Path, label: str) -> Student:
    s = Student(label=label, path=path if path.is_dir() else None)
    if s.path is None:
        return s
    if (path / "metrics.jsonl").exists():
        s.metrics = read_metrics(path / "metrics.jsonl")
    for attr, name in (("provenance", "provenance.json"), ("train_config", "train_config.json"),
                       ("train_summary", "train_summary.json")):
        if (path / name).exists():
            setattr(s, attr, read_json(path / name))
    return s


def _is_student(p: Path) -> bool:
    return (p / "config.json").exists() and any((p / n).exists() for n in ("metrics.jsonl", "provenance.json"))


def agent_eval_path(p: Path) -> Path | None:
    """An agent eval's results.json in `p` or `p/eval` (rows with per-mode 'tool' metrics), if any."""
    for e in (p / "eval" / "results.json", p / "results.json"):
        if e.exists():
            data = read_json(e)
            rows = data.get("rows") if isinstance(data, dict) else None
            if isinstance(rows, list) and rows and all(isinstance(r, dict) and isinstance(r.get("tool"), dict)
                                                       for r in rows):
                return e
    return None


def load_run(path: str | Path) -> Run:
    """Read one run (or bare student / eval / capture directory); one-line PotstillError if it is none."""
    p = Path(path)
    if not p.is_dir():
        raise PotstillError("no such directory", where=str(p))
    eval_path = next((e for e in (p / "eval.json", p / "eval" / "eval.json") if e.exists()), None)
    agent_path = agent_eval_path(p)
    if (p / "capture").is_dir() or (p / "student").is_dir() or (p / "recipe.resolved.yaml").exists():
        kind = "run"
    elif eval_path is not None or agent_path is not None:
        kind = "eval"
    elif _is_student(p):
        kind = "student"
    elif (p / "manifest.json").exists():
        kind = "capture"
    else:
        raise PotstillError("not a potstill run, student, eval or capture directory (no capture/, student/, "
                            "eval.json, recipe.resolved.yaml, metrics.jsonl or manifest.json)", where=str(p))
    run = Run(name=p.resolve().name, path=p, kind=kind, eval_path=eval_path, agent_eval_path=agent_path)
    if agent_path is not None:
        run.agent_eval = read_json(agent_path)
    if eval_path is not None:
        run.eval = read_json(eval_path)
        if not isinstance(run.eval, dict) or not isinstance(run.eval.get("rows"), list):
            raise PotstillError("not an eval result (no 'rows' list)", where=str(eval_path))
    if (p / "recipe.resolved.yaml").exists():
        run.recipe_text = (p / "recipe.resolved.yaml").read_text()

    # students: those eval measured (with its labels), then any student dirs it did not
    dirs: list[tuple[str, Path | None]] = []
    if run.eval:
        cfg = run.eval.get("config") or {}
        paths = cfg.get("students") or []
        labels = cfg.get("labels") or [Path(s).name for s in paths]
        for s, label in zip(paths, labels, strict=False):
            dirs.append((label, _existing(s, p)))
    if kind == "student":
        dirs.append((p.resolve().name, p))
    known = {d.resolve() for _, d in dirs if d is not None}
    for name in ("student-before", "student"):
        if (p / name).is_dir() and (p / name).resolve() not in known:
            dirs.append((name, p / name))
    run.students = [load_student(d, label) if d is not None else Student(label, None) for label, d in dirs]

    # the capture: the run's own, else the one eval / training recorded
    if kind == "capture":
        run.capture = p
    elif (p / "capture" / "manifest.json").exists():
        run.capture = p / "capture"
    else:
        recorded = (run.eval or {}).get("capture") or next(
            ((s.provenance or {}).get("capture") for s in run.students if s.provenance), None)
        run.capture = _existing(recorded, p)
    if run.capture is not None:
        from potstill.capture.store import read_manifest

        run.manifest = read_manifest(run.capture)
    return run


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Every run, with names made unique (parent/name, then a number) for plot legends."""
    if not paths:
        raise PotstillError("report: give at least one run directory")
    runs = [load_run(p) for p in paths]
    seen: Counter = Counter(r.name for r in runs)
    for r in runs:
        if seen[r.name] > 1:
            r.name = f"{r.path.resolve().parent.name}/{r.name}"
    used: set[str] = set()
    for i, r in enumerate(runs):
        if r.name in used:
            r.name = f"{r.name}#{i + 1}"
        used.add(r.name)
    return runs


# -- capture statistics ------------------------------------------------------------------------


def topk_entropy(logprobs: np.ndarray, tail_logprob: np.ndarray) -> np.ndarray:
    """Per-token entropy (nats) of the stored top-k + one tail bucket: a lower bound on the full entropy.

    logprobs [T, k] (padding -inf), tail_logprob [T] (-inf when nothing is left) -> [T].
    """
    lp = np.concatenate([logprobs, tail_logprob[:, None]], axis=1).astype(np.float64)
    finite = np.isfinite(lp)
    p = np.where(finite, np.exp(np.where(finite, lp, 0.0)), 0.0)
    return -(p * np.where(finite, lp, 0.0)).sum(axis=1)


def capture_stats(capture_dir: Path) -> dict[str, Any]:
    """Rows, tokens, bytes per completion token from the shard files, teacher entropy, finish reasons."""
    from potstill.capture.store import Capture

    cap = Capture.open(capture_dir, allow_incomplete=True)
    m = cap.manifest
    finish: Counter = Counter()
    splits: Counter = Counter()
    entropies = []
    completion_tokens = prompt_tokens = rows = 0
    for row in cap.rows(columns=["split", "prompt_ids", "completion_ids", "finish_reason", "topk"]):
        rows += 1
        splits[row["split"]] += 1
        finish[row["finish_reason"] or "none"] += 1
        completion_tokens += len(row["completion_ids"])
        prompt_tokens += len(row["prompt_ids"])
        if row["topk"] is not None and len(row["completion_ids"]):
            entropies.append(topk_entropy(row["topk"].logprobs, row["topk"].tail_logprob))
    shard_bytes = sum(path.stat().st_size for path in cap.shard_paths)
    ent = np.concatenate(entropies) if entropies else np.zeros(0)
    return {
        "path": str(capture_dir),
        "complete": bool(m.get("complete")),
        "rows": rows,
        "splits": dict(splits),
        "completion_tokens": completion_tokens,
        "prompt_tokens": prompt_tokens,
        "shards": len(cap.shard_paths),
        "shard_bytes": shard_bytes,
        "bytes_per_completion_token": shard_bytes / completion_tokens if completion_tokens else None,
        "topk_bytes_per_completion_token": m.get("topk_bytes_per_completion_token"),
        "mean_teacher_entropy": float(ent.mean()) if ent.size else None,
        "entropy_tokens": int(ent.size),
        "finish_reasons": dict(finish.most_common()),
        "codec": m.get("codec"),
        "k": m.get("k"),
        "_entropies": ent,  # per token, for the histogram (not written to JSON)
    }


# -- Pareto fronts -----------------------------------------------------------------------------


def pareto_front(points: list[tuple[float, float]], maximize: tuple[bool, bool]) -> list[bool]:
    """Which points no other point dominates (at least as good on both axes, better on one)."""
    sign = np.array([1.0 if m else -1.0 for m in maximize])
    pts = np.asarray(points, dtype=float).reshape(-1, 2) * sign  # now higher is better on both
    out = []
    for i, a in enumerate(pts):
        dominated = any(np.all(b >= a) and np.any(b > a) for j, b in enumerate(pts) if j != i)
        out.append(not dominated)
    return out


def student_points(runs: list[Run], quality: str) -> list[dict[str, Any]]:
    """Every evaluated student of every run, with quality, speed, size and Pareto membership."""
    if quality not in QUALITY:
        raise PotstillError(f"report: quality must be one of {', '.join(QUALITY)}, not {quality!r}")
    pts = []
    for r in runs:
        for row in (r.eval or {}).get("rows", []):
            if row.get("model") == "teacher" or row.get(quality) is None:
                continue
            pts.append({"run": r.name, "model": row["model"], "quality": row[quality],
                        "speed": row.get("gen_tokens_per_s"), "size_bytes": row.get("size_bytes"),
                        "params": row.get("params")})
    higher = QUALITY[quality]
    for axis, better_high in (("speed", True), ("size_bytes", False)):
        idx = [i for i, p in enumerate(pts) if p[axis] is not None]
        front = pareto_front([(pts[i][axis], pts[i]["quality"]) for i in idx], (better_high, higher))
        for i, on in zip(idx, front, strict=True):
            pts[i][f"pareto_{'speed' if axis == 'speed' else 'size'}"] = on
    return pts


# -- provenance --------------------------------------------------------------------------------


def student_provenance(run: Run, student: Student) -> dict[str, Any]:
    """Hashes and versions of one student, and whether it was trained on the capture shown here."""
    out: dict[str, Any] = {"label": student.label, "path": str(student.path) if student.path else None}
    if student.path is not None:
        files = sorted(student.path.glob("*.safetensors"))
        # same recipe as the teacher identity in teachers/hf.py: hash of the files' hashes
        out["weights_sha256"] = sha256_text("".join(sha256_file(f) for f in files)) if files else None
    prov = student.provenance or {}
    if prov:
        out.update(potstill_version=prov.get("potstill_version"), created=prov.get("created"),
                   student=prov.get("student"), loss=prov.get("loss"),
                   capture_manifest_sha256=prov.get("capture_manifest_sha256"))
        if run.capture is not None and prov.get("capture_manifest_sha256"):
            actual = sha256_file(run.capture / "manifest.json")
            out["capture_matches"] = actual == prov["capture_manifest_sha256"]
    return out
