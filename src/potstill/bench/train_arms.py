"""The two arms of `potstill bench train`, each run alone in a fresh process (honest peak memory).

    python -m potstill.bench.train_arms SPEC.json     # SPEC written by potstill.bench.train

- `potstill`: `potstill.train.loop.train` on the capture's stored top-k (no teacher in memory).
- `trl`: TRL's `GKDTrainer` (lmbda=0: off-policy on the captured completions) with the teacher
  run live, one forward pass per step.

Both start from the same saved student init, train for the same budget of wall-clock seconds
(measured from the first step; time spent measuring held-out KL along the way is paused and not
counted) and report completion tokens trained, peak RSS above the process's RSS after imports
(VmHWM, reset after imports through /proc/self/clear_refs), and held-out KL(teacher||student)
with `potstill.evaluate.metrics.fidelity`, the same function and examples for both arms.
"""

from __future__ import annotations

import json
import os
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from potstill.lm.tokens import pad_token_id


def _rss_kb(field: str) -> int | None:
    try:
        m = re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text())
    except OSError:
        return None
    return int(m.group(1)) if m else None


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) to the current RSS; False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """Peak RSS of this process since the last reset (VmHWM), else since start (ru_maxrss)."""
    hwm = _rss_kb("VmHWM")
    if hwm is None:
        import resource

        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # kB on Linux
    return hwm / 1024


def rss_mb() -> float:
    kb = _rss_kb("VmRSS")
    return kb / 1024 if kb is not None else float("nan")


class Budget:
    """Wall-clock budget for one arm, with held-out KL measured every `eval_every` seconds (paused)."""

    def __init__(self, spec: dict, model, examples: list, pad_id: int, arm: str) -> None:
        self.seconds = float(spec["seconds"])
        self.eval_every = float(spec["eval_every"])
        self.model, self.examples, self.pad_id, self.arm = model, examples, pad_id, arm
        self.batch_size = int(spec["eval_batch_size"])
        self.paused = 0.0
        self.cpu_paused = 0.0
        self.cpu_mark: tuple[float, int] | None = None  # (CPU seconds, tokens) at the end of step 1
        self.cpu_s = 0.0
        self.cpu_tokens = 0
        self.tokens = 0
        self.steps = 0
        self.curve: list[dict[str, Any]] = []
        self.next_eval = self.eval_every
        self.next_log = 0.0
        self.train_s = 0.0
        self.first_step_s: float | None = None

    def evaluate(self, t: float) -> dict[str, float]:
        from potstill.evaluate.metrics import fidelity

        t0, c0 = time.perf_counter(), time.process_time()
        was_training = self.model.training
        res = fidelity(self.model, self.examples, self.pad_id, self.batch_size)
        self.model.train(was_training)
        if self.steps:  # the t=0 measurement comes before the training clock starts: nothing to pause
            self.paused += time.perf_counter() - t0
            self.cpu_paused += time.process_time() - c0
        point = {"t": round(t, 3), "step": self.steps, "tokens": self.tokens, "kl": res["kl"],
                 "top1_agreement": res["top1_agreement"], "nll_teacher_tokens": res["nll_teacher_tokens"]}
        self.curve.append(point)
        return point

    def step(self, raw_elapsed: float, tokens: int) -> bool:
        """Account one optimizer step; returns True when the budget is spent."""
        self.steps += 1
        self.tokens += tokens
        t = raw_elapsed - self.paused
        self.train_s = t
        # CPU time (all threads of this process) is far less sensitive than wall-clock to other work
        # on the machine. Counted from the end of step 1: when step 1 starts inside potstill's loop
        # is not visible from here, so both arms leave it out alike.
        cpu = time.process_time() - self.cpu_paused
        if self.cpu_mark is None:
            self.cpu_mark = (cpu, self.tokens)
            self.first_step_s = t
        else:
            self.cpu_s, self.cpu_tokens = cpu - self.cpu_mark[0], self.tokens - self.cpu_mark[1]
        if t >= self.next_log:
            rate = self.tokens / t if t > 0 else 0.0
            kl = f", held-out KL {self.curve[-1]['kl']:.4f} at {self.curve[-1]['t']:.0f}s" if self.curve else ""
            print(f"[{self.arm}] {t:6.1f}/{self.seconds:.0f}s step {self.steps} {self.tokens} tokens "
                  f"{rate:.0f} tok/s{kl}", file=sys.stderr, flush=True)
            self.next_log = t + max(self.seconds / 12, 1.0)
        if t >= self.seconds:
            return True
        if t >= self.next_eval:
            self.evaluate(t)
            self.next_eval = t + self.eval_every
        return False


