"""Per-prompt examples for `potstill report`: the teacher's captured answer next to each student's.

For held-out capture rows, each student is run teacher-forced on the teacher's completion (the same
batches and learned positions as training and eval: train/data.py `collate` + `student_logits`), so
every teacher token gets the student's probability of it and whether it is the student's top-1.
Each student also answers the prompt itself (greedy, the teacher's decoding engine).
"""

from __future__ import annotations

import codecs
from typing import Any

import numpy as np
import torch

from potstill.errors import PotstillError
from potstill.lm.tokens import pad_token_id
from potstill.utils import bytes_to_unicode


def token_pieces(tokenizer, ids) -> list[str]:
    """The text of each token, so that the pieces join to the decoded text.

    Byte-level BPE tokens can split a UTF-8 character; its text goes to the token that completes it.
    Tokenizers that are not byte-level fall back to decoding each token alone. Special tokens (the
    EOS a capture keeps at the end of a stopped completion) get an empty piece, as the text has none.
    """
    ids = [int(i) for i in ids]
    special = set(tokenizer.all_special_ids)
    return [p if i not in special else "" for i, p in zip(ids, _pieces(tokenizer, ids), strict=True)]


def _pieces(tokenizer, ids: list[int]) -> list[str]:
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    tokens = tokenizer.convert_ids_to_tokens(ids)
    if all(t is not None and all(ch in byte_of for ch in t) for t in tokens):
        dec = codecs.getincrementaldecoder("utf-8")(errors="replace")
        pieces = [dec.decode(bytes(byte_of[ch] for ch in t)) for t in tokens]
        pieces[-1:] = [pieces[-1] + dec.decode(b"", final=True)] if pieces else []
        whole = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if "".join(pieces) == whole:
            return pieces
    return [tokenizer.decode([i], skip_special_tokens=False, clean_up_tokenization_spaces=False) for i in ids]


@torch.no_grad()
def teacher_forced(model, rows: list[dict[str, Any]], pad_id: int, batch_size: int = 8) -> list[dict[str, np.ndarray]]:
    """For each row: the model's probability of each teacher completion token and its argmax there."""
    from potstill.train.data import Example, collate, student_logits

    model.eval()
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s : s + batch_size]
        examples = [Example(np.concatenate([r["prompt_ids"], r["completion_ids"]]), len(r["prompt_ids"]),
                            None, None, None) for r in chunk]
        batch = collate(examples, pad_id)
        logprobs = torch.log_softmax(student_logits(model, batch).float(), dim=-1)
        prob = logprobs.gather(1, batch.targets[:, None])[:, 0].exp()
        argmax = logprobs.argmax(-1)
        for b in range(len(chunk)):
            sel = batch.rows == b  # positions are flattened row after row, in order
            out.append({"prob": prob[sel].numpy(), "argmax": argmax[sel].numpy()})
    return out


def pick_rows(capture, n: int, split: str) -> list[dict[str, Any]]:
    """The first n rows of `split` with a completion (any split when that one has none)."""
    cols = ["id", "prompt", "reference", "split", "prompt_ids", "completion_ids", "completion_text",
            "finish_reason", "sampled_logprob", "topk"]
    rows = [r for r in capture.rows(split=split, columns=cols) if len(r["completion_ids"])][:n]
    if not rows:
        rows = [r for r in capture.rows(columns=cols) if len(r["completion_ids"])][:n]
    return rows


def student_answers(model, tokenizer, prompt_ids: list[list[int]], max_new_tokens: int) -> list[str]:
    from potstill.lm.engine import Engine
    from potstill.lm.types import SamplingParams

    engine = Engine(model, tokenizer, name="student")
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, top_logprobs=0)
    return [c.text for c in engine.complete_ids(prompt_ids, params, batch_size=8)]


def run_examples(run, n: int, max_new_tokens: int, split: str = "heldout", log=print) -> dict[str, Any]:
    """Examples of one run: rows with the teacher's answer and, per student, its answer and token view."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.capture.store import Capture
    from potstill.train.loop import check_tokenizer

    if run.capture is None or n <= 0:
        return {"rows": [], "students": [], "notes": []}
    capture = Capture.open(run.capture, allow_incomplete=True)
    rows = pick_rows(capture, n, split)
    notes: list[str] = []
    if rows and rows[0]["split"] != split:
        notes.append(f"the capture has no '{split}' rows; examples come from '{rows[0]['split']}'")
    tokenizer = None
    students = []
    for st in run.students:
        if st.path is None or not (st.path / "config.json").exists():
            notes.append(f"{st.label}: model directory not found; no examples")
            continue
        tok = AutoTokenizer.from_pretrained(st.path)
        try:
            check_tokenizer(capture.manifest, tok, str(run.capture))
        except PotstillError:
            notes.append(f"{st.label}: tokenizer differs from the teacher's; cannot score the teacher's tokens")
            continue
        tokenizer = tokenizer or tok
        model = AutoModelForCausalLM.from_pretrained(st.path, dtype=torch.float32)
        pad = pad_token_id(tok)
        forced = teacher_forced(model, rows, pad)
        answers = student_answers(model, tok, [r["prompt_ids"].tolist() for r in rows], max_new_tokens)
        del model
        per_row = []
        for r, f, a in zip(rows, forced, answers, strict=True):
            top1 = f["argmax"] == r["completion_ids"]
            agree = None if r["topk"] is None else f["argmax"] == r["topk"].ids[:, 0]
            per_row.append({"answer": a, "prob": f["prob"].tolist(), "top1": top1.tolist(),
                            "agree_teacher_top1": None if agree is None else agree.tolist()})
        students.append({"label": st.label, "rows": per_row})
        log(f"report: {run.name}: {st.label}: {len(rows)} examples")
    if tokenizer is None and rows:
        tokenizer = _teacher_tokenizer(run)
    out_rows = []
    for r in rows:
        sampled = r["sampled_logprob"]
        out_rows.append({
            "id": r["id"], "split": r["split"], "prompt": r["prompt"], "reference": r["reference"],
            "teacher_text": r["completion_text"], "finish_reason": r["finish_reason"],
            "pieces": token_pieces(tokenizer, r["completion_ids"]) if tokenizer is not None else [],
            "teacher_prob": None if sampled is None else np.exp(sampled.astype(np.float64)).tolist(),
        })
    return {"rows": out_rows, "students": students, "notes": notes}


def _teacher_tokenizer(run):
    """No usable student: the teacher's tokenizer (if it can be found) still splits its answers into tokens."""
    from transformers import AutoTokenizer

    from potstill.lm.loading import resolve_model_dir

    specs = [(st.provenance or {}).get("train_config", {}).get("teacher") for st in run.students]
    specs.append(((run.eval or {}).get("config") or {}).get("teacher"))
    for spec in filter(None, specs):
        try:
            return AutoTokenizer.from_pretrained(resolve_model_dir(spec))
        except (PotstillError, OSError, ValueError):
            continue
    return None
