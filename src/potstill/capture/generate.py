"""`potstill generate`: prompts -> teacher -> capture (Parquet shards + manifest), resumable.

Prompts come from a file (see prompts.py) or from the teacher itself (`--self-instruct N`,
Magpie-style: the teacher is given only its chat template's user prefix and writes the user turn).
Rows are generated in length-sorted batches; each completion samples from a generator seeded by
its row id, so a resumed run (after kill -9) produces the rows an uninterrupted run would, and
skips the ids already in complete shards.
"""

from __future__ import annotations

import time
from typing import Any

from potstill.config import GenerateConfig
from potstill.errors import PotstillError
from potstill.lm.tokens import chat_ids
from potstill.lm.types import SamplingParams
from potstill.utils import quiet_transformers


def progress_bar(total: int, description: str):
    """A rich progress bar with rate and ETA (prints plainly when not on a terminal)."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    return Progress(
        TextColumn(f"[bold]{description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
    )


def self_instruct_prompts(teacher, n: int, seed: int, max_new_tokens: int = 64, batch_size: int = 16) -> list:
    """Magpie-style prompts: sample user turns from the chat template's user prefix, de-duplicated."""
    from potstill.capture.prompts import Prompt, dedupe
    from potstill.lm.tokens import row_seed

    tok = teacher.tokenizer
    marker = "\x00POTSTILL\x00"
    rendered = tok.apply_chat_template([{"role": "user", "content": marker}], tokenize=False)
    prefix = rendered[: rendered.index(marker)]
    prefix_ids = tok(prefix, add_special_tokens=False)["input_ids"]
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_p=0.98, top_logprobs=0, seed=seed)
    prompts: list = []
    attempt = 0
    while len(prompts) < n and attempt < 4:
        need = (n - len(prompts)) * 2 if attempt else int(n * 1.3) + 1
        seeds = [row_seed(seed, f"magpie-{attempt}-{i}") for i in range(need)]
        texts = []
        for s in range(0, need, batch_size):
            outs = teacher.complete_ids([prefix_ids] * len(seeds[s : s + batch_size]), params, seeds[s : s + batch_size])
            # a user turn cut at max_new_tokens is still a usable prompt; empty or tiny ones are not
            texts += [o.text.strip() for o in outs if len(o.text.strip()) >= 8]
        prompts = dedupe(prompts + [Prompt([{"role": "user", "content": t}], None, "self-instruct") for t in texts])[0]
        attempt += 1
    return prompts[:n]


