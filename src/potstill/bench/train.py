"""`potstill bench train`: potstill's trainer against TRL's GKDTrainer, same budget, same capture.

    potstill bench train --seconds 120            # capture made on the embedded teacher if none given
    potstill bench train --capture runs/cap --seconds 300 --beta 0.5

Both arms start from the same student init (built once from the teacher, saved, loaded by each),
learn the same loss (generalised JSD, beta; temperature 1: GKD's loss never tempers) on the same
training rows with the same batch size, max length, optimiser settings, lr schedule and bf16
autocast policy, each for the same wall-clock budget in a fresh process (see train_arms.py):

- potstill: `potstill.train.loop.train`, offline, on the capture's stored top-k + tail bucket;
- trl: `trl.experimental.gkd.GKDTrainer` with lmbda=0 (off-policy, on the captured completions
  as chat messages), the teacher run live, one forward pass per step.

Reports completion tokens trained per second, peak RSS above each process's post-import RSS, and
held-out KL(teacher||student) by `evaluate.metrics.fidelity` for both (also along the way, for
the plot). Writes JSON, a markdown table next to it, and a PNG of KL against time and tokens.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from potstill.utils import cpu_info

GOAL_SPEEDUP = 2.0  # issue #5: potstill >= 2x TRL's tokens/s at equal or lower held-out KL
NOTE = ("TRL's GKDTrainer runs the teacher live (one forward pass per step, full-vocabulary logits); "
        "potstill trains from the capture's stored top-k (no teacher in memory). Both: same student init, "
        "loss, data, batch size, optimiser, lr schedule, max length and bf16 autocast; held-out KL by the same "
        "function (fidelity, on the stored top-k + tail). Time spent measuring KL is not counted.")


def make_capture(teacher: str, out: Path, max_prompts: int, max_new_tokens: int, heldout: float, log) -> str:
    """The default capture: the builtin seed tasks answered by the teacher (reused when complete)."""
    from potstill.capture.generate import generate
    from potstill.config import GenerateConfig

    generate(GenerateConfig(teacher=teacher, prompts="builtin:seed_tasks", out=str(out), max_prompts=max_prompts,
                            max_new_tokens=max_new_tokens, heldout=heldout), log=log)
    return str(out)


def build_init(capture_dir: str, teacher: str, student: str, init_dir: Path, seed: int, max_seq_len: int) -> dict:
    """Build the student once (as `potstill train` would) and save it for both arms to load."""
    from potstill.capture.store import Capture
    from potstill.lm.loading import resolve_model_dir
    from potstill.students import build_student
    from potstill.train.data import examples_from_capture

    teacher_dir = resolve_model_dir(teacher)
    examples = examples_from_capture(Capture.open(capture_dir), split="train", max_seq_len=max_seq_len)
    model, tokenizer, info = build_student(student, teacher_dir, [e.input_ids.tolist() for e in examples[:32]],
                                           seed=seed)
    model.save_pretrained(init_dir)
    tokenizer.save_pretrained(init_dir)
    info = {**info, "params": sum(p.numel() for p in model.parameters())}
    del model
    gc.collect()
    return {"teacher_dir": str(teacher_dir), "info": info}


def run_arm(arm: str, spec: dict, work: Path, log) -> dict:
    """One arm in a fresh Python process; returns its result dict."""
    spec = {**spec, "arm": arm, "result": str(work / f"{arm}.json")}
    spec_path = work / f"{arm}-spec.json"
    spec_path.write_text(json.dumps(spec))
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    log(f"[{arm}] starting (fresh process, {spec['seconds']:.0f}s budget, load average {load})")
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "TOKENIZERS_PARALLELISM": "false",
           "TRL_EXPERIMENTAL_SILENCE": "1"}
    proc = subprocess.run([sys.executable, "-m", "potstill.bench.train_arms", str(spec_path)], env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"bench train: the {arm} arm failed (exit {proc.returncode})")
    result = json.loads(Path(spec["result"]).read_text())
    result["load_average_at_start"] = load
    return result


def bench_train(
    capture: str | None = None,
    teacher: str = "embedded",
    student: str = "prune:depth:0.5",
    seconds: float = 120.0,
    beta: float = 0.5,
    lr: float = 3e-4,
    warmup_steps: int = 10,
    max_steps: int = 100_000,
    batch_size: int = 8,
    max_seq_len: int = 512,
    bf16: str = "auto",
    trl_gradient_checkpointing: bool = False,
    threads: int = 1,
    eval_every: float | None = None,
    seed: int = 0,
    out_json: str | os.PathLike = "runs/bench/train.json",
    arms: tuple[str, ...] = ("potstill", "trl"),
    capture_prompts: int = 64,
    capture_tokens: int = 64,
    capture_heldout: float = 0.2,
    log=print,
) -> dict[str, Any]:
    """Run both arms and write JSON, markdown table and PNG (paths in the result's `artefacts`)."""
    import torch

    from potstill.capture.store import Capture
    from potstill.errors import PotstillError
    from potstill.train.loop import autocast_enabled

    out_json = Path(out_json)
    if capture is None:
        capture = make_capture(teacher, out_json.parent / "train-capture", capture_prompts, capture_tokens,
                               capture_heldout, log)
    cap = Capture.open(capture)
    if cap.text_only:
        raise PotstillError("bench train needs a capture with top-k log-probs, not a text-only one", where=capture)
    splits = cap.manifest.get("counts", {}).get("splits", {})
    if not splits.get("heldout", {}).get("rows"):
        raise PotstillError("bench train needs a held-out split (capture made with --heldout > 0)", where=capture)
    bf16_on = autocast_enabled(bf16, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    with tempfile.TemporaryDirectory(prefix="potstill-bench-train-") as tmp:
        work = Path(tmp)
        log(f"building the student init ({student}) once for both arms")
        init = build_init(capture, teacher, student, work / "init", seed, max_seq_len)
        spec = {
            "capture": str(capture), "teacher_dir": init["teacher_dir"], "init_dir": str(work / "init"),
            "student": student, "work": str(work), "seconds": float(seconds),
            "eval_every": float(eval_every or max(seconds / 6, 1.0)), "eval_batch_size": 8, "beta": beta,
            "lr": lr, "warmup_steps": warmup_steps, "max_steps": max_steps, "batch_size": batch_size,
            "max_seq_len": max_seq_len, "bf16": "on" if bf16_on else "off", "trl_bf16": bf16_on,
            "trl_gradient_checkpointing": trl_gradient_checkpointing, "threads": threads, "seed": seed,
        }
        results = {arm: run_arm(arm, spec, work, log) for arm in arms}
    result = {
        "bench": "train",
        "versions": _versions(),
        "machine": {"cpus": os.cpu_count(), "torch_threads": threads, "device": "cuda" if torch.cuda.is_available()
                    else "cpu", "cpu_capability": cpu_info()["capability"], "cpu_bf16": cpu_info()["bf16"], "note": "timings are distorted by other work on the machine; read the ratios"},
        "capture": {"path": str(capture), "teacher": (cap.manifest.get("teacher") or {}).get("name"),
                    "k": cap.manifest.get("k"), "codec": (cap.manifest.get("codec") or {}).get("name"),
                    "splits": splits},
        "student": {"spec": student, **init["info"]},
        "budget_s": float(seconds),
        "settings": {
            "common": {"loss": f"generalised JSD, beta={beta}, temperature 1 (GKD's loss takes no temperature)",
                       "batch_size": batch_size, "grad_accum": 1, "lr": lr,
                       "lr_schedule": f"linear warm-up {warmup_steps} steps, cosine to 10% at step {max_steps} "
                                      "(the budget ends first); HF's warm-up starts at lr 0 on step 1, "
                                      "potstill's at lr/warmup",
                       "budget": "checked after each optimizer step: a step begun inside the budget is finished",
                       "optimizer": "AdamW betas (0.9, 0.95), weight decay 0, grad-norm clip 1.0",
                       "max_seq_len": max_seq_len, "bf16_autocast": bf16_on, "master_weights": "float32",
                       "seed": seed, "threads": threads, "eval": "fidelity() on the capture's heldout split"},
            "potstill": {"trainer": "potstill.train.loop.train", "teacher_signal": "stored top-k + tail bucket",
                         "loss": "jsd", "beta": beta, "temperature": 1.0, "checkpoint_every": 0},
            "trl": {"trainer": "trl.experimental.gkd.GKDTrainer", "teacher_signal": "live teacher forward pass",
                    "data": "captured prompt + completion_text as chat messages (DataCollatorForChatML); "
                            "the chat template's end-of-turn tokens after each completion are learned too",
                    "temperature_note": "GKD's temperature only samples on-policy completions: unused at lmbda=0",
                    **results.get("trl", {}).pop("settings", {})},
        },
        "arms": results,
        "note": NOTE,
    }
    if "potstill" in results and "trl" in results:
        p, t = results["potstill"], results["trl"]
        speedup = p["tokens_per_s"] / t["tokens_per_s"] if t["tokens_per_s"] else None
        result["ratios"] = {
            "tokens_per_s_potstill_over_trl": speedup,
            "peak_rss_delta_potstill_over_trl": p["peak_rss_delta_mb"] / t["peak_rss_delta_mb"]
            if t["peak_rss_delta_mb"] > 0 else None,
            "cpu_tokens_per_s_potstill_over_trl": p["cpu_tokens_per_s"] / t["cpu_tokens_per_s"]
            if p["cpu_tokens_per_s"] and t["cpu_tokens_per_s"] else None,
            "final_kl_potstill_minus_trl": p["final"]["kl"] - t["final"]["kl"],
        }
        result["goal"] = {"speedup_at_least": GOAL_SPEEDUP, "met": bool(
            speedup is not None and speedup >= GOAL_SPEEDUP and p["final"]["kl"] <= t["final"]["kl"])}
    md, png = out_json.with_suffix(".md"), out_json.with_suffix(".png")
    result["artefacts"] = {"json": str(out_json), "markdown": str(md), "plot": str(png)}
    from potstill.utils import atomic_path, write_json

    plot(result, png)
    with atomic_path(md) as tmp:
        tmp.write_text(markdown_table(result) + "\n")
    write_json(out_json, result)
    return result


def _versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("potstill", "torch", "transformers", "trl", "accelerate"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def _rows(result: dict) -> list[list[str]]:
    arms = result["arms"]
    anchor = arms.get("trl")
    rows = []
    for name, a in arms.items():
        signal = "stored top-k" if name == "potstill" else "live teacher"
        ratio = f"{a['tokens_per_s'] / anchor['tokens_per_s']:.2f}" if anchor and anchor["tokens_per_s"] else "-"
        cpu = a.get("cpu_tokens_per_s")
        cpu_ratio = (f" (x{cpu / anchor['cpu_tokens_per_s']:.2f})" if cpu and anchor and anchor.get("cpu_tokens_per_s")
                     else "")
        rows.append([name, signal, str(a["steps"]), str(a["completion_tokens"]), f"{a['tokens_per_s']:.0f}", ratio,
                     f"{cpu:.0f}{cpu_ratio}" if cpu else "-",
                     f"{a['peak_rss_delta_mb']:.0f}", f"{a['init']['kl']:.4f} -> {a['final']['kl']:.4f}",
                     f"{a['final']['top1_agreement']:.3f}"])
    return rows


HEADER = ["arm", "teacher signal", "steps", "completion tokens", "tok/s", "x TRL", "tok/CPU-s", "peak RSS delta (MB)",
          "held-out KL init -> final", "top-1 agree"]


def _caption(result: dict) -> str:
    r = result.get("ratios")
    head = (f"{result['budget_s']:.0f}s per arm, {result['student']['spec']} student of {result['capture']['teacher']}, "
            f"{result['settings']['common']['loss']}, batch {result['settings']['common']['batch_size']}, "
            f"bf16 autocast {'on' if result['settings']['common']['bf16_autocast'] else 'off'}, "
            f"{result['machine']['torch_threads']} thread(s) on a shared {result['machine']['cpus']}-core machine"
            + (f" (CPU {result['machine']['cpu_capability']}, {'bf16' if result['machine'].get('cpu_bf16') else 'no bf16'})"
               if result["machine"].get("cpu_capability") else ""))
    if r:
        goal = result["goal"]
        cpu = r.get("cpu_tokens_per_s_potstill_over_trl")
        head += (f"; potstill/TRL tokens/s x{r['tokens_per_s_potstill_over_trl']:.2f}"
                 + (f" (per CPU-second x{cpu:.2f})" if cpu else "") + ", final KL difference "
                 f"{r['final_kl_potstill_minus_trl']:+.4f} (goal >= x{goal['speedup_at_least']:.0f} at <= KL: "
                 f"{'met' if goal['met'] else 'not met'})")
    return head


def markdown_table(result: dict) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row) + " |" for row in _rows(result)]
    return "\n".join([f"**potstill bench train**: {_caption(result)}", "", *lines, "", f"Note: {result['note']}"])


def rich_table(result: dict):
    from rich.table import Table

    table = Table(title="potstill bench train", caption=_caption(result) + "\n" + result["note"])
    for h in HEADER:
        table.add_column(h, justify="left" if h in ("arm", "teacher signal") else "right")
    for row in _rows(result):
        table.add_row(*row)
    return table


def plot(result: dict, path: Path) -> None:
    """KL(teacher||student) on the held-out split against training seconds and completion tokens."""
    from potstill.utils import pyplot

    plt = pyplot()

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, a in result["arms"].items():
        ts = [p["t"] for p in a["curve"]]
        toks = [p["tokens"] for p in a["curve"]]
        kls = [p["kl"] for p in a["curve"]]
        label = f"{name} ({a['tokens_per_s']:.0f} tok/s)"
        axes[0].plot(ts, kls, marker="o", label=label)
        axes[1].plot(toks, kls, marker="o", label=label)
    axes[0].axvline(result["budget_s"], color="grey", linestyle="--", linewidth=1, label="budget")
    axes[0].set_xlabel("training wall-clock (s, KL measurement excluded)")
    axes[1].set_xlabel("completion tokens trained")
    for ax in axes:
        ax.set_ylabel("held-out KL(teacher || student), nats/token")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"potstill vs TRL GKDTrainer: {result['student']['spec']} student, {result['budget_s']:.0f}s each")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    from potstill.utils import atomic_path

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


