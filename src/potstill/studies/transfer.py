"""`potstill study transfer`: how many tokens does the teacher's signal save?

    potstill study transfer --seeds 3 --max-tokens 32000 --out runs/study-transfer

One student architecture (default a fresh 2-layer llama with the teacher's tokenizer), the same
token budgets, three arms, each starting from the same fresh initialisation for a given seed:

- `kd`: the distillation loss (default forward KL) on the teacher's stored top-k;
- `ce-teacher`: cross-entropy on the teacher's sampled text only (sequence-level distillation);
- `scratch`: cross-entropy on the same prompts' human reference answers (the prompt file's
  `output`), i.e. no teacher signal at all. This is our reading of "training from scratch on
  the same text without a teacher signal": CE on the teacher's own text is arm `ce-teacher`,
  which still carries the teacher's choices, so the clean no-teacher control is the human text
  for the same prompts. Every arm learns the same end of an answer: the teacher's completions
  end with its EOS, and each reference is rendered by the chat template up to and including its
  end-of-turn token (`capture.generate.answer_ids`, the helper captures and reference-NLL
  scoring use), so no arm is scored on a token it never learned.

Budgets count learned (completion) tokens. Each arm×seed is ONE training run with a constant
learning rate after warm-up, measured whenever it first passes a budget; so a budget's point is
"this many tokens into one trajectory", not a run tuned to end there (a cosine schedule would
make early points depend on the final budget). Arms cycle through their data in epochs; the
references are fewer tokens than the teacher's text, so `scratch` repeats its data sooner.

Quality on held-out prompts: NLL of the reference answers (primary) and KL(teacher ‖ student) on
the teacher's held-out capture rows. The headline is the tokens-to-reach ratio: the target is the
best seed-mean reference NLL `scratch` reaches; the tokens each arm needs for it are interpolated
in log-tokens; ratio = tokens(arm) / tokens(scratch), reported per seed (paired: seed i of every arm
has the same init) with a 95 % Student-t interval on the log-ratios and n (`stats.token_ratio`).
Writes results.json, table.md and quality_vs_tokens.png under --out (atomically).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from potstill.config import opt
from potstill.errors import PotstillError
from potstill.studies.common import Clock, heldout_inputs, measure
from potstill.utils import stable_hash, write_json

ARMS = {"kd": "KD on the teacher's top-k", "ce-teacher": "CE on the teacher's text", "scratch": "CE on human references"}
METRICS = ("nll_reference", "kl")


@dataclass
class TransferConfig:
    teacher: str = opt("embedded", "Teacher: 'embedded', a model dir or a .gguf file.")
    prompts: str = opt("builtin:seed_tasks", "Prompts with reference answers (`output`), JSONL/Parquet or builtin:.")
    out: str = opt("runs/study-transfer", "Output directory (capture, runs, results.json, table.md, PNG).")
    capture: str | None = opt(None, "Reuse this teacher capture instead of generating one under --out.")
    student: str = opt("fresh:layers=2,hidden=128", "Student architecture (fresh:<size>, same for every arm).")
    arms: list[str] = opt(list(ARMS), "Arms to run: kd, ce-teacher, scratch.")
    kd_loss: str = opt("fkl", "Distillation loss of the kd arm (fkl, rkl, jsd, skl, srkl, tvd).")
    seeds: int = opt(3, "Seeds (initialisation + data order) per arm.")
    budgets: list[int] = opt([], "Token budgets (learned tokens); default: --n-budgets log-spaced up to --max-tokens.")
    max_tokens: int = opt(32000, "Largest token budget (learned completion tokens per run).")
    min_tokens: int = opt(2000, "Smallest token budget.")
    n_budgets: int = opt(4, "Number of log-spaced budgets.")
    max_prompts: int | None = opt(None, "Use at most this many prompts.")
    max_new_tokens: int = opt(64, "Teacher completion length.")
    top_k: int = opt(20, "Teacher top-k stored per token.")
    heldout: float = opt(0.15, "Fraction of prompts held out for measuring quality.")
    lr: float = opt(1e-3, "Learning rate (constant after warm-up).")
    warmup_steps: int = opt(5, "Warm-up steps.")
    batch_size: int = opt(8, "Sequences per optimizer step.")
    max_seq_len: int = opt(256, "Truncate prompt+completion to this many tokens.")
    gen_batch_size: int = opt(16, "Teacher decoding batch size.")
    bootstrap: int = opt(2000, "Bootstrap resamples for the ratio's side interval (percentile; 0 = none).")
    keep_students: bool = opt(False, "Keep every run's final student weights (otherwise only metrics are kept).")
    dtype: str = opt("auto", "Teacher decoding dtype: auto (bf16 where the CPU has it), float32.")

    def __post_init__(self) -> None:
        bad = [a for a in self.arms if a not in ARMS]
        if bad or not self.arms:
            raise PotstillError(f"study transfer: unknown arm {bad[0] if bad else '(none)'!r} (arms: {', '.join(ARMS)})")
        if self.seeds < 1 or self.n_budgets < 1 or self.min_tokens < 1 or self.max_tokens < self.min_tokens:
            raise PotstillError("study transfer: seeds, n_budgets >= 1 and 1 <= min_tokens <= max_tokens")
        try:  # flags arrive as strings
            self.budgets = [int(b) for b in self.budgets]
        except (TypeError, ValueError):
            raise PotstillError(f"study transfer: budgets must be token counts, got {self.budgets!r}") from None
        if any(b < 1 for b in self.budgets):
            raise PotstillError("study transfer: budgets must be >= 1 token")

    def budget_list(self) -> list[int]:
        import numpy as np

        if self.budgets:
            return sorted(set(int(b) for b in self.budgets))
        if self.n_budgets == 1:
            return [self.max_tokens]
        spaced = np.geomspace(self.min_tokens, self.max_tokens, self.n_budgets)
        # two significant digits (5040 -> 5000), the ends exactly as asked
        nice = [int(float(f"{b:.2g}")) for b in spaced[1:-1]]
        return sorted({self.min_tokens, *nice, self.max_tokens})


def reference_capture(capture_dir: str | Path, out: str | Path, tokenizer, generation_config=None) -> Path:
    """A text-only capture of the human references for the teacher capture's prompts (same ids, same splits).

    Each answer is the chat template's rendering of the assistant turn, ending with its end-of-turn
    token (`answer_ids` with `end_of_turn_ids`), as the teacher's completions end with its EOS.
    """
    from potstill.capture.codec import get_codec
    from potstill.capture.generate import answer_ids, end_of_turn_ids
    from potstill.capture.store import Capture, CaptureWriter

    capture = Capture.open(capture_dir)
    teacher = capture.manifest["teacher"]  # same tokenizer identity, so train() accepts it for the student
    manifest = {"teacher": teacher, "source": f"human references of the prompts in {capture_dir}",
                "prompts": capture.manifest.get("prompts"), "split": capture.manifest.get("split"),
                "answer_end": "chat template end-of-turn"}
    rows = [r for r in capture.rows(columns=["id", "prompt", "reference", "split", "prompt_ids"]) if r.get("reference")]
    if not rows:
        raise PotstillError("no prompt has a reference answer (`output`), which the scratch arm learns from",
                            where=str(capture_dir))
    codec = get_codec("none", vocab_size=teacher.get("vocab_size") or 2**32, k=0)
    stop = end_of_turn_ids(tokenizer, generation_config)
    with CaptureWriter(out, manifest, codec) as writer:
        for r in rows:
            if r["id"] in writer.done_ids:
                continue
            answer = answer_ids(tokenizer, r["prompt"], r["reference"], list(r["prompt_ids"]), stop)
            writer.add({"id": r["id"], "prompt": r["prompt"], "reference": r["reference"], "split": r["split"],
                        "prompt_ids": r["prompt_ids"], "completion_ids": answer, "completion_text": r["reference"],
                        "finish_reason": "reference", "sampled_logprob": None})
    return Path(out)


def run_transfer(cfg: TransferConfig, log=print) -> dict[str, Any]:
    """Run every arm × seed, write results.json / table.md / quality_vs_tokens.png; return the results."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from potstill.capture.generate import generate, progress_bar
    from potstill.config import GenerateConfig, TrainConfig
    from potstill.lm.loading import resolve_model_dir
    from potstill.train.loop import train
    from potstill.utils import quiet_transformers

    quiet_transformers()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    budgets = cfg.budget_list()
    t_start = time.perf_counter()
    teacher_dir = resolve_model_dir(cfg.teacher)
    capture_dir = cfg.capture
    if capture_dir is None:
        capture_dir = str(out / "capture")
        log(f"[transfer] teacher capture -> {capture_dir}")
        generate(GenerateConfig(teacher=cfg.teacher, prompts=cfg.prompts, out=capture_dir, max_new_tokens=cfg.max_new_tokens,
                                top_k=cfg.top_k, heldout=cfg.heldout, max_prompts=cfg.max_prompts,
                                batch_size=cfg.gen_batch_size, temperature=1.0, seed=0, dtype=cfg.dtype), log=log)
    capture_s = time.perf_counter() - t_start
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    data = {"kd": capture_dir, "ce-teacher": capture_dir}
    if "scratch" in cfg.arms:
        from transformers import GenerationConfig

        try:
            gen_cfg = GenerationConfig.from_pretrained(teacher_dir)
        except OSError:  # no generation_config.json: the tokenizer's EOS and special tokens
            gen_cfg = None
        # "references-eot": references ending with the end-of-turn (older study dirs hold "references" without it)
        data["scratch"] = str(reference_capture(capture_dir, out / "references-eot", tokenizer, gen_cfg))
    examples, prompts = heldout_inputs(capture_dir)
    teacher_model = AutoModelForCausalLM.from_pretrained(teacher_dir)
    teacher_row = measure(teacher_model, tokenizer, examples, prompts)
    del teacher_model
    log(f"[transfer] teacher on held-out: reference NLL {teacher_row.get('nll_reference', math.nan):.3f}; "
        f"{len(examples)} held-out completions, {teacher_row.get('references', 0)} references; budgets {budgets}")

    runs: list[dict[str, Any]] = []
    clock = Clock(len(cfg.arms) * cfg.seeds * budgets[-1])
    with progress_bar(int(clock.total), "train (all runs)") as bar:
        task = bar.add_task("train", total=int(clock.total), rate="")
        def say(line: str) -> None:  # above the live bar; plain text (rich would read "[transfer]" as markup)
            bar.console.print(line, markup=False, highlight=False)

        for seed in range(cfg.seeds):
            for arm in cfg.arms:
                run_dir = out / "runs" / f"{arm}-seed{seed}"
                tcfg = TrainConfig(capture=data[arm], out=str(run_dir), teacher=str(teacher_dir), student=cfg.student,
                                   loss=cfg.kd_loss if arm == "kd" else "ce", lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                   max_steps=budgets[-1], batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len,
                                   checkpoint_every=0, seed=seed, lr_schedule="constant")
                key = stable_hash({"train": asdict(tcfg), "budgets": budgets, "eval": len(examples),
                                   "answers": "end-of-turn"})  # runs from before every arm learned EOS are redone
                done = _load_run(run_dir, key)
                if done is None:
                    done = _one_run(tcfg, arm, seed, budgets, examples, prompts, key, train, bar, task, clock, say)
                    if not cfg.keep_students:
                        for f in run_dir.glob("*.safetensors"):
                            f.unlink()
                else:  # finished in an earlier invocation: not part of this one's rate
                    clock.total -= budgets[-1]
                    bar.update(task, advance=budgets[-1])
                runs.append(done)
                last = done["points"][-1]
                say(f"[transfer] {arm} seed {seed}: {last['tokens']} tokens, reference NLL {last['nll_reference']:.3f}, "
                    f"KL {last.get('kl', math.nan):.3f} | {clock.line()}")
    result = aggregate(cfg, budgets, runs, teacher_row, n_boot=cfg.bootstrap)
    result["timings"] = {"capture_s": round(capture_s, 1), "total_s": round(time.perf_counter() - t_start, 1)}
    result["capture"] = capture_dir
    from potstill.studies.report import write_transfer_outputs

    write_transfer_outputs(result, out)
    return result


