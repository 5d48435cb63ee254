"""Recipes: generate -> train -> eval in one run directory (`potstill run recipe.yaml`, `potstill demo`).

A recipe is YAML with a section per stage (fields as in config.py). Paths between stages are
filled in from `run_dir`: capture/, student/, and, with `eval_before: true`, student-before/
(the student as built, before any training) so the table shows what training bought.
"""

from __future__ import annotations

import time
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from potstill.config import EvalConfig, GenerateConfig, TrainConfig, build, load_recipe
from potstill.errors import PotstillError
from potstill.utils import atomic_path


def builtin_recipe(name: str) -> Path:
    path = Path(str(resources.files("potstill") / "recipes" / f"{name}.yaml"))
    if not path.exists():
        raise PotstillError(f"no built-in recipe {name!r}")
    return path


def resolve_recipe(path: str | Path, overrides: list[str] = (), run_dir: str | None = None,
                   ) -> tuple[GenerateConfig, TrainConfig, EvalConfig]:
    """The three stage configs a recipe (+ stage.field=value overrides) resolves to, typed and checked."""
    data = load_recipe(path, overrides)
    return _configs(data, str(path), Path(run_dir or data.get("run_dir") or "runs/run"))


def _configs(data: dict[str, Any], where: str, run: Path) -> tuple[GenerateConfig, TrainConfig, EvalConfig]:
    gen = build(GenerateConfig, {**data.get("generate", {}), "out": str(run / "capture")}, f"{where}: generate")
    train_cfg = build(
        TrainConfig,
        {**data.get("train", {}), "capture": gen.out, "out": str(run / "student"), "teacher": gen.teacher},
        f"{where}: train",
    )
    students = [train_cfg.out]
    labels = ["student after"]
    if data.get("eval_before"):
        students.insert(0, str(run / "student-before"))
        labels.insert(0, "student before")
    eval_cfg = build(
        EvalConfig,
        {**data.get("eval", {}), "capture": gen.out, "students": students, "labels": labels,
         "teacher": gen.teacher, "out": str(run)},
        f"{where}: eval",
    )
    return gen, train_cfg, eval_cfg


def run_recipe(path: str | Path, overrides: list[str] = (), run_dir: str | None = None, log=print) -> dict[str, Any]:
    """Run every stage of a recipe; returns {"eval": eval result, "timings": seconds per stage}."""
    data = load_recipe(path, overrides)
    run = Path(run_dir or data.get("run_dir") or "runs/run")
    gen, train_cfg, eval_cfg = _configs(data, str(path), run)
    run.mkdir(parents=True, exist_ok=True)
    resolved = {"run_dir": str(run), "eval_before": bool(data.get("eval_before")),
                "generate": gen.__dict__, "train": train_cfg.__dict__, "eval": eval_cfg.__dict__}
    with atomic_path(run / "recipe.resolved.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(resolved, sort_keys=False))

    from potstill.capture.generate import generate
    from potstill.evaluate import run_eval
    from potstill.train.loop import train

    timings = {}
    t = time.perf_counter()
    manifest = generate(gen, log=log)
    timings["generate_s"] = time.perf_counter() - t

    t = time.perf_counter()
    model = tokenizer = info = None
    if data.get("eval_before"):
        model, tokenizer, info = build_and_save_before(train_cfg, run / "student-before", log)
    summary = train(train_cfg, log=log, model=model, tokenizer=tokenizer, student_info=info)
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    result = run_eval(eval_cfg, log=log)
    timings["eval_s"] = time.perf_counter() - t
    return {"eval": result, "timings": timings, "capture": manifest, "train": summary, "run_dir": str(run)}


def build_and_save_before(cfg: TrainConfig, out: Path, log=print):
    """Build the student as `train` would and save it untrained, as the 'before' baseline."""
    from potstill.capture.store import Capture
    from potstill.students import build_student
    from potstill.teachers.hf import resolve_model_dir
    from potstill.train.data import examples_from_capture

    capture = Capture.open(cfg.capture)
    examples = examples_from_capture(capture, split="train", max_seq_len=cfg.max_seq_len)
    calibration = [e.input_ids.tolist() for e in examples[: cfg.calibration]]
    model, tokenizer, info = build_student(cfg.student, resolve_model_dir(cfg.teacher), calibration, seed=cfg.seed)
    if info.get("dropped_layers") is not None:
        log(f"student: {cfg.student}: dropped layers {info['dropped_layers']} (least block influence)")
    if info.get("summary"):
        log(f"student: {cfg.student}: {info['summary']}")
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer, info
