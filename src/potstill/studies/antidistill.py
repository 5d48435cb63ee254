"""`potstill study antidistill`: what anti-distillation sampling costs the teacher and the distiller.

    potstill study antidistill --target-costs 0.02 --target-costs 0.05 --out runs/study-antidistill

One prompt set with reference answers, split (seeded, as `generate` splits it) into the prompts the
teacher answers and a held-out part. The references of the answered prompts are the protect set
(guard/antidistill.py: the downstream loss the owner protects); the proxy is the student
architecture built from the teacher as `train` builds it (default `prune:depth:0.5`). Arms:

- `clean`: temperature 1, no tilt (the reference point of both costs);
- `lambda=L`: temperature 1, tilted by L * Delta (anti-distillation sampling);
- `T=t`: temperature t, no tilt (the baseline: a hotter teacher also teaches worse).

For each `--target-costs` c, one L and one t are calibrated (bisection on the teacher-forced held-out
reference NLL, computed once) so that both cost the teacher c nats: the comparison the goal asks for.
`--lambdas` / `--temperatures` add arms at given values.

Each arm captures the teacher's answers (`generate`, top-k log-probs of the distribution sampled from)
and distils one student from the same initial weights with the same recipe and budget (`train`).
Teacher cost: the rise in held-out reference NLL under the distribution the arm samples from
(softmax((logits + L * Delta) / t), teacher-forced), against `clean`. Student loss: the rise in the
distilled student's held-out reference NLL against the `clean` arm's student. The goal (issue 17): at
teacher cost <= `max_teacher_cost`, a tilt's student loss >= 3x the temperature baseline's at the same
teacher cost (the temperature curve interpolated linearly in teacher cost, through `clean` at 0).
Serving cost: completion tok/s of each arm's capture in the same run. Writes results.json, table.md
and tradeoff.png under --out.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from potstill.config import GenerateConfig, TrainConfig, derive, opt
from potstill.errors import PotstillError


@dataclass
class AntidistillStudyConfig:
    teacher: str = derive(GenerateConfig, "teacher", note="A local one (the tilt needs its logits).")
    prompts: str = derive(GenerateConfig, "prompts", "builtin:seed_tasks", "The study needs reference answers (`output`).")
    out: str = opt("runs/study-antidistill", "Output directory (proxy, captures, students, results.json, table.md, PNG).")
    proxy: str = opt("prune:depth:0.5", "Proxy = student architecture, built from the teacher as train builds it.")
    target_costs: list[float] = opt([0.02, 0.05], "Teacher costs (nats of held-out reference NLL) at which one lambda "
                                    "and one temperature are calibrated (teacher-forced) and measured.")
    lambdas: list[float] = opt([], "Extra anti-distillation tilts (lambda) to measure.")
    temperatures: list[float] = opt([], "Extra temperature baselines (no tilt).")
    eps: float = opt(1e-3, "Finite-difference step of Delta.")
    max_prompts: int | None = derive(GenerateConfig, "max_prompts", 96)
    heldout: float = derive(GenerateConfig, "heldout", 0.25, "Teacher cost and student quality are measured on it.")
    max_new_tokens: int = derive(GenerateConfig, "max_new_tokens", 48)
    top_k: int = derive(GenerateConfig, "top_k", note="What the distiller sees.")
    loss: str = derive(TrainConfig, "loss", note="Of every student.")
    max_steps: int = derive(TrainConfig, "max_steps", 30, "The same for every arm.")
    batch_size: int = derive(TrainConfig, "batch_size", 4)
    lr: float = derive(TrainConfig, "lr", 1e-4, "Constant after warm-up in this study.")
    max_seq_len: int = derive(TrainConfig, "max_seq_len", 192)
    gen_batch_size: int = derive(GenerateConfig, "batch_size", 16)
    max_teacher_cost: float = opt(0.05, "Goal: teacher cost (nats of reference NLL) at which student losses are compared.")
    seed: int = derive(GenerateConfig, "seed", note="Also of the data order.")

    def __post_init__(self) -> None:
        self.lambdas = [float(x) for x in self.lambdas]
        self.temperatures = [float(x) for x in self.temperatures]
        self.target_costs = [float(x) for x in self.target_costs]
        if any(x <= 0 for x in self.lambdas + self.temperatures + self.target_costs):
            raise PotstillError("study antidistill: lambdas, temperatures and target costs must be > 0")
        if self.max_steps < 1 or self.batch_size < 1 or not 0 < self.heldout < 1:
            raise PotstillError("study antidistill: max_steps, batch_size >= 1 and heldout in (0, 1)")

    def arms(self, lambdas: list[float], temperatures: list[float]) -> list[tuple[str, float, float]]:
        """(name, lambda, temperature) of every arm, `clean` first, each once."""
        arms = ([("clean", 0.0, 1.0)] + [(f"lambda={x:.3g}", x, 1.0) for x in self.lambdas + lambdas]
                + [(f"T={t:.3g}", 0.0, t) for t in self.temperatures + temperatures])
        return list({name: (name, lam, t) for name, lam, t in arms}.values())


def split_prompts(cfg: AntidistillStudyConfig):
    """(answered prompts, held-out prompts), exactly as `generate` splits them."""
    from potstill.capture.prompts import assign_split, dedupe, load_prompts

    prompts = dedupe(load_prompts(cfg.prompts))[0]
    prompts = [p for p in prompts if p.reference][: cfg.max_prompts] if cfg.max_prompts else [p for p in prompts if p.reference]
    if len(prompts) < 8:
        raise PotstillError(f"study antidistill: {len(prompts)} prompts with references; need >= 8", where=cfg.prompts)
    splits = assign_split(prompts, cfg.heldout, cfg.seed)
    return ([p for p, s in zip(prompts, splits, strict=True) if s != "heldout"],
            [p for p, s in zip(prompts, splits, strict=True) if s == "heldout"])


def write_prompts(path: Path, prompts) -> Path:
    from potstill.utils import atomic_path

    with atomic_path(path) as tmp:
        tmp.write_text("".join(json.dumps({"messages": p.messages, "reference": p.reference}) + "\n" for p in prompts))
    return path


class ReferenceScores:
    """The teacher's logits and Delta at every held-out reference token, computed once (teacher-forced), so the
    NLL of the references under any (lambda, temperature) is a log-softmax away."""

    def __init__(self, teacher, proc, prompts):
        import torch

        from potstill.capture.generate import answer_ids, end_of_turn_ids

        stop = end_of_turn_ids(teacher.tokenizer, teacher.model.generation_config)
        logits, deltas, targets = [], [], []
        with torch.no_grad():
            for p in prompts:
                prompt = teacher.encode_chat(p.messages)
                ids = prompt + answer_ids(teacher.tokenizer, p.messages, p.reference, prompt, stop)
                logits.append(teacher.model(input_ids=torch.tensor([ids])).logits[0, len(prompt) - 1 : len(ids) - 1].float())
                deltas.append(proc.delta_forced(ids, len(prompt)))
                targets += ids[len(prompt) :]
        self.logits, self.delta = torch.cat(logits), torch.cat(deltas)
        self.targets = torch.tensor(targets)[:, None]
        self.v = min(self.logits.shape[1], self.delta.shape[1])

    def nll(self, lam: float, temperature: float) -> float:
        """Per-token NLL of the references under softmax((teacher logits + lam * Delta) / temperature)."""
        import torch

        x = self.logits.clone()
        x[:, : self.v] += lam * self.delta[:, : self.v]
        return -float(torch.log_softmax(x / temperature, -1).gather(1, self.targets).mean())


def calibrate(cost, target: float, lo: float, hi: float, steps: int = 20) -> float:
    """The knob value in [lo, hi] whose cost is `target` (bisection in log space; cost rising with the knob)."""
    import math

    a, b = math.log(lo), math.log(hi)
    for _ in range(steps):
        mid = (a + b) / 2
        if cost(math.exp(mid)) < target:
            a = mid
        else:
            b = mid
    return math.exp((a + b) / 2)


def run_antidistill(cfg: AntidistillStudyConfig, log=print) -> dict[str, Any]:
    """Every arm: capture, teacher cost, distilled student; write results.json / table.md / tradeoff.png."""
    from potstill.capture.generate import generate
    from potstill.config import AntidistillConfig, GenerateConfig, TrainConfig
    from potstill.evaluate.metrics import reference_nll
    from potstill.guard.antidistill import AntidistillProcessor
    from potstill.students import build_student
    from potstill.teachers.hf import HFTeacher
    from potstill.train.loop import train
    from potstill.utils import quiet_transformers

    quiet_transformers()
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    answered, heldout = split_prompts(cfg)
    prompts_file = write_prompts(out / "prompts.jsonl", answered + heldout)
    protect_file = write_prompts(out / "protect.jsonl", answered)
    teacher = HFTeacher.load(cfg.teacher, dtype="float32")
    log(f"[antidistill] {len(answered)} answered prompts (their references: the protect set), {len(heldout)} held out")

    proxy_dir = out / "proxy"
    calibration = [teacher.encode_chat(p.messages) for p in answered[:32]]
    base, tok, info = build_student(cfg.proxy, teacher.model_dir, calibration, seed=cfg.seed)
    base.save_pretrained(proxy_dir)  # what every tilted capture's processor loads
    tok.save_pretrained(proxy_dir)
    proc = AntidistillProcessor(copy.deepcopy(base), tok, answered, lam=1.0, eps=cfg.eps)
    log(f"[antidistill] proxy {cfg.proxy}: {info.get('params', 0):,} params; protect loss {proc.protect_loss:.3f}, "
        f"|g| {proc.grad_norm:.3g}")
    scores = ReferenceScores(teacher, proc, heldout)
    clean_nll = scores.nll(0.0, 1.0)
    lambdas = [calibrate(lambda x: scores.nll(x, 1.0) - clean_nll, c, 1e-5, 1e3) for c in cfg.target_costs]
    temps = [calibrate(lambda t: scores.nll(0.0, 1.0 + t) - clean_nll, c, 1e-5, 10.0) + 1.0 for c in cfg.target_costs]
    for c, lam, t in zip(cfg.target_costs, lambdas, temps, strict=True):
        got = (scores.nll(lam, 1.0) - clean_nll, scores.nll(0.0, t) - clean_nll)
        if max(abs(g - c) for g in got) > 0.2 * c:
            log(f"[antidistill] warning: teacher cost {c} not reached (lambda {lam:.4g}: {got[0]:+.4f}, T {t:.4g}: {got[1]:+.4f})")
    log(f"[antidistill] clean reference NLL {clean_nll:.4f} ({len(scores.targets)} tokens); for teacher costs "
        f"{cfg.target_costs}: lambda {[round(x, 4) for x in lambdas]}, T {[round(t, 4) for t in temps]}")

    arms: list[dict[str, Any]] = []
    for name, lam, temp in cfg.arms(lambdas, temps):
        arm_dir = out / "arms" / name.replace("=", "")
        t0 = time.perf_counter()
        ad = AntidistillConfig(lam, str(proxy_dir), str(protect_file), cfg.eps) if lam else AntidistillConfig()
        gcfg = GenerateConfig(teacher=cfg.teacher, prompts=str(prompts_file), out=str(arm_dir / "capture"),
                              max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, heldout=cfg.heldout,
                              batch_size=cfg.gen_batch_size, temperature=temp, seed=cfg.seed, dtype="float32",
                              **{k: v for k, v in asdict(ad).items()})
        manifest = generate(gcfg, teacher=teacher, log=lambda line: None)
        gen_s = time.perf_counter() - t0
        cost = scores.nll(lam, temp) - clean_nll
        tcfg = TrainConfig(capture=str(arm_dir / "capture"), out=str(arm_dir / "student"), teacher=str(teacher.model_dir),
                           student=cfg.proxy, loss=cfg.loss, lr=cfg.lr, warmup_steps=2, max_steps=cfg.max_steps,
                           batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len, checkpoint_every=0, seed=cfg.seed,
                           lr_schedule="constant")
        student = copy.deepcopy(base)  # the same initial weights for every arm
        summary = train(tcfg, log=lambda line: None, model=student, tokenizer=tok, student_info=info)
        row = reference_nll(student, tok, heldout) or {}
        for f in (arm_dir / "student").glob("*.safetensors"):
            f.unlink()
        arms.append({"arm": name, "lambda": lam, "temperature": temp, "teacher_nll": clean_nll + cost,
                     "teacher_cost": cost, "student_nll": row.get("nll_reference"),
                     "gen_tokens_per_s": manifest["this_run"]["completion_tokens_per_s"],
                     "gen_seconds": round(gen_s, 1), "completion_tokens": manifest.get("counts", {}).get("completion_tokens"),
                     "train_tokens_per_s": summary.get("train_tokens_per_s"),
                     "student_seconds": round(time.perf_counter() - t0 - gen_s, 1)})
        log(f"[antidistill] {name}: teacher cost {cost:+.4f} nats, student NLL {arms[-1]['student_nll']:.4f}, "
            f"{arms[-1]['gen_tokens_per_s']} tok/s ({fmt(time.perf_counter() - t_start)} so far)")
        del student
    result = summarize(cfg, arms, clean_nll, proc)
    result["seconds"] = round(time.perf_counter() - t_start, 1)
    from potstill.studies.antidistill_report import write_outputs

    write_outputs(result, out)
    return result


def best_tilt(arms: list[dict[str, Any]], max_cost: float) -> dict[str, Any] | None:
    """The tilted arm with the largest student-loss ratio among those costing the teacher <= `max_cost`
    (calibrated arms land on it up to the bisection's precision, hence the 0.1 % slack)."""
    ok = [a for a in arms if a["lambda"] and a["teacher_cost"] <= max_cost * 1.001
          and a.get("ratio_vs_temperature") is not None]
    return max(ok, key=lambda a: a["ratio_vs_temperature"], default=None)


def fmt(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def summarize(cfg: AntidistillStudyConfig, arms: list[dict[str, Any]], clean_nll: float, proc) -> dict[str, Any]:
    """Student losses against `clean`, the temperature baseline at each tilt's teacher cost, and the goal."""
    import numpy as np

    clean = next(a for a in arms if a["arm"] == "clean")
    for a in arms:
        a["student_loss"] = a["student_nll"] - clean["student_nll"]
    temps = sorted([(0.0, 0.0)] + [(a["teacher_cost"], a["student_loss"]) for a in arms if a["temperature"] != 1.0])
    xs, ys = np.array([t[0] for t in temps]), np.array([t[1] for t in temps])
    for a in arms:
        if a["lambda"]:
            c = a["teacher_cost"]
            inside = xs.min() <= c <= xs.max()
            base = float(np.interp(c, xs, ys)) if inside else None
            a["temperature_student_loss_at_cost"] = base
            a["ratio_vs_temperature"] = (a["student_loss"] / base if base and base > 0 else None)
    best = best_tilt(arms, cfg.max_teacher_cost)
    clean_rate = clean["gen_tokens_per_s"]
    tilted_rates = [a["gen_tokens_per_s"] for a in arms if a["lambda"]]
    return {
        "study": "antidistill", "config": asdict(cfg), "clean_teacher_nll": clean_nll, "arms": arms,
        "proxy": {"spec": cfg.proxy, "protect_loss": proc.protect_loss, "grad_norm": proc.grad_norm,
                  "protect_references": proc.protect_count},
        "serving": {"clean_tokens_per_s": clean_rate,
                    "antidistill_tokens_per_s": float(np.mean(tilted_rates)) if tilted_rates else None,
                    "slowdown": clean_rate / float(np.mean(tilted_rates)) if tilted_rates else None},
        "goal": {"max_teacher_cost": cfg.max_teacher_cost, "needed_ratio": 3.0,
                 "best_arm": best["arm"] if best else None,
                 "best_ratio": best["ratio_vs_temperature"] if best else None,
                 "reached": bool(best and best["ratio_vs_temperature"] >= 3.0),
                 "note": "one student per arm (n = 1 seed); no interval: a single-seed reading"},
    }
