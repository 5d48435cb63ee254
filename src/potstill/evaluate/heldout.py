"""The held-out quality set: prompts from another source than the training prompts, with human answers.

    potstill eval ... --heldout-prompts builtin:heldout_v1

On each reference answer (the chat template's end-of-turn included) the teacher's top-k is taken
once by teacher forcing (`Engine.score_ids`, k = `TOP_K` + one tail bucket); every model is then
measured against it exactly as on a capture (`metrics.fidelity`): KL(teacher‖model) over the
buckets, top-1 agreement with the teacher's most likely token, and the model's NLL of the human
answer (its `heldout_nll_reference_kept` is exp(NLL teacher − NLL model), the share of the
teacher's reference likelihood it keeps).

How a model's own answers read: the greedy answers of eval's speed run (`metrics.generation_speed`,
on this set's first prompts when it is given, each cut at its first end-of-turn), scored for repetition: `loop_rate` is the share of generations in which some `LOOP_N`-gram occurs at
least `LOOP_TIMES` times; distinct-1/2 (unique n-grams / n-grams, within each generation, pooled)
are taken over the same number of tokens for every model compared (`equal_repetition`), since
distinct-n falls with length.
"""

from __future__ import annotations

import math
from collections import Counter
from typing import Any

TOP_K = 20
LOOP_N, LOOP_TIMES = 4, 3


def teacher_examples(model, tokenizer, prompts, k: int = TOP_K, batch_size: int = 8) -> list:
    """The reference answers as Examples carrying the teacher's top-k and tail (what `fidelity` reads)."""
    import numpy as np

    from potstill.capture.generate import end_of_turn_ids
    from potstill.evaluate.metrics import reference_examples
    from potstill.lm.engine import Engine
    from potstill.train.data import Example

    stop = end_of_turn_ids(tokenizer, getattr(model, "generation_config", None))
    refs = reference_examples(tokenizer, prompts, stop)
    engine = Engine(model, tokenizer, name="heldout")
    was_training = model.training
    model.eval()
    try:
        scored = engine.score_ids([list(e.input_ids[: e.prompt_len]) for e in refs],
                                  [list(e.input_ids[e.prompt_len:]) for e in refs], k=k, batch_size=batch_size)
    finally:
        model.train(was_training)
    out = []
    for e, c in zip(refs, scored, strict=True):
        mass = np.exp(c.topk_logprobs.astype(np.float64)).sum(-1)
        tail = np.log(np.clip(1.0 - mass, 1e-12, None)).astype(np.float32)
        out.append(Example(e.input_ids, e.prompt_len, c.topk_ids, c.topk_logprobs, tail))
    return out


def has_loop(ids: list[int], n: int = LOOP_N, times: int = LOOP_TIMES) -> bool:
    """Whether some n-gram occurs at least `times` times in `ids`."""
    counts = Counter(tuple(ids[i : i + n]) for i in range(len(ids) - n + 1))
    return bool(counts) and max(counts.values()) >= times


def distinct(gens: list[list[int]], n: int, tokens: int) -> float | None:
    """Unique n-grams / n-grams over the first `tokens` tokens of the generations taken in order
    (n-grams never cross two generations); None if there are none."""
    grams: list[tuple[int, ...]] = []
    left = tokens
    for g in gens:
        if left <= 0:
            break
        part = g[:left]
        left -= len(part)
        grams += [tuple(part[i : i + n]) for i in range(len(part) - n + 1)]
    return len(set(grams)) / len(grams) if grams else None


def repetition(gens: list[list[int]], tokens: int | None = None) -> dict[str, Any]:
    """loop_rate over all generations; distinct-1/2 over the first `tokens` tokens (default: all)."""
    total = sum(map(len, gens))
    tokens = total if tokens is None else min(tokens, total)
    return {"loop_rate": sum(map(has_loop, gens)) / len(gens) if gens else None,
            "distinct_1": distinct(gens, 1, tokens), "distinct_2": distinct(gens, 2, tokens),
            "distinct_tokens": tokens, "gen_answers": len(gens), "gen_answer_tokens": total}


def equal_repetition(all_gens: list[list[list[int]]]) -> list[dict[str, Any]]:
    """`repetition` of each model's generations, distinct-n over the token count of the shortest."""
    tokens = min((sum(map(len, g)) for g in all_gens), default=0)
    return [repetition(g, tokens) for g in all_gens]


def measure(model, tokenizer, examples, batch_size: int = 8) -> dict[str, Any]:
    """heldout_kl, heldout_top1_agreement and heldout_nll_reference of a model on `teacher_examples`."""
    from potstill.evaluate.metrics import fidelity
    from potstill.lm.tokens import pad_token_id

    was_training = model.training
    try:
        row = fidelity(model, examples, pad_token_id(tokenizer), batch_size)
    finally:
        model.train(was_training)
    return {"heldout_kl": row.get("kl"), "heldout_top1_agreement": row.get("top1_agreement"),
            "heldout_nll_reference": row["nll_teacher_tokens"], "heldout_tokens": row["tokens"],
            "heldout_answers": len(examples)}


def add_kept(rows: list[dict[str, Any]]) -> None:
    """Each row's share of the first row's (the teacher's) held-out reference likelihood."""
    t = rows[0].get("heldout_nll_reference") if rows else None
    for row in rows:
        s = row.get("heldout_nll_reference")
        if t is not None and s is not None:
            row["heldout_nll_reference_kept"] = math.exp(t - s)


COLUMNS = [
    ("heldout_top1_agreement", "held-out top-1 ↑", "{:.3f}"),
    ("heldout_kl", "held-out KL ↓", "{:.3f}"),
    ("heldout_nll_reference_kept", "held-out ref. lik. kept ↑", "{:.0%}"),
    ("loop_rate", "loop rate ↓", "{:.0%}"),
    ("distinct_2", "distinct-2 ↑", "{:.3f}"),
]

REPETITION_NOTE = (f"loop rate: share of the greedy answers (those of the speed run, each cut at its first end-of-turn) "
                   f"in which some {LOOP_N}-gram occurs {LOOP_TIMES} or more times; distinct-2: unique token bigrams / "
                   "bigrams over the same number of answer tokens for every row.")
HELDOUT_NOTE = ("held-out columns: the human-written answers of the held-out set (another source than the training "
                "prompts), teacher top-20 + tail bucket by teacher forcing; ref. lik. kept = exp(NLL teacher − NLL model).")
