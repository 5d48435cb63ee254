"""Multiple-choice tasks scored by log-likelihood, the same way lm-evaluation-harness scores them.

    potstill eval --capture runs/cap --students runs/student --tasks builtin:potstill_mc
    potstill eval-harness-task --out runs/harness        # then: lm_eval --tasks potstill_mc --include_path runs/harness

Task file: JSONL, one item per line: `{"question": str, "choices": [str, ...], "answer": int | str}`
(`answer` is the index of the right choice, or the choice's text), optional `id`. A bad line is one
PotstillError naming `file:line` and the field. `builtin:potstill_mc` is the 100-item set shipped in
potstill/data (written for potstill, Apache-2.0).

Prompt format (plain text, no chat template, so lm-eval reproduces it exactly):
context `"Question: {question}\\nAnswer:"`, continuation `" " + choice`. Each choice is scored as the
sum of the log-probs of its continuation tokens given the context. Tokenisation follows lm-eval's
HF model: encode context + continuation together, encode the context alone, and the continuation is
the tokens past the context's length (both with the tokenizer's default special tokens).
- acc: the choice with the highest summed log-prob is right;
- acc_norm: the same after dividing each sum by the choice's length in characters (lm-eval's acc_norm).
Ties go to the first choice, as with numpy's argmax in lm-eval.

Kept quality (eval.json / eval.md, each student against the teacher's row):
- `<task>/kept` = student acc / teacher acc;
- `nll_reference_kept` = exp(teacher NLL − student NLL) per reference token = teacher perplexity /
  student perplexity: the share of the teacher's (geometric-mean) per-token probability of the
  reference answers that the student keeps. 100% = as good as the teacher; above 100% = better.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from potstill.errors import PotstillError
from potstill.lm.tokens import pad_token_id

BUILTIN_TASKS = {"potstill_mc": "potstill_mc.jsonl"}
CONTEXT_TEMPLATE = "Question: {question}\nAnswer:"
CHOICE_DELIMITER = " "  # lm-eval's default target_delimiter, put before every choice


@dataclass
class MCItem:
    id: str
    question: str
    choices: list[str]
    answer: int
    where: str  # "file:line"


@dataclass
class MCTask:
    name: str
    source: str
    items: list[MCItem]

    def sha256(self) -> str:
        blob = json.dumps([[i.question, i.choices, i.answer] for i in self.items], ensure_ascii=False)
        return hashlib.sha256(blob.encode()).hexdigest()


def mc_context(question: str) -> str:
    return CONTEXT_TEMPLATE.format(question=question)


def _task_file(spec: str) -> tuple[str, Path]:
    if spec.startswith("builtin:"):
        key = spec.split(":", 1)[1]
        if key not in BUILTIN_TASKS:
            raise PotstillError(f"no built-in task {key!r}; choose one of {', '.join(BUILTIN_TASKS)}")
        return key, Path(str(resources.files("potstill") / "data" / BUILTIN_TASKS[key]))
    path = Path(spec)
    if not path.is_file():
        raise PotstillError("no such task file", where=spec)
    return path.stem, path


def _item(record: Any, n: int, where: str) -> MCItem:
    if not isinstance(record, dict):
        raise PotstillError("expected a JSON object", where=where)

    def bad(field: str, why: str) -> PotstillError:
        return PotstillError(f"field '{field}' {why}", where=where)

    question = record.get("question")
    if not isinstance(question, str) or not question.strip():
        raise bad("question", "missing or not a non-empty string")
    choices = record.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        raise bad("choices", "missing or not a list of at least 2 strings")
    if not all(isinstance(c, str) and c.strip() for c in choices):
        raise bad("choices", "must hold only non-empty strings")
    # stripped here so potstill and the lm-eval copy of the items see the very same text
    choices = [c.strip() for c in choices]
    if len(set(choices)) != len(choices):
        raise bad("choices", "has duplicates")
    answer = record.get("answer")
    if isinstance(answer, bool) or not isinstance(answer, int | str):
        raise bad("answer", "missing or not an index or a choice string")
    if isinstance(answer, str):
        if answer.strip() not in choices:
            raise bad("answer", f"{answer!r} is not one of the choices")
        answer = choices.index(answer.strip())
    elif not 0 <= answer < len(choices):
        raise bad("answer", f"index {answer} out of range for {len(choices)} choices")
    item_id = record.get("id", f"{n}")
    if not isinstance(item_id, str | int):
        raise bad("id", "must be a string or an integer")
    return MCItem(str(item_id), question.strip(), choices, answer, where)


def load_mc_task(spec: str) -> MCTask:
    """A task from a JSONL file or `builtin:<name>`; every item validated (file:line: field on error)."""
    from potstill.capture.prompts import jsonl_records

    name, file = _task_file(spec)
    items = [_item(record, n, f"{spec}:{n}") for n, record in jsonl_records(file, spec)]
    if not items:
        raise PotstillError("no items", where=spec)
    seen: set[str] = set()
    for item in items:
        if item.id in seen:
            raise PotstillError(f"field 'id' {item.id!r} repeats an earlier item", where=item.where)
        seen.add(item.id)
    return MCTask(name, spec, items)


def load_mc_tasks(specs: list[str] | str) -> list[MCTask]:
    if isinstance(specs, str):  # `tasks: builtin:potstill_mc` in a YAML recipe
        specs = [specs]
    tasks = [load_mc_task(s) for s in specs]
    names = [t.name for t in tasks]
    for t in tasks:
        if names.count(t.name) > 1:
            raise PotstillError(f"two tasks are both named {t.name!r} (names come from the file stems)")
    return tasks


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) exactly as lm-eval's causal HF model splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # a trailing space belongs to the continuation (word-boundary tokenisation)
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def continuation_logprobs(model, tokenizer, pairs: list[tuple[str, str]], batch_size: int = 8) -> list[float]:
    """Sum log p(continuation | context) for each (context, continuation): batched, right-padded."""
    import numpy as np
    import torch

    from potstill.train.data import Example, collate, student_logits

    max_len = getattr(model.config, "max_position_embeddings", None) or 2048
    examples = []
    for context, continuation in pairs:
        ctx, cont = encode_pair(tokenizer, context, continuation)
        if not cont:
            raise PotstillError(f"continuation {continuation!r} encodes to no tokens after {context!r}")
        ids = (ctx + cont)[-(max_len + 1) :]  # lm-eval truncates the context on the left, too
        examples.append(Example(np.asarray(ids, dtype=np.int64), max(len(ids) - len(cont), 1), None, None, None))
    pad = pad_token_id(tokenizer)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))  # little padding per batch
    sums = [0.0] * len(examples)
    model.eval()
    with torch.no_grad():
        for s in range(0, len(order), batch_size):
            idx = order[s : s + batch_size]
            batch = collate([examples[i] for i in idx], pad)
            logp = torch.log_softmax(student_logits(model, batch).float(), dim=-1)
            token_lp = logp.gather(1, batch.targets[:, None])[:, 0]
            per_row = torch.zeros(len(idx), dtype=torch.float64).index_add_(0, batch.rows, token_lp.double())
            for j, i in enumerate(idx):
                sums[i] = float(per_row[j])
    return sums


def score_mc(model, tokenizer, task: MCTask, batch_size: int = 8) -> dict[str, Any]:
    """acc and acc_norm on a task, plus each item's choice log-likelihoods and predictions."""
    import numpy as np

    pairs = [(mc_context(it.question), CHOICE_DELIMITER + c) for it in task.items for c in it.choices]
    flat = continuation_logprobs(model, tokenizer, pairs, batch_size)
    per_item, acc, acc_norm, k = [], 0, 0, 0
    for it in task.items:
        lls = np.array(flat[k : k + len(it.choices)])
        k += len(it.choices)
        pred = int(np.argmax(lls))
        pred_norm = int(np.argmax(lls / np.array([float(len(c)) for c in it.choices])))
        acc += pred == it.answer
        acc_norm += pred_norm == it.answer
        per_item.append({"id": it.id, "lls": lls.tolist(), "pred": pred, "pred_norm": pred_norm, "answer": it.answer})
    n = len(task.items)
    return {"acc": acc / n, "acc_norm": acc_norm / n, "n": n, "items": per_item}


