"""Recipes: generate -> train -> eval in one run directory (`potstill run recipe.yaml`, `potstill demo`).

A recipe is YAML with a section per stage (fields as in config.py). Paths between stages are
filled in from `run_dir`: capture/, student/, and, with `eval_before: true`, student-before/
(the student as built, before any training) so the table shows what training bought.
"""

from __future__ import annotations

import dataclasses
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

    teacher = None
    if train_cfg.mode != "offline":  # the online modes' live teacher: loaded once, it also generates
        from potstill.teachers import load_teacher

        teacher = load_teacher(train_cfg.teacher, dtype=train_cfg.teacher_dtype)
    shared = teacher if teacher is not None and gen.teacher == train_cfg.teacher else None
    return run_stages(lambda: generate(gen, teacher=shared, log=log), train_cfg, lambda: run_eval(eval_cfg, log=log),
                      run, bool(data.get("eval_before")), log, teacher=teacher)


def run_stages(generate_stage, train_cfg: TrainConfig, eval_stage, run: Path, eval_before: bool, log=print,
               check_capture=None, teacher=None) -> dict[str, Any]:
    """generate -> (student-before) -> train -> eval, timed; `check_capture(manifest)` may refuse to train;
    `teacher` is handed to the online training modes. Shared by `run_recipe` and the agent recipe
    (agent/pipeline.py)."""
    from potstill.train.loop import train

    timings = {}
    t = time.perf_counter()
    manifest = generate_stage()
    timings["generate_s"] = time.perf_counter() - t
    if check_capture is not None:
        check_capture(manifest)

    t = time.perf_counter()
    model = tokenizer = info = None
    if eval_before:
        model, tokenizer, info = build_and_save_before(train_cfg, run / "student-before", log)
    summary = train(train_cfg, log=log, model=model, tokenizer=tokenizer, student_info=info, teacher=teacher)
    timings["train_s"] = time.perf_counter() - t

    t = time.perf_counter()
    result = eval_stage()
    timings["eval_s"] = time.perf_counter() - t
    return {"eval": result, "timings": timings, "capture": manifest, "train": summary, "run_dir": str(run)}


def build_and_save_before(cfg: TrainConfig, out: Path, log=print):
    """Build the student as `train` would and save it untrained, as the 'before' baseline."""
    from potstill.capture.store import Capture
    from potstill.train.data import examples_from_capture
    from potstill.train.loop import student_for

    examples = examples_from_capture(Capture.open(cfg.capture), split="train", max_seq_len=cfg.max_seq_len)
    model, tokenizer, info = student_for(cfg, examples, log)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return model, tokenizer, info


def heldout_set_tokens(teacher, spec: str | None) -> float:
    """Prompt + reference tokens of eval's held-out quality set (what the plan charges for it)."""
    if not spec:
        return 0.0
    from potstill.capture.prompts import load_prompts

    return float(sum(len(teacher.encode_chat(p.messages)) + len(teacher.tokenizer(p.reference)["input_ids"]) + 1
                     for p in load_prompts(spec) if p.reference))