def output_dtype_probe(model, grad_only: bool = True) -> dict:
    """The dtype of the LM head's output at its first call (with gradients on, if `grad_only`, so the
    no-grad KL measurements are skipped): bfloat16 shows that autocast is really on inside the
    trainer's forward, whatever wraps it; float32 that it is off."""
    import torch

    seen: dict[str, str] = {}

    def hook(module, args, output):
        if "dtype" not in seen and (torch.is_grad_enabled() or not grad_only):
            seen["dtype"] = str(output.dtype).replace("torch.", "")

    model.get_output_embeddings().register_forward_hook(hook)
    return seen


def _heldout(spec: dict):
    from potstill.capture.store import Capture
    from potstill.train.data import examples_from_capture

    return examples_from_capture(Capture.open(spec["capture"]), split="heldout", max_seq_len=spec["max_seq_len"])


def run_potstill(spec: dict, model, tokenizer, heldout, pad_id: int) -> tuple[Budget, dict]:
    from potstill.config import TrainConfig
    from potstill.train.loop import train

    cfg = TrainConfig(
        capture=spec["capture"], out=str(Path(spec["work"]) / "potstill-student"), student="pretrained:init",
        loss="jsd", beta=spec["beta"], temperature=1.0, lr=spec["lr"], weight_decay=0.0,
        warmup_steps=spec["warmup_steps"], max_steps=spec["max_steps"], batch_size=spec["batch_size"],
        grad_accum=1, max_seq_len=spec["max_seq_len"], grad_clip=1.0, bf16=spec["bf16"], checkpoint_every=0,
        seed=spec["seed"],
    )
    budget = Budget(spec, model, heldout, pad_id, "potstill")
    budget.evaluate(0.0)
    summary = train(cfg, log=lambda *_: None, model=model, tokenizer=tokenizer,
                    student_info={"spec": spec["student"]},
                    on_step=lambda m, _model: budget.step(m["elapsed_s"], m["target_tokens"]))
    return budget, {"loop_summary_steps": summary["steps"]}


