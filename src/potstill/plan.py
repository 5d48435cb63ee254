"""Time-budgeted runs: measure this machine in a few seconds, size every stage to fit, keep to it.

    potstill demo --minutes 10          # or: potstill run recipe.yaml --minutes 5

`measure_rates` times the teacher's batched decode and prefill (one short sampled call at the
planned batch) and the student's training step (forward + backward + AdamW on random ids, the
student built as the recipe says), all in wall-clock seconds, because the budget is wall-clock.
`size_plan` is a pure function of those rates: it sizes prompts, new tokens, train steps and batch,
eval rows and eval generation so that the estimated total fits the budget less a safety margin,
keeping any field the user pinned with `--set`. A faster machine gets more prompts, longer
completions (up to the recipe's), more steps (up to `MAX_EPOCHS` passes over the data) - a
bigger run, not an earlier finish. `Deadline` keeps the stages to it: generation takes no new
batch that would not finish within its share, training stops before a step that would not.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

from potstill.utils import cpu_line

MARGIN = 0.12  # share of the budget kept back for what the estimates miss (saves, imports, noise)
EVAL_SHARE = 0.15  # share of the usable budget the eval gets
HELDOUT_MAX_SHARE = 0.2  # eval's held-out quality set is skipped (said in the plan) where it would take more
MIN_PROMPTS = 64  # shorten completions before going under this many prompts
MIN_NEW_TOKENS = 24
TARGET_EPOCHS = 2.0  # passes over the training rows the sizing aims for when it trades data against steps
MAX_EPOCHS = 8.0  # more passes than this over a small capture do not buy a better student
MIN_STEPS = 8  # halve the train batch (down to 2) before planning fewer optimizer steps
PROBE_ROWS = 16  # the decode probe's batch (a larger planned batch decodes at least as fast per token)
PROBE_TRAIN_ROWS = 4  # the training probe's batch


@dataclass
class Rates:
    """This machine, measured (wall-clock)."""

    decode_tok_s: float  # teacher completion tokens/s, batched sampling with top-k, at `decode_batch`
    prefill_tok_s: float  # teacher forward tokens/s without grad (prefill, teacher forcing, eval scoring)
    train_tok_s: float  # student tokens/s through forward + backward + AdamW step
    load_s: float  # loading one model from disk
    build_s: float  # building the student (before its calibration forward passes)
    decode_batch: int = 1


@dataclass
class Workload:
    """What the data looks like (measured on the prompts) and what the recipe asks for."""

    prompts_available: int
    prompt_tokens: float  # mean chat-templated prompt length
    reference_tokens: float  # mean reference answer length (0: none)
    heldout: float
    max_new_tokens: int
    gen_batch: int
    train_batch: int
    warmup_steps: int
    calibration: int
    gen_prompts: int
    gen_tokens: int
    eval_models: int  # teacher + students (before and after)
    pinned: dict[str, Any]  # "stage.field" -> value the user set; the plan keeps these
    heldout_set_tokens: float = 0.0  # prompt + reference tokens of eval's held-out quality set (0: none)
    teacher_forcing: bool = False  # generate --answers reference: the answers are the references, scored at prefill speed


def heldout_rows(n: int, fraction: float) -> int:
    """Held-out prompts among n, as `capture.prompts.assign_split` counts them."""
    k = int(fraction * n + 0.5)
    if n >= 2:
        k = min(max(k, 1 if fraction > 0 else 0), n - 1 if fraction < 1 else n)
    elif fraction < 1:
        k = 0
    return k


def _pin(w: Workload, key: str, value):
    return w.pinned.get(key, value)


def size_plan(rates: Rates, w: Workload, budget_s: float, spent_s: float = 0.0, margin: float = MARGIN) -> dict:
    """Size every stage so the estimated total fits `budget_s` (of which `spent_s` are already used).

    Returns {"budget_s", "usable_s", "stages": [{stage, work, est_s}], "total_est_s", "overrides":
    {"generate": {...}, "train": {...}, "eval": {...}}}. Pure: same rates, same plan.
    """
    p, ref = max(w.prompt_tokens, 1.0), w.reference_tokens
    usable = max(budget_s * (1 - margin) - spent_s, 1.0)
    pre, trn = rates.prefill_tok_s, rates.train_tok_s
    pinned_c = "generate.max_new_tokens" in w.pinned

    # eval: m models x (load + fidelity on R held-out rows + reference NLL + a short batched speed run)
    tf = w.teacher_forcing and ref > 0
    c_guess = max(1, round(ref)) if tf else _pin(w, "generate.max_new_tokens", w.max_new_tokens)
    g = _pin(w, "eval.gen_prompts", min(w.gen_prompts, 8))
    t = _pin(w, "eval.gen_tokens", min(w.gen_tokens, 32))
    m = w.eval_models
    eval_share = EVAL_SHARE * usable
    # the held-out set: the teacher scores it once, then every model reads it (one forward each)
    heldout_s = (m + 1) * w.heldout_set_tokens / pre
    skip_heldout = heldout_s > HELDOUT_MAX_SHARE * usable and "eval.heldout_prompts" not in w.pinned
    skipped_s, heldout_s = (heldout_s, 0.0) if skip_heldout else (0.0, heldout_s)
    eval_share = max(eval_share, heldout_s + EVAL_SHARE * usable / 2)
    speed_s = g * p / pre + decode_s(g, t, 8, rates)  # eval decodes in batches of 8
    per_row = ((p + c_guess) + (p + ref if ref else 0)) / pre
    rows_fit = math.floor((eval_share - heldout_s - m * (rates.load_s + speed_s)) / (m * per_row))
    if rows_fit < 4 and "eval.gen_prompts" not in w.pinned and "eval.gen_tokens" not in w.pinned:
        g, t = min(g, 4), min(t, 16)
        speed_s = g * p / pre + decode_s(g, t, 8, rates)  # eval decodes in batches of 8
        rows_fit = math.floor((eval_share - heldout_s - m * (rates.load_s + speed_s)) / (m * per_row))
    rows = _pin(w, "eval.max_rows", max(4, rows_fit))

    # build: the student from the teacher's weights, calibrated on its first rows (fewer where that would
    # take more than 5% of the budget, at least 8), saved as 'before'
    calib = _pin(w, "train.calibration", min(w.calibration, max(8, math.floor(0.05 * usable * pre / (p + c_guess)))))
    build_est = rates.build_s + calib * (p + c_guess) / pre

    def eval_est(c: int, n: int) -> float:
        r = min(rows, max(1, heldout_rows(n, w.heldout)))
        row_s = ((p + c) + (p + ref if ref else 0)) / pre
        return m * (rates.load_s + speed_s + r * row_s) + heldout_s

    # generation + training share what is left: per prompt, its decode + prefill, and TARGET_EPOCHS passes
    work = usable - build_est
    candidates = [c_guess] if pinned_c or tf else _lengths(w.max_new_tokens)
    for c in candidates:
        b = _pin(w, "train.batch_size", w.train_batch)
        per_prompt = (c / pre if tf else c / rates.decode_tok_s) + p / pre + TARGET_EPOCHS * (1 - w.heldout) * (p + c) / trn
        left = work - eval_est(c, w.prompts_available)
        n = _pin(w, "generate.max_prompts", min(w.prompts_available, max(2, math.floor(left / per_prompt))))
        n = min(n, w.prompts_available)
        if n >= min(MIN_PROMPTS, w.prompts_available) or c == candidates[-1]:
            break
    gen_batch = math.ceil(n / math.ceil(n / min(w.gen_batch, n)))  # even waves: 87 rows go as 3 x 29, not 32+32+23
    gen_s = n * (p + c) / pre if tf else n * p / pre + decode_s(n, c, gen_batch, rates)
    train_rows = max(1, n - heldout_rows(n, w.heldout))
    seq = p + c
    train_s = max(work - eval_est(c, n) - gen_s, 0.0)
    if "train.max_steps" in w.pinned:
        steps = w.pinned["train.max_steps"]
    else:
        steps = math.floor(train_s * trn / (b * seq))
        while steps < MIN_STEPS and b > 2 and "train.batch_size" not in w.pinned:
            b //= 2
            steps = math.floor(train_s * trn / (b * seq))
        steps = max(1, min(steps, math.floor(MAX_EPOCHS * train_rows / b)))
    train_s = steps * b * seq / trn
    warmup = _pin(w, "train.warmup_steps", min(w.warmup_steps, max(1, steps // 10)))
    eval_rows = min(rows, max(1, heldout_rows(n, w.heldout)))
    stages = [
        {"stage": "generate", "work": (f"{n} reference answers (~{c} tokens) by teacher forcing" if tf else
                                       f"{n} prompts x {c} new tokens (batch {gen_batch})"), "est_s": gen_s},
        {"stage": "build student", "work": f"prune/build + {calib} calibration rows, saved as 'before'", "est_s": build_est},
        {"stage": "train", "work": f"{steps} steps x batch {b} (~{steps * b / train_rows:.1f} epochs of {train_rows} rows)",
         "est_s": train_s},
        {"stage": "eval", "work": f"{m} models x {eval_rows} held-out rows + {g} prompts x {t} tokens"
         + (f" (held-out quality set skipped: ~{skipped_s:.0f} s at this machine's rates)" if skip_heldout else ""),
         "est_s": eval_est(c, n)},
    ]
    total = spent_s + sum(s["est_s"] for s in stages)
    overrides = {
        "generate": {"max_prompts": n, "max_new_tokens": c, "batch_size": gen_batch},
        "train": {"max_steps": steps, "batch_size": b, "warmup_steps": warmup, "checkpoint_every": 0,
                  "calibration": calib},
        "eval": {"max_rows": eval_rows, "gen_prompts": g, "gen_tokens": t},
    }
    if skip_heldout:
        overrides["eval"]["heldout_prompts"] = None
    for key, value in w.pinned.items():  # what the user set wins, whatever the sizing thought
        stage, _, field = key.partition(".")
        if stage in overrides:
            overrides[stage][field] = value
    return {"budget_s": budget_s, "margin": margin, "spent_s": spent_s, "usable_s": usable, "stages": stages,
            "total_est_s": total, "overrides": overrides, "rates": asdict(rates)}


def decode_s(rows: int, tokens: int, batch: int, rates: Rates) -> float:
    """Seconds to decode `tokens` new tokens for `rows` rows, `batch` at a time. A decode step costs
    about the same for any batch up to the probe's (reading the weights dominates), so a batch
    smaller than the probe's is charged as the probe's; a larger one at the probe's rate (safe)."""
    batch = max(1, min(batch, rows))
    waves = math.ceil(rows / batch)
    return waves * tokens * max(batch, rates.decode_batch) / rates.decode_tok_s


