"""`potstill detect`: load a suspect (open weights or a file of its generations) and test it.

Open-weights mode: the suspect is run on the answers we served (from the query log, `--log-db`),
or else under teacher forcing on assistant turns — the prompts'
reference answers where they have them, then the suspect's own sampled answers — and at each
assistant position (prompt tokens excluded) its next-token distribution is scored against our
green lists: by default the green-mass statistic of guard/greenmass.py (its top-k probabilities,
calibrated on random keys; `--controls DIR` also scores reference models that never saw our
outputs under our key), or with `--statistic argmax` the older count of green argmax predictions
(each (context, token) pair once, exact binomial). A model distilled from our watermarked outputs,
even from the text alone, leans towards green tokens; one that was not gives a uniform p-value.
Text-only mode scores the suspect's generations directly (JSONL with a `text`/`completion` field,
or plain text with one generation per paragraph).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from potstill.config import GenerateConfig, derive, opt
from potstill.errors import PotstillError
from potstill.guard.greenmass_config import GreenMassConfig


@dataclass
class DetectConfig(GreenMassConfig):
    """`potstill detect` (the watermark's own settings are WatermarkConfig's; the statistic's, GreenMassConfig's)."""

    suspect: str | None = opt(None, "Suspect model directory (open weights) or a JSONL/text file of its generations.")
    prompts: str = derive(GenerateConfig, "prompts", "builtin:seed_tasks", "The suspect is scored on them (open weights).")
    tokenizer: str = opt("embedded", "Tokenizer for text-only mode.")
    log_db: str | None = opt(None, "Score on the answers we served (query log): the distiller's contexts.")
    key_id: str | None = opt(None, "With --log-db: only this API key's traffic.")
    max_tokens: int = opt(20000, "Stop after this many scored (context, token) pairs.")
    out: str | None = opt(None, "Write the result as JSON here.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.suspect:
            raise PotstillError("give --suspect (a model directory or a file of its generations)")
        if self.max_tokens < 1:
            raise PotstillError("max_tokens must be >= 1")


def read_texts(source: str, jsonl_field: str | None = None) -> str | list[str]:
    """The text of `source` (a file, or '-' for stdin); with `jsonl_field`, that field of each JSONL line."""
    import sys

    from potstill.utils import jsonl_objects

    try:
        raw = sys.stdin.read() if source == "-" else Path(source).read_text()
    except OSError as e:
        raise PotstillError(f"cannot read: {e.strerror}", where=source) from None
    if not jsonl_field:
        return raw
    texts = []
    for n, obj in jsonl_objects(raw, source):
        if not isinstance(obj, dict) or jsonl_field not in obj:
            raise PotstillError(f"no field {jsonl_field!r} in a JSON object", where=f"{source}:{n}")
        texts.append(str(obj[jsonl_field]))
    return texts


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


def load_model_dir(path: str | Path):
    """(model in eval mode, tokenizer) from a Hugging Face model directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if not (path / "config.json").exists():
        raise PotstillError("not a model directory (no config.json)", where=str(path))
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


def run_detect(suspect: str, cfg, prompts: str = DetectConfig.prompts, tokenizer: str = DetectConfig.tokenizer,
               max_tokens: int = DetectConfig.max_tokens, log_db: str | None = None, key_id: str | None = None, gm=None):
    """Detect our watermark in a suspect model dir or generations file.

    Returns a GreenMassResult (open weights, default statistic; its `controls` hold the reference
    models' results) or a DetectResult (`gm.statistic == "argmax"`, or a generations file).
    With `log_db`, open-weights mode scores the suspect on the answers we served (optionally one
    key's traffic): the contexts a distiller trained on, where its learned bias is strongest.
    """
    from potstill.guard.greenmass import GreenMassConfig

    gm = gm or GreenMassConfig()
    from transformers import AutoTokenizer

    from potstill.capture.prompts import load_prompts
    from potstill.guard.detect import detect_generations
    from potstill.guard.detect_keys import bonferroni, detect_model_keys
    from potstill.lm.loading import resolve_model_dir

    path = Path(suspect)
    if path.is_dir():
        model, tok = load_model_dir(path)
        if log_db:
            seqs, lens = served_sequences(log_db, tok, key_id)
        else:
            seqs, lens = assistant_sequences(model, tok, load_prompts(prompts), max_tokens)
        if gm.statistic == "argmax":
            return detect_model_keys(model, tok, seqs, cfg, max_tokens=max_tokens, prompt_lengths=lens)
        # every key a distilled model may carry (sampling key; decoy key of the served log-probs), Bonferroni
        return bonferroni([detect_with_controls(model, tok, seqs, lens, c, gm, max_tokens)
                           for c in cfg.detection_configs()])
    if path.is_file():
        tok = AutoTokenizer.from_pretrained(resolve_model_dir(tokenizer))
        return detect_generations(read_generations(path), tok, cfg, max_tokens=max_tokens)
    raise PotstillError("no such model directory or generations file", where=suspect)


def detect_with_controls(model, tok, seqs, lens, cfg, gm, max_positions: int):
    """The green-mass result for the suspect, with each of `gm.controls` (reference model dirs,
    same tokenizer) scored the same way under our key: each should give no evidence."""
    from potstill.guard.greenmass import score_table, suspect_table

    result = score_table(suspect_table(model, tok, seqs, cfg, gm.top_k, lens, max_positions), cfg, gm)
    for ref in gm.controls:
        ref_model, ref_tok = load_model_dir(ref)
        if len(ref_tok) != len(tok):
            raise PotstillError(f"control has a {len(ref_tok)}-token vocabulary, the suspect {len(tok)}", where=ref)
        res = score_table(suspect_table(ref_model, tok, seqs, cfg, gm.top_k, lens, max_positions), cfg, gm)
        result.controls.append({"model": ref, **{k: getattr(res, k) for k in
                                ("contexts", "z", "z_calibrated", "p_value", "p_rank", "green_mass")}})
    return result