def run_trl(spec: dict, model, tokenizer, heldout, pad_id: int) -> tuple[Budget, dict]:
    import datasets
    import torch
    from transformers import PrinterCallback, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from potstill.capture.store import Capture

    # The rows the potstill arm learns from (examples_from_capture: a completion, and a prompt shorter
    # than max_seq_len), as chat messages; the collator re-tokenises them with the chat template.
    rows = [r for r in Capture.open(spec["capture"]).rows(split="train")
            if len(r["completion_ids"]) and len(r["prompt_ids"]) < spec["max_seq_len"]]
    dataset = datasets.Dataset.from_list(
        [{"messages": list(r["prompt"]) + [{"role": "assistant", "content": r["completion_text"]}]} for r in rows]
    )
    budget = Budget(spec, model, heldout, pad_id, "trl")
    seen: dict[str, Any] = {}

    class CountingGKD(GKDTrainer):
        """GKDTrainer, unchanged, except that it counts the completion tokens each loss is taken over."""

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            seen["tokens"] = seen.get("tokens", 0) + int((inputs["labels"][:, 1:] != -100).sum())
            out = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            return out

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            seen["t0"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            tokens, seen["tokens"] = seen.get("tokens", 0), 0
            if budget.step(time.perf_counter() - seen["t0"], tokens):
                control.should_training_stop = True
            return control

    with warnings.catch_warnings():  # transformers 5 renamed gradient_checkpointing; TRL's config still sets it
        warnings.simplefilter("ignore", FutureWarning)
        args = GKDConfig(
            output_dir=str(Path(spec["work"]) / "trl-out"), lmbda=0.0, beta=spec["beta"], seq_kd=False,
            per_device_train_batch_size=spec["batch_size"], gradient_accumulation_steps=1, learning_rate=spec["lr"],
            lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr_rate": 0.1},
            warmup_steps=spec["warmup_steps"], max_steps=spec["max_steps"], weight_decay=0.0, adam_beta1=0.9,
            adam_beta2=0.95, max_grad_norm=1.0, max_length=spec["max_seq_len"], bf16=spec["trl_bf16"],
            gradient_checkpointing=spec["trl_gradient_checkpointing"], use_cpu=not torch.cuda.is_available(),
            save_strategy="no", report_to="none", disable_tqdm=True, logging_steps=10**9, seed=spec["seed"],
            dataloader_num_workers=0,
        )
    trainer = CountingGKD(model=model, teacher_model=spec["teacher_dir"], args=args, train_dataset=dataset,
                          processing_class=tokenizer, callbacks=[Clock()])
    trainer.remove_callback(PrinterCallback)  # its end-of-training dict on stdout; progress is ours
    teacher_dtype = str(next(trainer.teacher_model.parameters()).dtype)
    teacher_probe = output_dtype_probe(trainer.teacher_model, grad_only=False)
    budget.evaluate(0.0)
    trainer.train()
    settings = {k: getattr(args, k) for k in (
        "lmbda", "beta", "temperature", "seq_kd", "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs",
        "warmup_steps", "max_steps", "weight_decay", "adam_beta1", "adam_beta2", "optim", "max_grad_norm",
        "max_length", "bf16", "gradient_checkpointing", "per_device_train_batch_size", "disable_dropout")}
    settings["optim"] = str(getattr(settings["optim"], "value", settings["optim"]))
    return budget, {"settings": settings, "teacher_dtype": teacher_dtype,
                    "teacher_lm_head_dtype": teacher_probe.get("dtype"),
                    "train_rows": len(rows)}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    import transformers  # noqa: F401 -- imported before the RSS baseline, like every library below

    if spec["arm"] == "trl":
        import trl.experimental.gkd  # noqa: F401
    from potstill.evaluate.metrics import fidelity  # noqa: F401
    from potstill.utils import quiet_transformers, write_json

    quiet_transformers()
    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(spec["seed"])
    reset = reset_peak_rss()
    base = rss_mb()
    t_setup = time.perf_counter()

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(spec["init_dir"], dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(spec["init_dir"])
    pad_id = pad_token_id(tokenizer)
    heldout = _heldout(spec)
    run = {"potstill": run_potstill, "trl": run_trl}[spec["arm"]]
    probe = output_dtype_probe(model)
    budget, extra = run(spec, model, tokenizer, heldout, pad_id)
    extra["student_lm_head_dtype"] = probe.get("dtype")
    peak = peak_rss_mb()
    final = budget.evaluate(budget.train_s)
    total = time.perf_counter() - t_setup
    write_json(spec["result"], {
        "arm": spec["arm"],
        "steps": budget.steps,
        "completion_tokens": budget.tokens,
        "train_s": budget.train_s,
        "tokens_per_s": budget.tokens / budget.train_s if budget.train_s > 0 else 0.0,
        "first_step_s": budget.first_step_s,
        "cpu_s_after_step1": budget.cpu_s,
        "cpu_tokens_per_s": budget.cpu_tokens / budget.cpu_s if budget.cpu_s > 0 else None,
        "eval_paused_s": budget.paused,
        "process_s": total,
        "rss_after_imports_mb": base,
        "peak_rss_mb": peak,
        "peak_rss_delta_mb": peak - base,
        "peak_rss_reset": reset,
        "init": budget.curve[0],
        "final": final,
        "curve": budget.curve,
        **extra,
    })


if __name__ == "__main__":
    main(sys.argv[1])