@click.command("train")
@click.option("--capture", default=None, help="Capture to train on (default: make one from the teacher, seed tasks).")
@click.option("--teacher", default="embedded", show_default=True, help="Teacher (student init and TRL's live teacher).")
@click.option("--student", default="prune:depth:0.5", show_default=True, help="Student spec, built once for both arms.")
@click.option("--seconds", default=120.0, show_default=True, help="Wall-clock training budget per arm.")
@click.option("--beta", default=0.5, show_default=True, help="Generalised JSD beta (TRL's default 0.5).")
@click.option("--lr", default=3e-4, show_default=True, help="Peak learning rate, both arms.")
@click.option("--warmup-steps", default=10, show_default=True, help="Linear warm-up steps, both arms.")
@click.option("--max-steps", default=100_000, show_default=True, help="Cosine schedule length (the budget ends first).")
@click.option("--batch-size", default=8, show_default=True, help="Sequences per step, both arms.")
@click.option("--max-seq-len", default=512, show_default=True, help="Max prompt+completion tokens, both arms.")
@click.option("--bf16", default="auto", show_default=True, help="bf16 autocast for both: auto, on, off.")
@click.option("--trl-gradient-checkpointing/--no-trl-gradient-checkpointing", default=False, show_default=True,
              help="TRL's SFT default is on; off matches potstill (no recomputation).")