def _one_run(tcfg, arm, seed, budgets, examples, prompts, key, train, bar, task, clock, say) -> dict[str, Any]:
    """One training trajectory, measured at each budget it passes (and at initialisation)."""
    points: list[dict[str, Any]] = []
    state = {"tokens": 0, "next": 0, "t0": time.perf_counter(), "shown": time.perf_counter()}

    def on_step(metrics: dict[str, Any], model) -> bool:
        before = state["tokens"]
        state["tokens"] += int(metrics["target_tokens"])
        step_adv = min(state["tokens"], budgets[-1]) - min(before, budgets[-1])
        clock.advance(step_adv)
        bar.update(task, advance=step_adv, rate=f"{metrics['tokens_per_s']:.0f} tok/s")
        while state["next"] < len(budgets) and state["tokens"] >= budgets[state["next"]]:
            row = measure(model, tok, examples, prompts)
            points.append({"budget": budgets[state["next"]], "tokens": state["tokens"], "step": metrics["step"],
                           "train_loss": metrics["loss"], **_pick(row)})
            say(f"[transfer] {arm} seed {seed}: {budgets[state['next']]:,}-token budget at {state['tokens']:,} tokens: "
                f"reference NLL {points[-1].get('nll_reference', math.nan):.3f} | {clock.line()}")
            state["next"] += 1
        if not bar.console.is_terminal and time.perf_counter() - state["shown"] > 30:  # a log file has no live bar
            state["shown"] = time.perf_counter()
            say(f"[transfer] {arm} seed {seed}: {state['tokens']:,}/{budgets[-1]:,} tokens, "
                f"{metrics['tokens_per_s']:.0f} tok/s | {clock.line()}")
        return state["next"] >= len(budgets)

    from potstill.students import build_student

    # the same initial weights for every arm of this seed (fresh_student seeds torch itself)
    model, tok, info = build_student(tcfg.student, tcfg.teacher, seed=seed)
    init = _pick(measure(model, tok, examples, prompts))
    summary = train(tcfg, log=lambda line: None if line.startswith("step ") else say(f"  {line}"),
                    model=model, tokenizer=tok, student_info=info, on_step=on_step)
    record = {"arm": arm, "seed": seed, "key": key, "init": init, "points": points,
              "seconds": round(time.perf_counter() - state["t0"], 1),
              "train_tokens_per_s": summary.get("train_tokens_per_s"), "student": info}
    if len(points) < len(budgets):
        raise PotstillError(f"{arm} seed {seed}: training stopped before the {budgets[len(points)]}-token budget")
    write_json(Path(tcfg.out) / "points.json", record)
    return record


