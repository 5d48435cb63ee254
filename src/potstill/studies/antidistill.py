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

`--warm-steps S`: before the arms, the proxy architecture is distilled from the clean teacher for S steps
(a clean capture of the answered prompts at its own sampling seed, `generate` + `train` as the arms do);
that warm model is both the proxy and every arm's initial student (the distiller already has a decent
student and fine-tunes it on the served outputs; the owner's proxy is such a student too).
`--seeds N`: N paired repetitions (sampling seed and data order `seed + i`), with the same split, warm
model, proxy and calibrated lambda / T; per arm the mean student loss with its 95 % t-interval over
seeds, the paired difference tilt - temperature at equal cost with its t-interval, and the ratio of
means (the goal's reading).

First-order diagnostic (`first_order` in results.json): on the held-out references, E_ref[Delta] (Delta
of each reference token) and E_{p_teacher}[Delta] (Delta averaged under the clean teacher), per token.
The tilt's teacher cost is lambda * (E_{p_teacher}[Delta] - E_ref[Delta]) + O(lambda^2), while a student
starting at the proxy's weights and fitting the tilted targets loses ~ lambda * (-E_ref[Delta]): where
the two expectations agree the teacher's cost is second order and the student's loss first order.
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
    seed: int = derive(GenerateConfig, "seed", note="Also of the data order; seed i of --seeds uses seed + i.")
    warm_steps: int = opt(0, "Distil the proxy architecture from the clean teacher this many steps first (its own "
                          "capture); that warm model is the proxy and every arm's initial student. 0: freshly built.")
    first_rep: int = opt(0, "Index of the first repetition (seed + i): adds repetitions to an earlier run of the same "
                         "settings (same split, warm model and calibration) in another --out.")
    seeds: int = opt(1, "Paired repetitions of every arm (own sampling seed and data order; same split, proxy, "
                     "lambda and T); > 1 gives 95 % t-intervals over seeds.")
    eval_steps: list[int] = opt([], "Also measure every student's held-out NLL after these many steps of its run "
                                "(each < max-steps): student losses and the ratio by the distiller's training steps.")

    def __post_init__(self) -> None:
        self.lambdas = [float(x) for x in self.lambdas]
        self.temperatures = [float(x) for x in self.temperatures]
        self.target_costs = [float(x) for x in self.target_costs]
        self.eval_steps = sorted({int(x) for x in self.eval_steps})
        if any(not 0 < x < self.max_steps for x in self.eval_steps):
            raise PotstillError(f"study antidistill: eval_steps must lie in [1, max_steps), got {self.eval_steps}")
        if any(x <= 0 for x in self.lambdas + self.temperatures + self.target_costs):
            raise PotstillError("study antidistill: lambdas, temperatures and target costs must be > 0")
        if self.max_steps < 1 or self.batch_size < 1 or not 0 < self.heldout < 1:
            raise PotstillError("study antidistill: max_steps, batch_size >= 1 and heldout in (0, 1)")
        if self.seeds < 1 or self.warm_steps < 0 or self.first_rep < 0:
            raise PotstillError("study antidistill: seeds must be >= 1, warm_steps and first_rep >= 0")

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

    def first_order(self, h: float = 1e-3) -> dict[str, float]:
        """E_ref[Delta] and E_{p_teacher}[Delta] per reference token (module doc), their difference (the slope
        d teacher cost / d lambda at 0) and that slope by central finite differences of `nll`, as a check."""
        import torch

        d = self.delta[:, : self.v]
        e_ref = float(d.gather(1, self.targets).mean())
        e_teacher = float((torch.softmax(self.logits, -1)[:, : self.v] * d).sum(1).mean())
        slope = e_teacher - e_ref
        return {"tokens": len(self.targets), "e_ref_delta": e_ref, "e_teacher_delta": e_teacher,
                "teacher_cost_slope": slope, "teacher_cost_slope_fd": (self.nll(h, 1.0) - self.nll(-h, 1.0)) / (2 * h),
                "student_loss_slope": -e_ref,
                "cost_over_student_slope": slope / -e_ref if e_ref else None}

    def target_shift(self, lam: float, temperature: float) -> float:
        """E_q[Delta] - E_p[Delta] per held-out reference position, q = softmax((logits + lam * Delta) / temperature),
        p the clean teacher: to first order, how much one distillation step on q's targets instead of p's raises the
        proxy's protect loss (in units of lr * |g|), the targets' share of a student's loss, without training."""
        import torch

        d = self.delta[:, : self.v]
        p = torch.softmax(self.logits[:, : self.v], -1)
        x = self.logits[:, : self.v] + lam * d
        q = torch.softmax(x / temperature, -1)
        return float(((q - p) * d).sum(-1).mean())


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


WARM_SEED_OFFSET = 7919  # the warm capture's sampling seed is seed + this: none of the arms' seeds


def run_antidistill(cfg: AntidistillStudyConfig, log=print) -> dict[str, Any]:
    """Every arm and seed: capture, teacher cost, distilled student; write results.json / table.md / tradeoff.png."""
    from potstill.guard.antidistill import AntidistillProcessor
    from potstill.students import build_student
    from potstill.studies.antidistill_report import write_outputs
    from potstill.teachers.hf import HFTeacher
    from potstill.utils import quiet_transformers

    quiet_transformers()
    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    answered, heldout = split_prompts(cfg)
    prompts_file = write_prompts(out / "prompts.jsonl", answered)  # every capture answers these (split done here)
    protect_file = write_prompts(out / "protect.jsonl", answered)
    teacher = HFTeacher.load(cfg.teacher, dtype="float32")
    log(f"[antidistill] {len(answered)} answered prompts (their references: the protect set), {len(heldout)} held out")

    proxy_dir = out / "proxy"
    calibration = [teacher.encode_chat(p.messages) for p in answered[:32]]
    base, tok, info = build_student(cfg.proxy, teacher.model_dir, calibration, seed=cfg.seed)
    warm = None
    if cfg.warm_steps:
        warm = warm_start(cfg, teacher, base, tok, info, prompts_file, heldout, out / "warm", log)
    base.save_pretrained(proxy_dir)  # what every tilted capture's processor loads (and, warm, every arm's init)
    tok.save_pretrained(proxy_dir)
    if warm:
        warm["dir"] = str(proxy_dir)
    proc = AntidistillProcessor(copy.deepcopy(base), tok, answered, lam=1.0, eps=cfg.eps)
    log(f"[antidistill] proxy {cfg.proxy}{' (warm)' if warm else ''}: {info.get('params', 0):,} params; protect loss "
        f"{proc.protect_loss:.3f}, |g| {proc.grad_norm:.3g}")
    scores = ReferenceScores(teacher, proc, heldout)
    clean_nll = scores.nll(0.0, 1.0)
    first = scores.first_order()
    log(f"[antidistill] first order on {first['tokens']} held-out reference tokens: E_ref[Delta] {first['e_ref_delta']:+.4f}, "
        f"E_teacher[Delta] {first['e_teacher_delta']:+.4f}, difference (teacher cost per lambda) "
        f"{first['teacher_cost_slope']:+.4f} (finite difference {first['teacher_cost_slope_fd']:+.4f}); "
        f"student loss per lambda ~ {first['student_loss_slope']:+.4f}")
    lambdas = [calibrate(lambda x: scores.nll(x, 1.0) - clean_nll, c, 1e-5, 1e3) for c in cfg.target_costs]
    temps = [calibrate(lambda t: scores.nll(0.0, 1.0 + t) - clean_nll, c, 1e-5, 10.0) + 1.0 for c in cfg.target_costs]
    for c, lam, t in zip(cfg.target_costs, lambdas, temps, strict=True):
        got = (scores.nll(lam, 1.0) - clean_nll, scores.nll(0.0, t) - clean_nll)
        if max(abs(g - c) for g in got) > 0.2 * c:
            log(f"[antidistill] warning: teacher cost {c} not reached (lambda {lam:.4g}: {got[0]:+.4f}, T {t:.4g}: {got[1]:+.4f})")
    log(f"[antidistill] clean reference NLL {clean_nll:.4f} ({len(scores.targets)} tokens); for teacher costs "
        f"{cfg.target_costs}: lambda {[round(x, 4) for x in lambdas]}, T {[round(t, 4) for t in temps]}")
    first["target_shift"] = [{"teacher_cost": c, "lambda": lam, "temperature": t, "tilt": scores.target_shift(lam, 1.0),
                              "temperature_shift": scores.target_shift(0.0, t)}
                             for c, lam, t in zip(cfg.target_costs, lambdas, temps, strict=True)]
    for r in first["target_shift"]:
        log(f"[antidistill] targets' first-order push on the protect loss at teacher cost {r['teacher_cost']}: tilt "
            f"{r['tilt']:+.4f}, temperature {r['temperature_shift']:+.4f} (E_q[Delta] - E_p[Delta] per position)")

    arms: list[dict[str, Any]] = []
    for i in range(cfg.first_rep, cfg.first_rep + cfg.seeds):
        seed = cfg.seed + i
        for name, lam, temp in cfg.arms(lambdas, temps):
            arm_dir = out / "arms" / (f"seed{seed}" if cfg.seeds > 1 or cfg.first_rep else "") / name.replace("=", "")
            t0 = time.perf_counter()
            at: dict[str, float] = {}
            student, manifest, summary, gen_s = distil(cfg, teacher, base, tok, info, prompts_file, arm_dir, lam, temp,
                                                       seed, cfg.max_steps, proxy_dir, protect_file,
                                                       on_step=nll_at_steps(cfg.eval_steps, tok, heldout, at))
            cost = scores.nll(lam, temp) - clean_nll
            at[str(cfg.max_steps)] = student_nll(student, tok, heldout)
            arms.append({"arm": name, "seed": seed, "lambda": lam, "temperature": temp, "teacher_nll": clean_nll + cost,
                         "teacher_cost": cost, "student_nll": at[str(cfg.max_steps)], "student_nll_at": at,
                         "gen_tokens_per_s": manifest["this_run"]["completion_tokens_per_s"],
                         "gen_seconds": round(gen_s, 1), "completion_tokens": manifest.get("counts", {}).get("completion_tokens"),
                         "train_tokens_per_s": summary.get("train_tokens_per_s"),
                         "student_seconds": round(time.perf_counter() - t0 - gen_s, 1)})
            log(f"[antidistill] seed {seed} {name}: teacher cost {cost:+.4f} nats, student NLL {arms[-1]['student_nll']:.4f}, "
                f"{arms[-1]['gen_tokens_per_s']} tok/s ({fmt(time.perf_counter() - t_start)} so far)")
            del student
        result = summarize(cfg, copy.deepcopy(arms), clean_nll, proc)  # after every seed: a stopped run keeps its seeds
        result["first_order"], result["warm"] = first, warm
        result["seconds"] = round(time.perf_counter() - t_start, 1)
        write_outputs(result, out)
    return result


def nll_at_steps(steps: list[int], tok, heldout, into: dict[str, float]):
    """A train `on_step` that puts the student's held-out reference NLL after each of `steps` into `into`."""
    if not steps:
        return None
    def on_step(metrics, model) -> bool:
        if metrics["step"] in steps:  # steps done so far (a study's run never resumes)
            was = model.training
            into[str(metrics["step"])] = student_nll(model, tok, heldout)
            model.train(was)
        return False

    return on_step


def distil(cfg: AntidistillStudyConfig, teacher, init, tok, info, prompts_file: Path, arm_dir: Path, lam: float,
           temp: float, seed: int, steps: int, proxy_dir: Path | None = None, protect_file: Path | None = None,
           on_step=None):
    """One arm: capture the answered prompts (tilt `lam`, temperature `temp`, sampling seed `seed`), then distil a
    copy of `init` on it for `steps` steps (data order `seed`); (student, manifest, train summary, capture seconds)."""
    from potstill.capture.generate import generate
    from potstill.config import AntidistillConfig, GenerateConfig, TrainConfig
    from potstill.train.loop import train

    t0 = time.perf_counter()
    ad = AntidistillConfig(lam, str(proxy_dir), str(protect_file), cfg.eps) if lam else AntidistillConfig()
    gcfg = GenerateConfig(teacher=cfg.teacher, prompts=str(prompts_file), out=str(arm_dir / "capture"),
                          max_new_tokens=cfg.max_new_tokens, top_k=cfg.top_k, heldout=0.0,
                          batch_size=cfg.gen_batch_size, temperature=temp, seed=seed, dtype="float32",
                          **{k: v for k, v in asdict(ad).items()})
    manifest = generate(gcfg, teacher=teacher, log=lambda line: None)
    gen_s = time.perf_counter() - t0
    tcfg = TrainConfig(capture=str(arm_dir / "capture"), out=str(arm_dir / "student"), teacher=str(teacher.model_dir),
                       student=cfg.proxy, loss=cfg.loss, lr=cfg.lr, warmup_steps=2, max_steps=steps,
                       batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len, checkpoint_every=0, seed=seed,
                       lr_schedule="constant")
    student = copy.deepcopy(init)  # the same initial weights for every arm
    summary = train(tcfg, log=lambda line: None, model=student, tokenizer=tok, student_info=info, on_step=on_step)
    for f in (arm_dir / "student").glob("*.safetensors"):
        f.unlink()
    return student, manifest, summary, gen_s


def student_nll(model, tok, heldout) -> float | None:
    from potstill.evaluate.metrics import reference_nll

    return (reference_nll(model, tok, heldout) or {}).get("nll_reference")


def warm_start(cfg: AntidistillStudyConfig, teacher, base, tok, info, prompts_file: Path, heldout, warm_dir: Path,
               log) -> dict[str, Any]:
    """Distil `base` (in place) from a clean capture at seed + WARM_SEED_OFFSET for `warm_steps` steps."""
    t0 = time.perf_counter()
    seed = cfg.seed + WARM_SEED_OFFSET
    init_nll = student_nll(base, tok, heldout)
    warm, manifest, summary, gen_s = distil(cfg, teacher, base, tok, info, prompts_file, warm_dir, 0.0, 1.0, seed,
                                            cfg.warm_steps)
    base.load_state_dict(warm.state_dict())
    record = {"steps": cfg.warm_steps, "seed": seed, "student_nll_before": init_nll,
              "student_nll": student_nll(base, tok, heldout),
              "completion_tokens": manifest.get("counts", {}).get("completion_tokens"),
              "seconds": round(time.perf_counter() - t0, 1), "capture_seconds": round(gen_s, 1)}
    log(f"[antidistill] warm start: {cfg.warm_steps} steps from the clean teacher (seed {seed}): held-out reference NLL "
        f"{init_nll:.4f} -> {record['student_nll']:.4f} ({fmt(record['seconds'])})")
    return record


def best_tilt(rows: list[dict[str, Any]], max_cost: float) -> dict[str, Any] | None:
    """The tilted arm (an `aggregate` row) the goal reads, among those costing the teacher <= `max_cost`
    (calibrated arms land on it up to the bisection's precision, hence the 0.1 % slack) whose temperature
    baseline is bracketed: the largest ratio of mean student losses; if no baseline's mean loss is > 0 (no
    ratio), the largest paired difference tilt - temperature."""
    ok = [a for a in rows if a["lambda"] and a["teacher_cost"] <= max_cost * 1.001 and a.get("vs_temperature")]
    ratios = [a for a in ok if a.get("ratio_of_means") is not None]
    if ratios:
        return max(ratios, key=lambda a: a["ratio_of_means"])
    return max(ok, key=lambda a: a["vs_temperature"]["mean"], default=None)


def goal_reached(best: dict[str, Any] | None) -> bool:
    """Student loss >= 3x the temperature baseline's: on the ratio of means when the baseline's mean loss is > 0;
    when it is <= 0, a positive mean loss whose paired difference's 95 % interval lies above 0 (n >= 2)."""
    if not best:
        return False
    if best.get("ratio_of_means") is not None:
        return best["ratio_of_means"] >= 3.0
    low = best["vs_temperature"]["low"]
    return bool(best["student_loss_mean"] > 0 and low is not None and low > 0)


def fmt(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


def student_losses(arms: list[dict[str, Any]]) -> None:
    """Per seed: each arm's student loss against that seed's `clean` student, and for each tilted arm the
    temperature baseline's loss at its teacher cost (that seed's temperature curve, linear in teacher cost
    through `clean` at 0; None outside the costs the temperature arms bracket) and the per-seed ratio."""
    import numpy as np

    for seed in dict.fromkeys(a.get("seed", 0) for a in arms):
        rows = [a for a in arms if a.get("seed", 0) == seed]
        clean = next(a for a in rows if a["arm"] == "clean")
        for a in rows:
            a["student_loss"] = a["student_nll"] - clean["student_nll"]
        temps = sorted([(0.0, 0.0)] + [(a["teacher_cost"], a["student_loss"]) for a in rows if a["temperature"] != 1.0])
        xs, ys = np.array([t[0] for t in temps]), np.array([t[1] for t in temps])
        for a in rows:
            if a["lambda"]:
                c = a["teacher_cost"]
                base = float(np.interp(c, xs, ys)) if xs.min() <= c <= xs.max() else None
                a["temperature_student_loss_at_cost"] = base
                a["ratio_vs_temperature"] = a["student_loss"] / base if base and base > 0 else None


def aggregate(arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per arm over its seeds (rows with `student_loss`, `student_losses` run first): mean student loss
    with its 95 % t-interval (n seeds); for a tilt, the paired difference tilt - temperature baseline at equal
    teacher cost with its t-interval, and the ratio of the mean losses (None unless the baseline's mean > 0)."""
    import numpy as np

    from potstill.studies.antidistill_http import paired_difference

    out = []
    for name in dict.fromkeys(a["arm"] for a in arms):
        rows = sorted((a for a in arms if a["arm"] == name), key=lambda a: a.get("seed", 0))
        losses = [a["student_loss"] for a in rows]
        t = mean_interval(losses)
        row = {"arm": name, "lambda": rows[0]["lambda"], "temperature": rows[0]["temperature"],
               "teacher_cost": float(np.mean([a["teacher_cost"] for a in rows])), "n": t["n"],
               "student_nll_mean": float(np.mean([a["student_nll"] for a in rows])),
               "student_loss_mean": t["mean"], "student_loss_sd": t["sd"],
               "student_loss_low": t["low"], "student_loss_high": t["high"],
               "gen_tokens_per_s": float(np.mean([a["gen_tokens_per_s"] for a in rows]))}
        bases = [a.get("temperature_student_loss_at_cost") for a in rows]
        if row["lambda"] and all(b is not None for b in bases):
            d = paired_difference(losses, bases)
            base_mean = float(np.mean(bases))
            d3 = paired_difference(losses, [3 * b for b in bases])  # the goal's own margin: tilt - 3 x temperature
            row.update({"temperature_loss_mean": base_mean,
                        "vs_temperature": {k: d[k] for k in ("mean", "sd", "low", "high", "n", "positive", "per_seed")},
                        "vs_3x_temperature": {k: d3[k] for k in ("mean", "low", "high", "n", "per_seed")},
                        "ratio_of_means": t["mean"] / base_mean if base_mean > 0 else None})
        out.append(row)
    return out


def by_steps(cfg: AntidistillStudyConfig, arms: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The goal's reading (best tilt at <= max_teacher_cost against temperature) after each of `eval_steps` and
    `max_steps` training steps: the same students measured along their runs; and, as `steps` "best", each student
    at its lowest held-out NLL among those steps (a distiller who stops early, each arm at its own best point)."""
    out: list[dict[str, Any]] = []
    for steps in [*cfg.eval_steps, cfg.max_steps, "best"]:
        if steps == "best":
            at = [dict(a, student_nll=min(a["student_nll_at"].values())) for a in arms if a.get("student_nll_at")]
        else:
            at = [dict(a, student_nll=a["student_nll_at"][str(steps)]) for a in arms
                  if str(steps) in a.get("student_nll_at", {})]
        if not arms or len(at) < len(arms):
            continue
        student_losses(at)
        rows = aggregate(at)
        best = best_tilt(rows, cfg.max_teacher_cost)
        if best is None:
            continue
        bases = [a["temperature_student_loss_at_cost"] for a in at if a["arm"] == best["arm"]]
        out.append({"steps": steps, "arm": best["arm"], "n": best["n"],
                    "tilt": {"mean": best["student_loss_mean"], "low": best["student_loss_low"],
                             "high": best["student_loss_high"], "n": best["n"]},
                    "temperature": mean_interval(bases),  # the baseline at the tilt's cost (per seed, interpolated)
                    "vs_temperature": best.get("vs_temperature"), "vs_3x_temperature": best.get("vs_3x_temperature"),
                    "ratio_of_means": best.get("ratio_of_means")})
    return out


def mean_interval(values: list[float]) -> dict[str, Any]:
    """Mean with its 95 % t-interval over seeds (low / high None for n < 2)."""
    from potstill.studies.stats import t_interval

    t = t_interval(values)
    hw = t["half_width"]
    return {"mean": t["mean"], "low": None if hw is None else t["mean"] - hw,
            "high": None if hw is None else t["mean"] + hw, "n": t["n"], "sd": t["sd"]}


def summarize(cfg: AntidistillStudyConfig, arms: list[dict[str, Any]], clean_nll: float, proc) -> dict[str, Any]:
    """Student losses against `clean` (per seed), their aggregate over seeds, and the goal on the ratio of means."""
    import numpy as np

    steps = by_steps(cfg, arms) if cfg.eval_steps else None
    student_losses(arms)
    rows = aggregate(arms)
    best = best_tilt(rows, cfg.max_teacher_cost)
    n = len({a.get("seed", 0) for a in arms})
    clean_rate = next(a for a in rows if a["arm"] == "clean")["gen_tokens_per_s"]
    tilted_rates = [a["gen_tokens_per_s"] for a in rows if a["lambda"] and a["gen_tokens_per_s"]]  # 0: capture reused
    diff = (best or {}).get("vs_temperature") or {}
    excludes = None if diff.get("low") is None else bool(diff["low"] > 0 or diff["high"] < 0)
    return {
        "study": "antidistill", "config": asdict(cfg), "clean_teacher_nll": clean_nll, "arms": arms, "aggregate": rows,
        "by_steps": steps,
        "proxy": {"spec": cfg.proxy, "protect_loss": proc.protect_loss, "grad_norm": proc.grad_norm,
                  "protect_references": proc.protect_count},
        "serving": {"clean_tokens_per_s": clean_rate,
                    "antidistill_tokens_per_s": float(np.mean(tilted_rates)) if tilted_rates else None,
                    "slowdown": clean_rate / float(np.mean(tilted_rates)) if tilted_rates else None},
        "goal": {"max_teacher_cost": cfg.max_teacher_cost, "needed_ratio": 3.0, "n": n,
                 "best_arm": best["arm"] if best else None,
                 "best_ratio": best["ratio_of_means"] if best else None,
                 "temperature_loss_mean": best["temperature_loss_mean"] if best else None,
                 "difference": {k: diff.get(k) for k in ("mean", "low", "high")} if diff else None,
                 "difference_excludes_zero": excludes,
                 "margin_3x": (best or {}).get("vs_3x_temperature"),
                 "established": bool(best and ((best.get("vs_3x_temperature") or {}).get("low") or 0) > 0),
                 "reached": goal_reached(best),
                 "note": (f"ratio of mean student losses over n = {n} paired seeds; intervals: 95 % t over seeds"
                          if n > 1 else "one student per arm (n = 1 seed); no interval: a single-seed reading")},
    }