def _lengths(c0: int) -> list[int]:
    """The recipe's completion length, then shorter ones down to MIN_NEW_TOKENS."""
    out = [c0]
    for f in (0.75, 0.5, 0.375, 0.25):
        c = max(MIN_NEW_TOKENS, int(c0 * f))
        if c < out[-1]:
            out.append(c)
    return out


def resize_train(plan: dict, counts: dict, left_s: float) -> dict | None:
    """Training re-sized on the capture it got, once generation is done: the seconds left for it at the
    measured train rate over the capture's own tokens per training row (the plan had to assume every
    completion runs to `max_new_tokens`), at most MAX_EPOCHS passes. None where there is nothing to size."""
    train = (counts.get("splits") or {}).get("train") or {}
    rows = train.get("rows") or 0
    if rows < 1:
        return None
    per_row = (train.get("prompt_tokens", 0) + train.get("completion_tokens", 0)) / rows
    b = plan["overrides"]["train"]["batch_size"]
    rate = plan["rates"]["train_tok_s"]
    steps = max(1, min(math.floor(max(left_s, 0.0) * rate / (b * per_row)), math.floor(MAX_EPOCHS * rows / b)))
    return {"planned_steps": plan["overrides"]["train"]["max_steps"], "max_steps": steps, "tokens_per_row": per_row,
            "left_s": left_s, "est_s": steps * b * per_row / rate}