def generate(cfg: GenerateConfig, teacher=None, log=print, should_stop=None) -> dict[str, Any]:
    """Run a capture. Returns the final manifest.

    `should_stop(next_rows, rows_done)`, if given, is asked before each window of `shard_rows` rows
    (never before the first); True ends the capture there, cleanly: the manifest's `prompts` then
    describe the prompts actually captured (count, sha256) and say how many were planned.
    """
    from potstill.capture.codec import get_codec
    from potstill.capture.prompts import assign_split, dedupe, load_prompts, prompts_hash
    from potstill.capture.store import CaptureWriter, row_id
    from potstill.lm.loading import resolve_model_dir
    from potstill.lm.tokens import row_seed
    from potstill.teachers import load_teacher

    prompts = load_prompts(cfg.prompts) if cfg.prompts else None  # bad input fails before the teacher loads
    quiet_transformers()
    if teacher is None:
        if cfg.teacher.startswith(("http://", "https://")):
            tokenizer = str(resolve_model_dir(cfg.tokenizer)) if cfg.tokenizer else None
            kwargs: dict[str, Any] = {"model": cfg.model, "tokenizer": tokenizer, **cfg.http_teacher_kwargs()}
        else:  # int8 quantises a float32 model: 'auto' then means float32
            kwargs = {"dtype": "float32" if cfg.quantize == "int8" and cfg.dtype == "auto" else cfg.dtype}
        teacher = load_teacher(cfg.teacher, **kwargs)

    if prompts is not None:
        source = cfg.prompts
    else:
        if not teacher.local_ids:
            raise PotstillError("--self-instruct needs a local teacher (it samples from the chat template)")
        log(f"self-instruct: the teacher writes {cfg.self_instruct} prompts")
        prompts = self_instruct_prompts(teacher, cfg.self_instruct, cfg.seed)
        source = f"self-instruct:{cfg.self_instruct}"
    prompts, n_exact, n_near = dedupe(prompts)
    if n_exact or n_near:
        log(f"prompts: dropped {n_exact} exact and {n_near} near duplicates")
    if cfg.max_prompts:
        prompts = prompts[: cfg.max_prompts]
    if not prompts:
        raise PotstillError("no prompts to generate from", where=source)
    splits = assign_split(prompts, cfg.heldout, cfg.seed)

    params = SamplingParams(
        max_new_tokens=cfg.max_new_tokens,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        top_logprobs=cfg.top_k,
        seed=cfg.seed,
    )
    scoring = cfg.answers == "reference"
    if scoring:
        if not teacher.can_score:
            raise PotstillError("--answers reference needs a local teacher (HTTP teachers cannot teacher-force)")
        missing = [p for p in prompts if not p.reference]
        if missing:
            raise PotstillError(
                f"--answers reference: {len(missing)} of {len(prompts)} prompts have no reference answer "
                f"(field 'output', 'reference' or a final assistant message)",
                where=missing[0].where,
            )
    processor = None
    if cfg.antidistill_config() is not None:  # the tilt is a sampler: refused where nothing is sampled locally
        if scoring or not teacher.local_ids:
            raise PotstillError("--antidistill needs a local teacher that samples (not --answers reference or HTTP)")
        from potstill.guard.antidistill import AntidistillProcessor

        processor = AntidistillProcessor.load(cfg.antidistill_config(), teacher)
        log(f"antidistill: lambda {cfg.antidistill}, proxy {cfg.proxy}, {processor.protect_count} protect references")
    quantized = quantize_teacher(teacher, cfg, prompts, scoring, log) if cfg.quantize != "none" else None
    identity = teacher.identity()
    # a remote teacher without a tokenizer has no known vocab: ids then take 32 bits
    codec = get_codec(cfg.codec if cfg.top_k else "none", vocab_size=identity.get("vocab_size") or 2**32, k=cfg.top_k)
    # scored rows are a different thing from sampled ones: their ids (and the manifest) say so
    sampling = {**params.to_dict(), "answers": "reference"} if scoring else params.to_dict()
    if processor is not None:  # tilted rows are other rows than clean ones (ids, resume)
        sampling["antidistill"] = {"lambda": cfg.antidistill, "eps": cfg.antidistill_eps, "proxy": cfg.proxy,
                                   "protect": cfg.protect}
    manifest = {
        "teacher": identity,
        "sampling": sampling,
        "k": cfg.top_k,
        "samples_per_prompt": cfg.samples,
        "prompts": {"source": source, "sha256": prompts_hash(prompts), "count": len(prompts)},
        "split": {"heldout_fraction": cfg.heldout, "seed": cfg.seed},
        # local teachers keep the EOS token (and its top-k) at the end of a stopped completion
        "eos_in_completion": teacher.local_ids,
    }
    if processor is not None:  # top_logprobs and sampled_logprob are the tilted distribution's
        manifest["antidistill"] = processor.public_dict()

    todo = []
    with CaptureWriter(cfg.out, manifest, codec, shard_rows=cfg.shard_rows) as writer:
        if quantized is not None:  # this run's measurement (teacher.quantize, compared on resume, names the mode)
            writer.manifest["quantize"] = quantized
        done = writer.done_ids
        for p, split in zip(prompts, splits, strict=True):
            for s in range(cfg.samples):
                rid = row_id(p.messages, sampling, s)
                if rid not in done:
                    todo.append((rid, p, split))
        if done:
            log(f"resuming: {len(done)} rows already in complete shards, {len(todo)} to go")
        # windows of one shard in prompt order; length-sorted batches inside a window waste less on padding
        tokens = 0
        stopped = False
        t0 = time.perf_counter()
        with progress_bar(len(todo), "generate") as bar:
            task = bar.add_task("generate", total=len(todo), rate="")
            for w in range(0, len(todo), cfg.shard_rows):
                window = todo[w : w + cfg.shard_rows]
                if w and should_stop is not None and should_stop(len(window), w):
                    stopped = True
                    break
                encoded = {rid: _encode(teacher, p.messages) for rid, p, _ in window}
                order = sorted(window, key=lambda t: len(encoded[t[0]] or ()))
                results: dict[str, Any] = {}

                def tick(n_tokens: int, n_done: int) -> None:
                    nonlocal tokens
                    tokens += n_tokens
                    rate = f"{tokens / (time.perf_counter() - t0):.0f} tok/s"
                    bar.update(task, advance=n_done, rate=rate)

                if scoring:  # teacher forcing on the prompts' own answers: one forward pass per batch
                    answers = [reference_ids(teacher, p.messages, p.reference, encoded[rid]) for rid, p, _ in order]
                    outs = teacher.score_ids([encoded[rid] for rid, _, _ in order], answers, cfg.top_k,
                                             batch_size=cfg.batch_size, on_rows=tick)
                    results = {rid: c for (rid, _, _), c in zip(order, outs, strict=True)}
                elif encoded[order[0][0]] is not None:  # local: one call, continuous refill keeps the batch full
                    outs = teacher.complete_ids([encoded[rid] for rid, _, _ in order], params,
                                                [row_seed(cfg.seed, rid) for rid, _, _ in order],
                                                on_token=tick, batch_size=cfg.batch_size, include_eos=True,
                                                logits_processor=processor)
                    results = {rid: c for (rid, _, _), c in zip(order, outs, strict=True)}
                else:
                    for start in range(0, len(order), cfg.batch_size):
                        chunk = order[start : start + cfg.batch_size]
                        outs = teacher.complete([p.messages for _, p, _ in chunk], params,
                                                [row_seed(cfg.seed, rid) for rid, _, _ in chunk])
                        for (rid, _, _), c in zip(chunk, outs, strict=True):
                            results[rid] = c
                            tokens += len(c.completion_ids)
                        rate = f"{tokens / (time.perf_counter() - t0):.0f} tok/s"
                        bar.update(task, advance=len(chunk), rate=rate)
                for rid, p, split in window:
                    writer.add(_row(rid, p, split, results[rid]))
        if stopped:  # the manifest describes what is there: the prompts whose rows were all captured
            writer.flush()
            kept = [p for p in prompts if all(row_id(p.messages, sampling, s) in writer.done_ids for s in range(cfg.samples))]
            writer.manifest["prompts"] = {"source": source, "sha256": prompts_hash(kept), "count": len(kept),
                                          "planned": len(prompts), "stopped": "time budget"}
            log(f"generate: stopped at {len(kept)} of {len(prompts)} prompts (its share of the time budget)")
        gen_seconds = time.perf_counter() - t0
    final = writer.manifest
    final_stats = {"generation_seconds": round(gen_seconds, 2), "completion_tokens_per_s": round(tokens / max(gen_seconds, 1e-9), 1)}
    log(
        f"capture: {final.get('counts', {}).get('rows')} rows in {cfg.out}; "
        f"{final_stats['completion_tokens_per_s']} completion tok/s this run; "
        f"{final.get('bytes_per_completion_token')} bytes/token on disk"
    )
    if getattr(teacher, "stats", None):
        log(f"http: {teacher.stats}")
    return {**final, "this_run": final_stats}