def run_budgeted(path: str | Path, minutes: float, overrides: list[str] = (), run_dir: str | None = None,
                 log=print, cpu_clock: bool = False) -> dict[str, Any]:
    """`run_recipe` in `minutes` of wall-clock: measure this machine, size the stages (plan.py), keep to it.

    Fields given in `overrides` stay as given; the plan sizes the rest. A previous run's stage
    outputs in the run directory are replaced (a new plan means a new capture). The plan, each
    stage's estimate and its actual wall and CPU seconds go to run_dir/plan.json. With `cpu_clock` the
    budget, the rates and the deadlines are in CPU seconds of this process (`time.process_time`): the same
    work whatever else the machine runs (what `study budget` compares recipes on).
    """
    import shutil

    from potstill.capture.generate import generate
    from potstill.capture.prompts import dedupe, load_prompts
    from potstill.config import parse_override
    from potstill.evaluate import run_eval
    from potstill.plan import Deadline, Workload, format_plan, measure_rates, resize_train, size_plan
    from potstill.teachers.hf import HFTeacher, resolve_model_dir
    from potstill.train.loop import train
    from potstill.utils import cpu_info, quiet_transformers, write_json

    clock = time.process_time if cpu_clock else time.perf_counter
    t_start, c_start, k_start = time.perf_counter(), time.process_time(), clock()
    budget = minutes * 60.0
    data = load_recipe(path, overrides)
    pinned = {".".join(k): v for k, v in (parse_override(o) for o in overrides) if len(k) == 2}
    run = Path(run_dir or data.get("run_dir") or "runs/run")
    where = str(path)
    g = data.get("generate", {})
    if str(g.get("teacher", "embedded")).startswith(("http://", "https://")) or not g.get("prompts"):
        raise PotstillError("--minutes needs a local teacher and a prompts file (it measures the teacher)", where=where)
    for name, marker in (("capture", "manifest.json"), ("student", "provenance.json"), ("student-before", "config.json")):
        if (run / name / marker).exists():
            log(f"budgeted run: replacing the previous {run / name}")
            shutil.rmtree(run / name)
    run.mkdir(parents=True, exist_ok=True)

    quiet_transformers()
    gen0 = build(GenerateConfig, {**g, "out": str(run / "capture")}, f"{where}: generate")
    train0 = build(TrainConfig, {**data.get("train", {}), "capture": gen0.out, "out": str(run / "student"),
                                 "teacher": gen0.teacher}, f"{where}: train")
    eval0 = data.get("eval", {})
    prompts = dedupe(load_prompts(gen0.prompts))[0]
    teacher_dir = resolve_model_dir(gen0.teacher)  # a first run converts the embedded GGUF: not a load time
    t = clock()
    parts = {"setup_s": t - k_start}
    teacher = HFTeacher.load(gen0.teacher, dtype=gen0.dtype)
    load_s = parts["teacher_load_s"] = clock() - t
    ids = [teacher.encode_chat(p.messages) for p in prompts]
    refs = [len(teacher.tokenizer(p.reference, add_special_tokens=False)["input_ids"]) + 1 for p in prompts if p.reference]
    gen_batch = min(gen0.batch_size, 32)
    t = clock()
    rates = measure_rates(teacher, ids, gen_batch, train0.student, teacher_dir, load_s, top_k=gen0.top_k,
                          bf16=train0.bf16, clock=clock)
    parts["probes_s"] = clock() - t
    workload = Workload(
        prompts_available=min(len(prompts), gen0.max_prompts or len(prompts)), prompt_tokens=sum(map(len, ids)) / len(ids),
        reference_tokens=sum(refs) / len(refs) if refs else 0.0, heldout=gen0.heldout,
        max_new_tokens=gen0.max_new_tokens, gen_batch=gen_batch, train_batch=train0.batch_size,
        warmup_steps=train0.warmup_steps, calibration=train0.calibration,
        gen_prompts=eval0.get("gen_prompts", EvalConfig.gen_prompts), gen_tokens=eval0.get("gen_tokens", EvalConfig.gen_tokens),
        eval_models=3 if data.get("eval_before") else 2, pinned=pinned,
        heldout_set_tokens=heldout_set_tokens(teacher, eval0.get("heldout_prompts")),
        teacher_forcing=gen0.answers == "reference",
    )
    plan = {**size_plan(rates, workload, budget, spent_s=clock() - k_start), "cpu": cpu_info(),
            "clock": "cpu" if cpu_clock else "wall",
            "measure_parts_s": parts}
    log(format_plan(plan))
    ov = plan["overrides"]
    stage_data = {
        "generate": {**data.get("generate", {}), **ov["generate"], "shard_rows": ov["generate"]["batch_size"]},
        "train": {**data.get("train", {}), **ov["train"]},
        "eval": {**eval0, **ov["eval"]},
    }
    budgeted = {**data, **stage_data}
    with atomic_path(run / "recipe.budgeted.yaml") as tmp:
        tmp.write_text(yaml.safe_dump(budgeted, sort_keys=False))
    actual: dict[str, float] = {"measure": time.perf_counter() - t_start}
    cpu: dict[str, float] = {"measure": time.process_time() - c_start}
    est = {s["stage"]: s["est_s"] for s in plan["stages"]}
    record = {**plan, "actual_s": actual, "cpu_s": cpu}
    write_json(run / "plan.json", record)

    def timed(stage: str, fn):
        t, c = time.perf_counter(), time.process_time()
        out = fn()
        actual[stage], cpu[stage] = time.perf_counter() - t, time.process_time() - c
        write_json(run / "plan.json", record)
        return out

    gen = build(GenerateConfig, {**stage_data["generate"], "out": str(run / "capture")}, f"{where}: generate")
    gen_deadline = Deadline(est["generate"], clock=clock)
    per_row = est["generate"] / max(gen.max_prompts, 1)

    def gen_stop(next_rows: int, done: int) -> bool:
        return not gen_deadline.fits(next_rows * max(per_row, gen_deadline.elapsed() / max(done, 1)))

    manifest = timed("generate", lambda: generate(gen, teacher=teacher, log=log, should_stop=gen_stop))
    teacher = None  # its memory back before training
    train_cfg = build(TrainConfig, {**stage_data["train"], "capture": gen.out, "out": str(run / "student"),
                                    "teacher": gen.teacher}, f"{where}: train")
    built = (None, None, None)
    if data.get("eval_before"):
        built = timed("build student", lambda: build_and_save_before(train_cfg, run / "student-before", log))
    # training gets what is left before the eval's share, sized on the capture it got (unless pinned)
    left = budget * (1 - plan["margin"]) - (clock() - k_start) - est["eval"]
    resized = None if "train.max_steps" in pinned else resize_train(plan, manifest.get("counts", {}), left)
    if resized:
        train_cfg = dataclasses.replace(train_cfg, max_steps=resized["max_steps"])
        record["train_resized"] = resized
        log(f"train: {resized['planned_steps']} -> {resized['max_steps']} steps (the capture's "
            f"{resized['tokens_per_row']:.0f} tokens per row, {left:.0f}s left for training)")
    stop = Deadline(left, clock=clock).train_stop()
    summary = timed("train", lambda: train(train_cfg, log=log, model=built[0], tokenizer=built[1],
                                           student_info=built[2], on_step=stop))
    before = bool(data.get("eval_before"))
    students = ([str(run / "student-before")] if before else []) + [train_cfg.out]
    labels = (["student before"] if before else []) + ["student after"]
    eval_cfg = build(EvalConfig, {**stage_data["eval"], "capture": gen.out, "students": students, "labels": labels,
                                  "teacher": gen.teacher, "out": str(run)}, f"{where}: eval")
    result = timed("eval", lambda: run_eval(eval_cfg, log=log))
    actual["total"], cpu["total"] = time.perf_counter() - t_start, time.process_time() - c_start
    record["train_steps_done"] = summary.get("steps")
    record["capture_rows"] = manifest.get("counts", {}).get("rows")
    write_json(run / "plan.json", record)
    timings = {"generate_s": actual["generate"], "train_s": actual["train"] + actual.get("build student", 0.0),
               "eval_s": actual["eval"]}
    return {"eval": result, "timings": timings, "capture": manifest, "train": summary, "run_dir": str(run),
            "plan": record}
