"""`potstill detect`: load a suspect (open weights or a file of its generations) and test it.

Open-weights mode: the suspect is run on the answers we served (from the query log, `--log-db`),
or else under teacher forcing on assistant turns — the prompts'
reference answers where they have them, then the suspect's own sampled answers — and its argmax
prediction at each assistant position is scored against our green lists (prompt tokens are
excluded, each (context, token) pair counts once). A model distilled from our watermarked outputs
predicts green tokens more often than gamma; one that was not gives a uniform p-value.
Text-only mode scores the suspect's generations directly (JSONL with a `text`/`completion` field,
or plain text with one generation per paragraph).
"""

from __future__ import annotations

from pathlib import Path

from potstill.errors import PotstillError


def read_generations(path: Path) -> list[str]:
    from potstill.capture.prompts import jsonl_records

    if path.suffix == ".jsonl":
        texts = []
        for n, obj in jsonl_records(path, str(path)):
            text = next((obj[f] for f in ("text", "completion", "completion_text", "output") if f in obj), None)
            if not isinstance(text, str):
                raise PotstillError("no 'text'/'completion' string field", where=f"{path}:{n}")
            texts.append(text)
        return texts
    return [p.strip() for p in path.read_text().split("\n\n") if p.strip()]


def assistant_sequences(model, tokenizer, prompts, max_tokens: int, gen_tokens: int = 96, batch_size: int = 16):
    """(sequences, prompt_lengths): references first, then the suspect's own sampled answers."""
    from potstill.lm.engine import Engine
    from potstill.lm.types import SamplingParams

    engine = Engine(model, tokenizer, name="suspect")
    encoded = [engine.encode_chat(p.messages) for p in prompts]
    seqs, lens = [], []
    eos = tokenizer.eos_token_id
    for ids, p in zip(encoded, prompts, strict=True):
        if p.reference:
            answer = tokenizer(p.reference, add_special_tokens=False)["input_ids"]
            seqs.append(ids + answer + ([eos] if eos is not None else []))
            lens.append(len(ids))
    budget = sum(len(s) - n for s, n in zip(seqs, lens, strict=True))
    if budget < max_tokens:
        params = SamplingParams(max_new_tokens=gen_tokens, temperature=1.0, top_logprobs=0, seed=1234)
        outs = engine.complete_ids(encoded, params, batch_size=batch_size)
        for c in outs:
            seqs.append(c.prompt_ids + c.completion_ids)
            lens.append(len(c.prompt_ids))
    return seqs, lens


def served_sequences(log_db: str, tokenizer, key_id: str | None = None) -> tuple[list[list[int]], list[int]]:
    """(prompt + served answer) token sequences from the query log: the contexts a distiller trained on."""
    from potstill.guard.monitor import message_text
    from potstill.guard.querylog import read_log

    seqs, lens = [], []
    for row in read_log(log_db, key_id=key_id):
        if row.get("status") != 200 or not row.get("completion"):
            continue
        prompt = row["prompt"]
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a one-prompt batch
        try:  # a row the server answered but this tokenizer cannot take (odd roles, lone surrogates) is skipped
            if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
                messages = [{"role": "system" if m.get("role") == "developer" else str(m.get("role", "user")),
                             "content": message_text(m.get("content"))} for m in prompt]
                ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
                ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
            elif isinstance(prompt, str):
                ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            elif isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
                ids = list(prompt)
            else:
                continue
            served = row.get("completion_ids")
            answer = (list(served) if isinstance(served, list) and all(isinstance(t, int) for t in served)
                      else tokenizer(row["completion"], add_special_tokens=False)["input_ids"])
        except Exception:
            continue
        seqs.append(ids + answer)
        lens.append(len(ids))
    if not seqs:
        raise PotstillError("no served completions in the query log" + (f" for key {key_id}" if key_id else ""),
                            where=str(log_db))
    return seqs, lens


def run_detect(suspect: str, cfg, prompts: str = "builtin:seed_tasks", tokenizer: str = "embedded",
               max_tokens: int = 20000, log_db: str | None = None, key_id: str | None = None):
    """Detect our watermark in a suspect model dir or generations file. Returns a DetectResult.

    With `log_db`, open-weights mode scores the suspect on the answers we served (optionally one
    key's traffic): the contexts a distiller trained on, where its learned bias is strongest.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.capture.prompts import load_prompts
    from potstill.guard.detect import detect_generations, detect_model
    from potstill.lm.loading import resolve_model_dir

    path = Path(suspect)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise PotstillError("not a model directory (no config.json)", where=suspect)
        model = AutoModelForCausalLM.from_pretrained(path).eval()
        tok = AutoTokenizer.from_pretrained(path)
        if log_db:
            seqs, lens = served_sequences(log_db, tok, key_id)
        else:
            seqs, lens = assistant_sequences(model, tok, load_prompts(prompts), max_tokens)
        return detect_model(model, tok, seqs, cfg, max_tokens=max_tokens, prompt_lengths=lens)
    if path.is_file():
        tok = AutoTokenizer.from_pretrained(resolve_model_dir(tokenizer))
        return detect_generations(read_generations(path), tok, cfg, max_tokens=max_tokens)
    raise PotstillError("no such model directory or generations file", where=suspect)