def task_metrics(model, tokenizer, tasks: list[MCTask], batch_size: int = 8) -> dict[str, Any]:
    """Flat row entries `<task>/acc`, `<task>/acc_norm` for an eval row."""
    row: dict[str, Any] = {}
    for task in tasks:
        res = score_mc(model, tokenizer, task, batch_size)
        row[f"{task.name}/acc"] = res["acc"]
        row[f"{task.name}/acc_norm"] = res["acc_norm"]
    return row


def add_kept(rows: list[dict[str, Any]], tasks: list[MCTask]) -> None:
    """Each row's share of the first row's (the teacher's) task accuracy and reference likelihood."""
    if not rows:
        return
    teacher = rows[0]
    for row in rows:
        for task in tasks:
            for metric, key in (("acc", "kept"), ("acc_norm", "kept_norm")):
                t, s = teacher.get(f"{task.name}/{metric}"), row.get(f"{task.name}/{metric}")
                row[f"{task.name}/{key}"] = s / t if t and s is not None else None
        t, s = teacher.get("nll_reference"), row.get("nll_reference")
        if t is not None and s is not None:
            row["nll_reference_kept"] = math.exp(t - s)  # teacher perplexity / student perplexity


def task_columns(rows: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """Table columns (key, label, format) for the task and kept entries present in the rows."""
    cols: list[tuple[str, str, str]] = []
    names = [k[: -len("/acc")] for k in (rows[0] if rows else {}) if k.endswith("/acc")]
    for name in names:
        cols += [
            (f"{name}/acc", f"{name} acc ↑", "{:.3f}"),
            (f"{name}/acc_norm", f"{name} acc_norm ↑", "{:.3f}"),
            (f"{name}/kept", f"{name} kept", "{:.0%}"),
        ]
    if any(r.get("nll_reference_kept") is not None for r in rows):
        cols.append(("nll_reference_kept", "ref. likelihood kept", "{:.0%}"))
    return cols


def describe(tasks: list[MCTask]) -> dict[str, Any]:
    return {
        t.name: {"source": t.source, "items": len(t.items), "sha256": t.sha256(),
                 "context": CONTEXT_TEMPLATE, "continuation": CHOICE_DELIMITER + "{choice}"}
        for t in tasks
    }


def write_harness_task(out_dir: str | Path, spec: str = "builtin:potstill_mc", name: str | None = None) -> Path:
    """An lm-evaluation-harness task (YAML + the validated items as JSONL, absolute path) in out_dir.

    `lm_eval --model hf --model_args pretrained=DIR --tasks NAME --include_path OUT_DIR` then scores
    the same items with the same context/continuation strings as `potstill eval --tasks SPEC`.
    """
    import yaml

    from potstill.utils import atomic_path

    task = load_mc_task(spec)
    name = name or task.name
    out = Path(out_dir).resolve()
    data = out / f"{name}.jsonl"
    with atomic_path(data) as tmp:
        tmp.write_text("".join(
            json.dumps({"id": i.id, "question": i.question, "choices": i.choices, "answer": i.answer},
                       ensure_ascii=False) + "\n" for i in task.items))
    config = {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data)}},
        "test_split": "test",
        "output_type": "multiple_choice",
        "doc_to_text": CONTEXT_TEMPLATE.replace("{question}", "{{question}}"),
        "doc_to_choice": "choices",
        "doc_to_target": "answer",
        "target_delimiter": CHOICE_DELIMITER,
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
        "metadata": {"version": 1.0, "potstill_source": spec, "sha256": task.sha256()},
    }
    path = out / f"{name}.yaml"
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(config, sort_keys=False, allow_unicode=True))
    return path