def quantize_teacher(teacher, cfg: GenerateConfig, prompts: list, scoring: bool, log=print) -> dict[str, Any]:
    """Quantise a local teacher behind the fidelity gate (lm/quantize.py), calibrated on the run's first
    prompts with the completions it will capture: the teacher's own samples, or the references."""
    from potstill.lm.quantize import CALIBRATION_PROMPTS, quantize_engine

    if not getattr(teacher, "can_score", False):
        raise PotstillError(f"--quantize {cfg.quantize} needs a local teacher (not {cfg.teacher})")
    calib = prompts[:CALIBRATION_PROMPTS]
    ids = [teacher.encode_chat(p.messages) for p in calib]
    refs = [reference_ids(teacher, p.messages, p.reference, i) for p, i in zip(calib, ids, strict=True)] if scoring else None
    record = quantize_engine(teacher, cfg.quantize, ids, refs, k=cfg.top_k, seed=cfg.seed, temperature=cfg.temperature,
                             max_kl=cfg.quantize_max_kl)
    log(f"quantize {record['mode']}: top-{record['k']} KL to float32 {record['kl_topk']:.2e} nats/token over "
        f"{record['calibration_tokens']} calibration tokens (bar {record['max_kl']:.0e})")
    return record


def reference_ids(teacher, messages: list[dict], reference: str, prompt_ids: list[int]) -> list[int]:
    """The reference answer as the teacher's chat template renders an assistant turn, up to and
    including its end-of-turn (EOS) token; plain tokens + EOS when the template's rendering of
    the whole conversation does not start with the prompt's ids."""
    return answer_ids(teacher.tokenizer, messages, reference, prompt_ids, teacher.eos_ids)