@click.option("--threads", default=1, show_default=True, help="torch threads per arm.")
@click.option("--eval-every", default=None, type=float, help="Seconds between held-out KL points (default budget/6).")
@click.option("--arms", default="potstill,trl", show_default=True, help="Arms to run, in order.")
@click.option("--seed", default=0, show_default=True, help="Seed for both arms.")
@click.option("--out", default="runs/bench/train.json", show_default=True, help="JSON results (.md and .png beside).")
def bench_train_cmd(capture, teacher, student, seconds, beta, lr, warmup_steps, max_steps, batch_size, max_seq_len,
                    bf16, trl_gradient_checkpointing, threads, eval_every, arms, seed, out):
    """Training tokens/s, peak memory and held-out KL: potstill's trainer vs TRL's GKDTrainer."""
    from rich.console import Console

    from potstill.errors import PotstillError

    names = tuple(a.strip() for a in arms.split(",") if a.strip())
    if not names or set(names) - {"potstill", "trl"}:
        raise PotstillError(f"--arms: expected potstill and/or trl, got {arms!r}")
    if bf16 not in ("auto", "on", "off"):
        raise PotstillError(f"--bf16: expected auto, on or off, got {bf16!r}")
    if seconds <= 0 or batch_size < 1 or not 0.0 <= beta <= 1.0:
        raise PotstillError("--seconds > 0, --batch-size >= 1 and 0 <= --beta <= 1")
    if capture is not None and not (Path(capture) / "manifest.json").exists():
        raise PotstillError("not a capture directory (no manifest.json)", where=capture)
    t0 = time.perf_counter()
    result = bench_train(capture, teacher, student, seconds, beta, lr, warmup_steps, max_steps, batch_size,
                         max_seq_len, bf16, trl_gradient_checkpointing, threads, eval_every, seed, out, names,
                         log=lambda msg: click.echo(msg, err=True))
    Console(width=None if sys.stdout.isatty() else 160).print(rich_table(result))
    click.echo(f"wrote {out}, {result['artefacts']['markdown']}, {result['artefacts']['plot']} "
               f"({time.perf_counter() - t0:.0f}s in all)")


def register(bench_group: click.Group) -> None:
    bench_group.add_command(bench_train_cmd)