def format_plan(plan: dict) -> str:
    """The plan as a plain-text table (stage, work, estimated seconds; actual seconds once known)."""
    actual = plan.get("actual_s", {})
    lines = [f"plan: budget {plan['budget_s']:.0f}s, {plan['margin']:.0%} kept back, "
             f"{plan['spent_s']:.0f}s spent measuring this machine"
             + (f" ({cpu_line(plan['cpu'])})" if plan.get("cpu") else "")]
    r = plan["rates"]
    lines.append(f"  rates: teacher decode {r['decode_tok_s']:.0f} tok/s (batch {r['decode_batch']}), "
                 f"prefill {r['prefill_tok_s']:.0f} tok/s, student train {r['train_tok_s']:.0f} tok/s, "
                 f"model load {r['load_s']:.1f}s")
    width = max(len(s["work"]) for s in plan["stages"])
    head = f"  {'stage':<14} {'work':<{width}} {'est s':>7}" + (f" {'actual s':>9}" if actual else "")
    lines.append(head)
    for s in plan["stages"]:
        row = f"  {s['stage']:<14} {s['work']:<{width}} {s['est_s']:>7.0f}"
        if actual:
            got = actual.get(s["stage"])
            row += f" {got:>9.0f}" if got is not None else f" {'-':>9}"
        lines.append(row)
    total = f"  {'total':<14} {'(incl. measuring)':<{width}} {plan['total_est_s']:>7.0f}"
    if actual:
        total += f" {actual.get('total', float('nan')):>9.0f}"
    lines.append(total)
    if plan.get("train_resized"):
        r = plan["train_resized"]
        lines.append(f"  train re-sized after generation: {r['planned_steps']} -> {r['max_steps']} steps "
                     f"({r['tokens_per_row']:.0f} tokens per training row in the capture, {r['left_s']:.0f}s left for it)")
    if plan["total_est_s"] > plan["budget_s"]:
        lines.append(f"  note: this machine is too slow (or too busy) for a {plan['budget_s']:.0f}s budget; "
                     "the smallest run it can size will overrun it")
    return "\n".join(lines)