def end_of_turn_ids(tokenizer, generation_config=None) -> list[int]:
    """Ids that end an assistant turn: the model's generation EOS ids, the tokenizer's EOS, and the
    tokenizer's other special tokens (a chat template's end-of-turn, e.g. <|im_end|> or <|eot_id|>,
    need not be tokenizer.eos_token_id). The first is what `answer_ids` appends when it must."""
    eos = getattr(generation_config, "eos_token_id", None)
    first = [x for x in ([tokenizer.eos_token_id] + (eos if isinstance(eos, list) else [eos])) if isinstance(x, int)]
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    specials = set(tokenizer.all_special_ids) | {i for i, t in added.items() if getattr(t, "special", False)}
    rest = sorted(specials - set(first))
    return list(dict.fromkeys(first + rest))


def answer_ids(tokenizer, messages: list[dict], reference: str, prompt_ids: list[int], stop_ids: list[int]) -> list[int]:
    """`reference` as the chat template renders the assistant turn after `prompt_ids`, up to and
    including the first of `stop_ids`; plain tokens + stop_ids[0] when the rendering of the whole
    conversation does not start with the prompt's ids. Shared by captures (reference columns), the
    transfer study's scratch arm and reference-NLL scoring, so all of them learn / score one EOS."""
    full = chat_ids(tokenizer, messages + [{"role": "assistant", "content": reference}], add_generation_prompt=False)
    if full[: len(prompt_ids)] == list(prompt_ids) and len(full) > len(prompt_ids):
        answer = full[len(prompt_ids) :]
        stops = set(stop_ids)
        ends = [j for j, t in enumerate(answer) if t in stops]
        return answer[: ends[0] + 1] if ends else answer
    return tokenizer(reference, add_special_tokens=False)["input_ids"] + [stop_ids[0]]


def _encode(teacher, messages):
    """Token ids of the chat prompt for a local teacher; None for a remote one (it templates itself)."""
    return teacher.encode_chat(messages) if teacher.local_ids else None


def _row(rid: str, prompt, split: str, c) -> dict[str, Any]:
    import json

    return {
        "id": rid,
        "prompt": json.dumps(prompt.messages, ensure_ascii=False),
        "reference": prompt.reference,
        "split": split,
        "prompt_ids": c.prompt_ids,
        "completion_ids": c.completion_ids,
        "completion_text": c.text,
        "finish_reason": c.finish_reason,
        "sampled_logprob": c.sampled_logprob,
        "topk_ids": c.topk_ids,
        "topk_logprobs": c.topk_logprobs,
    }