def _pick(row: dict[str, Any]) -> dict[str, Any]:
    keys = ("nll_reference", "kl", "top1_agreement", "nll_teacher_tokens")
    return {k: float(row[k]) for k in keys if row.get(k) is not None}


def _load_run(run_dir: Path, key: str) -> dict[str, Any] | None:
    """A finished run of the same configuration (a rerun of the study skips it)."""
    path = run_dir / "points.json"
    if not path.exists():
        return None
    record = json.loads(path.read_text())
    return record if record.get("key") == key else None


def aggregate(cfg: TransferConfig, budgets: list[int], runs: list[dict[str, Any]], teacher_row: dict[str, Any],
              n_boot: int = 2000) -> dict[str, Any]:
    """Per arm × budget: mean and 95% t-interval over seeds; ratios vs scratch per seed with t-intervals."""
    import numpy as np

    from potstill.studies.stats import t_interval, token_ratio

    curves: dict[str, Any] = {}
    arrays: dict[str, dict[str, np.ndarray]] = {}
    for arm in cfg.arms:
        rs = sorted((r for r in runs if r["arm"] == arm), key=lambda r: r["seed"])
        tokens = np.array([[p["tokens"] for p in r["points"]] for r in rs], dtype=float)
        arrays[arm] = {"tokens": tokens}
        rows = []
        for j, b in enumerate(budgets):
            row = {"budget": b, "tokens_mean": float(tokens[:, j].mean())}
            for m in METRICS:
                vals = [r["points"][j].get(m) for r in rs]
                if all(v is not None for v in vals):
                    row[m] = t_interval(vals)
            rows.append(row)
        for m in METRICS:
            if all(m in row for row in rows):
                arrays[arm][m] = np.array([[p[m] for p in r["points"]] for r in rs], dtype=float)
        curves[arm] = rows
    ratios: dict[str, Any] = {}
    if "scratch" in arrays:
        ref = arrays["scratch"]
        for arm in cfg.arms:
            if arm == "scratch":
                continue
            ratios[arm] = {m: token_ratio(arrays[arm]["tokens"], arrays[arm][m], ref["tokens"], ref[m], n_boot=n_boot)
                           for m in METRICS if m in arrays[arm] and m in ref}
    return {"study": "transfer", "config": asdict(cfg), "budgets": budgets, "arms": {a: ARMS[a] for a in cfg.arms},
            "teacher": _pick(teacher_row), "curves": curves, "ratios_vs_scratch": ratios, "runs": runs}
