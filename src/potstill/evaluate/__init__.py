"""Evaluation: the teacher and each student measured on the same capture split and prompts.

    potstill eval --capture runs/capture --students runs/student --out runs/eval

Writes eval.json (every number) and eval.md (the table).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from potstill.config import EvalConfig
from potstill.evaluate.heldout import COLUMNS as HELDOUT_COLUMNS
from potstill.evaluate.heldout import add_kept as add_heldout_kept
from potstill.evaluate.heldout import equal_repetition
from potstill.evaluate.tasks import task_columns
from potstill.lm.tokens import pad_token_id
from potstill.utils import atomic_path, quiet_transformers, write_json

COLUMNS = [
    ("kl", "KL(teacher‖model) ↓", "{:.4f}"),
    ("top1_agreement", "top-1 agree ↑", "{:.3f}"),
    ("nll_teacher_tokens", "NLL teacher text ↓", "{:.3f}"),
    ("nll_reference", "NLL references ↓", "{:.3f}"),
    *HELDOUT_COLUMNS,
    ("params", "params", "{:,}"),
    ("size_bytes", "size MB", None),
    ("gen_tokens_per_s", "gen tok/s", "{:.1f}"),
]


def evaluate_model(model, tokenizer, model_dir, examples, prompts, cfg: EvalConfig, name: str, tasks=(),
                   heldout=None) -> dict[str, Any]:
    """One row: fidelity on the capture, reference NLL, size, tasks, the held-out set (`heldout`:
    (teacher examples, prompts) or None), generation speed and the greedy answers' repetition."""
    from potstill.evaluate import heldout as ho
    from potstill.evaluate.metrics import fidelity, generation_speed, reference_nll, size_stats
    from potstill.evaluate.tasks import task_metrics

    pad = pad_token_id(tokenizer)
    row: dict[str, Any] = {"model": name}
    row.update(fidelity(model, examples, pad, cfg.batch_size))
    row.update(reference_nll(model, tokenizer, prompts, cfg.batch_size) or {})
    row.update(size_stats(model, model_dir))
    row.update(task_metrics(model, tokenizer, list(tasks), cfg.batch_size))
    if heldout is not None:
        row.update(ho.measure(model, tokenizer, heldout[0], cfg.batch_size))
    import torch

    # speed last, in the dtype the engine serves with (bf16 where the CPU has it): a fair race for every row
    from potstill.lm.loading import pick_dtype

    model.to(pick_dtype("auto"))
    gen_prompts = heldout[1] if heldout is not None else prompts
    row.update(generation_speed(model, tokenizer, gen_prompts, cfg.gen_prompts, cfg.gen_tokens, cfg.batch_size))
    model.to(torch.float32)
    return row


def load_eval_inputs(cfg: EvalConfig):
    """Held-out examples from the capture, and the prompts (with references) they came from."""
    from potstill.capture.prompts import Prompt, load_prompts
    from potstill.capture.store import Capture
    from potstill.train.data import examples_from_capture

    capture = Capture.open(cfg.capture)
    examples = examples_from_capture(capture, split=cfg.split, max_seq_len=4096)
    if cfg.max_rows:
        examples = examples[: cfg.max_rows]
    prompts = [
        Prompt(row["prompt"], row.get("reference"), f"{cfg.capture}:{row['id']}")
        for row in capture.rows(split=cfg.split, columns=["id", "prompt", "reference", "split"])
    ]
    if cfg.max_rows:
        prompts = prompts[: cfg.max_rows]
    if cfg.prompts:
        prompts += load_prompts(cfg.prompts)
    return capture, examples, prompts