class Deadline:
    """A stage's share of the budget: `fits(seconds)` says whether work of that length still ends in time."""

    def __init__(self, seconds: float, clock=time.perf_counter):
        self.clock = clock
        self.start = clock()
        self.end = self.start + seconds

    def elapsed(self) -> float:
        return self.clock() - self.start

    def fits(self, seconds: float) -> bool:
        return self.clock() + seconds <= self.end

    def train_stop(self):
        """`on_step` for train(): stop before a step that (at the mean step time so far) would end late."""
        first = self.clock()

        def on_step(metrics: dict, model) -> bool:
            step_s = (self.clock() - first) / max(metrics.get("step", 1), 1)
            return not self.fits(step_s)

        return on_step


def measure_rates(teacher, prompt_ids: list[list[int]], gen_batch: int, student: str, teacher_dir, load_s: float,
                  top_k: int = 20, seq_len: int = 128, bf16: str = "auto", clock=time.perf_counter) -> Rates:
    """Time the teacher's batched decode + prefill and one training step of the student (a few seconds),
    on `clock` (wall by default; `time.process_time` gives rates per CPU-second)."""
    import torch

    from potstill.lm.types import SamplingParams
    from potstill.students import build_student
    from potstill.train.loop import autocast_enabled

    rows = max(1, min(gen_batch, PROBE_ROWS, len(prompt_ids)))
    params = SamplingParams(max_new_tokens=6, temperature=1.0, top_logprobs=top_k)
    teacher.complete_ids(prompt_ids[:1], SamplingParams(max_new_tokens=2, temperature=1.0, top_logprobs=top_k))
    stamps: list[tuple[float, int]] = []
    t0 = clock()
    teacher.complete_ids(prompt_ids[:rows], params, on_token=lambda n, _: stamps.append((clock(), n)),
                         batch_size=rows)
    # every row's first token comes out of its prefill; the rest are decode steps (the first of them, warm-up, skipped)
    seen, first = 0, 0
    while first < len(stamps) and seen < rows:
        seen += stamps[first][1]
        first += 1
    prefill_s = stamps[first - 1][0] - t0
    prefill = sum(len(p) for p in prompt_ids[:rows]) / max(prefill_s, 1e-6)
    timed = stamps[first + 1:]
    if timed:
        decode = sum(n for _, n in timed) / max(timed[-1][0] - stamps[first][0], 1e-6)
    else:  # every row stopped at once: fall back on the whole call
        decode = sum(n for _, n in stamps) / max(stamps[-1][0] - t0, 1e-6)

    t = clock()
    model = student_shaped(student, teacher_dir)
    if model is None:  # not a depth pruning: build it as the run will (on 4 prompts' calibration)
        model = build_student(student, teacher_dir, [list(p) for p in prompt_ids[:4]], seed=0)[0]
        build_s = clock() - t
    else:  # the run loads the teacher's weights, prunes, and saves the student (measured: about 1.1 loads)
        build_s = 1.5 * load_s
    model.train()
    model.config.use_cache = False
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6)
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    use_bf16 = autocast_enabled(bf16, torch.device("cpu"))

    inner, head = getattr(model, "model", None), getattr(model, "lm_head", None)

    def step(batch: int, length: int) -> None:
        ids = torch.randint(0, vocab, (batch, length), generator=gen)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
            if inner is not None and head is not None:  # as training does: the head only on learned positions
                logits = head(inner(input_ids=ids).last_hidden_state[:, length // 2 - 1:])  # (about half: the answer)
                ids = ids[:, length // 2 - 1:]
            else:
                logits = model(input_ids=ids).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step(1, 16)  # warm-up: optimizer state, allocator
    t = clock()
    step(PROBE_TRAIN_ROWS, seq_len)  # a batch nearer the run's (GEMMs on 2 rows run below the run's rate)
    train = PROBE_TRAIN_ROWS * seq_len / (clock() - t)
    return Rates(decode_tok_s=decode, prefill_tok_s=prefill, train_tok_s=train, load_s=load_s, build_s=build_s,
                 decode_batch=rows)


def student_shaped(student: str, teacher_dir):
    """A randomly initialised model of the student's shape for `prune:depth[:N|ratio]` (no weights loaded,
    no calibration); None for other specs."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from potstill.students import parse_amount

    kind, _, rest = student.partition(":")
    method, _, amount = rest.partition(":")
    if kind != "prune" or method != "depth" or "+" in student:
        return None
    config = AutoConfig.from_pretrained(teacher_dir)
    config.num_hidden_layers = parse_amount(amount or "0.5", config.num_hidden_layers, student)
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[: config.num_hidden_layers]
    with torch.device("cpu"):
        return AutoModelForCausalLM.from_config(config)
