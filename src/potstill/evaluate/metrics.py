"""Measurements of one model against the teacher's capture: fidelity, reference NLL, size and speed.

- fidelity on a capture split: forward KL(teacher || model) over the stored top-k + tail bucket,
  top-1 agreement with the teacher's most likely token (positions with a stored entry), and the
  model's NLL of the teacher's completion tokens (per token, nats). The bucket KL is a LOWER
  bound on the token-level KL (merging ids into one bucket can only lower a KL: data processing),
  and how much lower depends on each capture's k and codec (the mass codec stores fewer entries),
  so KLs are comparable only between models measured on the same capture;
- NLL of reference answers (prompts that have an `output`/`reference`), per token, up to and
  including the chat template's end-of-turn token;
- parameters, size on disk, greedy generation tokens/s at a fixed number of new tokens per prompt
  (EOS ignored, batched, KV cache), so it measures speed and not how long a model's answers are;
  the same greedy tokens, cut at the first end-of-turn, are the answers scored for repetition
  (evaluate/heldout.py).
"""


from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from potstill.lm.tokens import chat_ids, pad_token_id
from potstill.train.data import collate, student_logits
from potstill.train.losses import forward_kl, stored_slots, student_bucket_logprobs, teacher_bucket_logprobs

#: One line for eval.md and the report: what the KL column measures.
KL_NOTE = ("KL(teacher‖model) is over each capture's stored top-k + one tail bucket: a lower bound on the "
           "token-level KL that depends on the capture's k and codec, so compare it only between models "
           "measured on the same capture.")


@torch.no_grad()
def fidelity(model, examples, pad_id: int, batch_size: int = 8) -> dict[str, float]:
    """KL(teacher||model), top-1 agreement and NLL of the teacher's tokens, averaged over tokens."""
    model.eval()
    kl = agree = nll = 0.0
    n = n_top = 0
    for s in range(0, len(examples), batch_size):
        batch = collate(examples[s : s + batch_size], pad_id)
        logits = student_logits(model, batch).float()
        if batch.topk_ids is not None:
            p = teacher_bucket_logprobs(batch.topk_logprobs, batch.tail_logprob)
            q = student_bucket_logprobs(logits, batch.topk_ids, valid=stored_slots(batch.topk_logprobs))
            kl += float(forward_kl(p, q).sum())
            has_top = stored_slots(batch.topk_logprobs)[:, 0]  # a row with no stored entry has padding id 0 there
            agree += float(((logits.argmax(-1) == batch.topk_ids[:, 0]) & has_top).sum())
            n_top += int(has_top.sum())
        nll += float(torch.nn.functional.cross_entropy(logits, batch.targets, reduction="sum"))
        n += batch.n_targets
    n = max(n, 1)
    out = {"nll_teacher_tokens": nll / n, "tokens": n}
    if examples and examples[0].topk_ids is not None:
        out.update({"kl": kl / n, "top1_agreement": agree / max(n_top, 1)})
    return out


def reference_examples(tokenizer, prompts, stop_ids: list[int], max_len: int = 1024) -> list:
    """Examples (prompt ids + answer ids) of the prompts' reference answers; the answer ends with the chat
    template's end-of-turn (`answer_ids`), the token a capture's completion ends with."""
    import numpy as np

    from potstill.capture.generate import answer_ids
    from potstill.train.data import Example

    examples = []
    for p in prompts:
        if not p.reference:
            continue
        prompt_ids = chat_ids(tokenizer, p.messages)
        ids = (prompt_ids + answer_ids(tokenizer, p.messages, p.reference, prompt_ids, stop_ids))[:max_len]
        if len(ids) > len(prompt_ids):
            examples.append(Example(np.asarray(ids, dtype=np.int64), len(prompt_ids), None, None, None))
    return examples


@torch.no_grad()
def reference_nll(model, tokenizer, prompts, batch_size: int = 8, max_len: int = 1024) -> dict[str, float] | None:
    """Per-token NLL of reference answers given their prompts (chat template, up to and including its
    end-of-turn token), or None if none have one."""
    from potstill.capture.generate import end_of_turn_ids

    stop = end_of_turn_ids(tokenizer, getattr(model, "generation_config", None))
    examples = reference_examples(tokenizer, prompts, stop, max_len)
    if not examples:
        return None
    pad = pad_token_id(tokenizer)
    res = fidelity(model, examples, pad, batch_size)
    return {"nll_reference": res["nll_teacher_tokens"], "reference_tokens": res["tokens"], "references": len(examples)}


def size_stats(model, model_dir: str | Path | None) -> dict[str, Any]:
    params = sum(p.numel() for p in model.parameters())
    size = None
    if model_dir is not None:
        size = sum(f.stat().st_size for f in Path(model_dir).glob("*.safetensors"))
    return {"params": params, "size_bytes": size, "layers": getattr(model.config, "num_hidden_layers", None)}


def generation_speed(model, tokenizer, prompts, n_prompts: int = 16, max_new_tokens: int = 64, batch_size: int = 8) -> dict:
    """Greedy batched decoding with the same engine as the teacher; completion tokens per second.

    Every prompt decodes exactly `max_new_tokens` tokens (EOS ignored), so models that write
    shorter or longer answers are timed on the same work.
    """
    from potstill.lm.engine import Engine
    from potstill.lm.types import SamplingParams

    engine = Engine(model, tokenizer, name="eval")
    stop = set(engine.eos_ids or [])
    engine.eos_ids = [-1]  # no token has id -1: nothing stops a row before max_new_tokens
    ids = [engine.encode_chat(p.messages) for p in prompts[:n_prompts]]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, top_logprobs=0)
    engine.complete_ids(ids[:1], SamplingParams(max_new_tokens=2, temperature=0.0, top_logprobs=0))  # warm-up
    t0 = time.perf_counter()
    done = engine.complete_ids(ids, params, batch_size=batch_size)
    seconds = time.perf_counter() - t0
    tokens = sum(len(c.completion_ids) for c in done)
    answers = [_until(c.completion_ids, stop) for c in done]
    return {"gen_tokens_per_s": tokens / seconds, "gen_tokens": tokens, "gen_prompts": len(ids),
            "gen_new_tokens_per_prompt": max_new_tokens, "gen_batch_size": batch_size, "_answers": answers}


def _until(ids: list[int], stop: set[int]) -> list[int]:
    """A greedy answer as the model would end it: up to its first end-of-turn/EOS token."""
    for i, t in enumerate(ids):
        if t in stop:
            return list(ids[:i])
    return list(ids)