def run_eval(cfg: EvalConfig, log=print, teacher_model=None, teacher_tokenizer=None) -> dict[str, Any]:
    """Teacher + each student on the held-out split; writes eval.json and eval.md atomically."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.evaluate.tasks import add_kept, describe, load_mc_tasks
    from potstill.lm.loading import resolve_model_dir

    torch.manual_seed(0)
    tasks = load_mc_tasks(cfg.tasks)  # before any model loads: a bad task file fails fast
    capture, examples, prompts = load_eval_inputs(cfg)
    quiet_transformers()
    log(f"eval: {len(examples)} held-out completions, {sum(1 for p in prompts if p.reference)} reference answers")
    rows = []
    teacher_dir = resolve_model_dir(cfg.teacher) if teacher_model is None else None
    if teacher_model is None:
        teacher_model = AutoModelForCausalLM.from_pretrained(teacher_dir)
        teacher_tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    heldout = None
    if cfg.heldout_prompts:
        from potstill.capture.prompts import load_prompts
        from potstill.evaluate.heldout import teacher_examples

        ho_prompts = load_prompts(cfg.heldout_prompts)
        heldout = (teacher_examples(teacher_model, teacher_tokenizer, ho_prompts, batch_size=cfg.batch_size), ho_prompts)
        log(f"eval: held-out set {cfg.heldout_prompts}: {len(heldout[0])} reference answers")
    rows.append(evaluate_model(teacher_model, teacher_tokenizer, teacher_dir, examples, prompts, cfg, "teacher", tasks,
                               heldout))
    log(f"eval: teacher done ({rows[-1]['gen_tokens_per_s']:.0f} gen tok/s)")
    labels = cfg.labels or [Path(s).name for s in cfg.students]
    for path, label in zip(cfg.students, labels, strict=False):
        model = AutoModelForCausalLM.from_pretrained(path)
        tok = AutoTokenizer.from_pretrained(path)
        rows.append(evaluate_model(model, tok, path, examples, prompts, cfg, label, tasks, heldout))
        log(f"eval: {label} done")
    add_kept(rows, tasks)
    add_heldout_kept(rows)
    for row, rep in zip(rows, equal_repetition([r.pop("_answers", []) for r in rows]), strict=True):
        row.update(rep)
    result = {"capture": cfg.capture, "split": cfg.split, "rows": rows, "config": cfg.__dict__, "tasks": describe(tasks)}
    out = Path(cfg.out)
    write_json(out / "eval.json", result)
    with atomic_path(out / "eval.md") as tmp:
        tmp.write_text(markdown_table(rows) + "\n\n" + notes(rows) + "\n")
    return result


def _fmt(key: str, fmt: str | None, value) -> str:
    if value is None:
        return "–"
    if key == "size_bytes":
        return f"{value / 1e6:.1f}"
    return fmt.format(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    from potstill import present

    headers, body = _cells(rows)
    return present.markdown_table(headers, body, align="l" + "r" * (len(headers) - 1))


def _cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Headers and formatted cells of the comparison table (columns no row has are left out)."""
    cols = [c for c in COLUMNS + task_columns(rows) if any(r.get(c[0]) is not None for r in rows)]
    return ["model", *(c[1] for c in cols)], [[r["model"], *(_fmt(k, f, r.get(k)) for k, _, f in cols)] for r in rows]


def notes(rows: list[dict[str, Any]]) -> str:
    """What the KL and gen tok/s columns measure (written under the table in eval.md)."""
    from potstill.evaluate.heldout import HELDOUT_NOTE, REPETITION_NOTE
    from potstill.evaluate.metrics import KL_NOTE

    lines = [f"- {KL_NOTE}"]
    speed = next((r for r in rows if r.get("gen_new_tokens_per_prompt")), None)
    if speed:
        lines.append(f"- gen tok/s: greedy, {speed['gen_prompts']} prompts x {speed['gen_new_tokens_per_prompt']} new "
                     f"tokens each (EOS ignored), batches of {speed['gen_batch_size']}.")
    if any(r.get("loop_rate") is not None for r in rows):
        lines.append(f"- {REPETITION_NOTE}")
    if any(r.get("heldout_top1_agreement") is not None for r in rows):
        lines.append(f"- {HELDOUT_NOTE}")
    return "\n".join(lines)


def rich_table(rows: list[dict[str, Any]], title: str = ""):
    from potstill import present

    headers, body = _cells(rows)
    return present.rich_table(headers, body, title=title)


def load_eval(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
