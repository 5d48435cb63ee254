"""`potstill study budget`: which recipe buys the best student per CPU-minute.

    potstill study budget --minutes 3 --arms depth0.5 --arms depth14 --arms reference --arms depth14@6

Each arm is the demo recipe (or `--recipe`) with a few fields changed (`ARMS`), run as
`potstill run --minutes M` does (`pipeline.run_budgeted`: this machine measured, every stage sized to
the arm's budget, kept to it; here on a CPU clock, so that other work on a shared machine does not
shrink an arm), without the demo's 'student before' row or held-out eval: the study
measures every student itself, on the held-out set (`--heldout-prompts`, another source than the
training prompts) against one teacher pass (evaluate/heldout.py): top-1 agreement, KL, reference
likelihood kept, and the repetition of its greedy answers beside the teacher's over the same token
count. An arm's cost is the CPU seconds of its run (process time, all threads), beside its wall time.
`NAME@MINUTES` runs an arm at another budget (a point further along the curve); `A+B` makes both
arms' changes at once.

Writes teacher/ (the teacher's side, reused), arms/<arm>/ (the run and its result.json: a rerun with
the same settings reuses it),
results.json, table.md and quality_vs_cpu.png (quality kept against CPU-minutes, Pareto front
marked) under --out.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from potstill.config import EvalConfig, derive, opt
from potstill.errors import PotstillError
from potstill.studies.common import markdown_table, pyplot, save_figure, write_text
from potstill.utils import write_json

# name -> (group, what it changes, recipe overrides)
ARMS: dict[str, tuple[str, str, list[str]]] = {
    "depth0.5": ("compression", "keep 15 of 30 layers (the demo before this study)", ["train.student=prune:depth:0.5"]),
    "depth14": ("compression", "keep 14 layers (<= 60% of the params)", ["train.student=prune:depth:14"]),
    "depth0.33": ("compression", "keep 10 layers", ["train.student=prune:depth:0.33"]),
    "depth0.25": ("compression", "keep 8 layers", ["train.student=prune:depth:0.25"]),
    "width": ("compression", "width pruning to 80M params", ["train.student=prune:width:80M"]),
    "depth-width": ("compression", "keep 20 layers, then width to 80M", ["train.student=prune:depth:20+prune:width:80M"]),
    "T0.7": ("data", "answers sampled at T=0.7, top-p 0.9", ["generate.temperature=0.7", "generate.top_p=0.9"]),
    "reference": ("data", "teacher forcing on the prompts' reference answers", ["generate.answers=reference"]),
    "short": ("data", "many short answers (32 tokens)", ["generate.max_new_tokens=32"]),
    "long": ("data", "few long answers (160 tokens)", ["generate.max_new_tokens=160"]),
    "lr1e-3": ("training", "peak lr 1e-3", ["train.lr=1e-3"]),
    "lr1e-4": ("training", "peak lr 1e-4", ["train.lr=1e-4"]),
    "freeze-emb": ("training", "tied embedding frozen", ["train.freeze_embeddings=true"]),
    "jsd": ("training", "JSD loss", ["train.loss=jsd"]),
    "ce": ("training", "CE on the teacher's tokens only", ["train.loss=ce", "train.ce_weight=1.0"]),
    "online": ("training", "online: the live teacher scores every batch", ["train.mode=online"]),
}
SIZE_GOAL, LIKELIHOOD_GOAL, TOP1_GOAL = 0.60, 0.50, 0.60


@dataclass
class BudgetConfig:
    minutes: float = opt(3.0, "Budget of each arm, in CPU-minutes of its process (as `potstill run --minutes`, on "
                         "a CPU clock: the same work however busy the machine is).")
    arms: list[str] = opt(["depth0.5", "depth14", "depth0.33", "reference", "T0.7", "lr1e-3", "freeze-emb", "jsd"],
                          f"Arms: {', '.join(ARMS)}; A+B makes both changes; NAME@MINUTES runs one at another budget.")
    recipe: str = opt("demo", "Recipe the arms vary: a YAML file or a built-in recipe name.")
    heldout_prompts: str = derive(EvalConfig, "heldout_prompts", "builtin:heldout_v1")
    gen_prompts: int = derive(EvalConfig, "gen_prompts", 12, "Held-out prompts each model answers greedily.")
    gen_tokens: int = derive(EvalConfig, "gen_tokens", 48)
    out: str = opt("runs/study-budget", "Output directory (arms/, results.json, table.md, quality_vs_cpu.png).")

    def __post_init__(self) -> None:
        if self.minutes <= 0:
            raise PotstillError(f"study budget: minutes must be > 0, got {self.minutes}")
        for arm in self.arms:
            parse_arm(arm, self.minutes)


def parse_arm(text: str, minutes: float) -> tuple[str, float]:
    """'depth14' -> ('depth14', minutes); 'depth14@6' -> ('depth14', 6.0); 'reference+lr1e-3': both changes."""
    name, _, at = text.partition("@")
    for part in name.split("+"):
        if part not in ARMS:
            raise PotstillError(f"study budget: unknown arm {part!r} (known: {', '.join(ARMS)})")
    try:
        m = float(at) if at else minutes
    except ValueError:
        raise PotstillError(f"study budget: arm {text!r}: {at!r} is not a number of minutes") from None
    if m <= 0:
        raise PotstillError(f"study budget: arm {text!r}: minutes must be > 0")
    return name, m


def recipe_path(recipe: str) -> Path:
    from potstill.pipeline import builtin_recipe

    return Path(recipe) if Path(recipe).suffix in (".yaml", ".yml") else builtin_recipe(recipe)


class Reference:
    """The teacher's side, computed once: its top-k on the held-out answers, its greedy answers."""

    def __init__(self, cfg: BudgetConfig, teacher: str, log=print):
        from potstill.capture.prompts import load_prompts

        self.cfg = cfg
        self.prompts = [p for p in load_prompts(cfg.heldout_prompts) if p.reference]
        if not self.prompts:
            raise PotstillError("the held-out set has no reference answers", where=cfg.heldout_prompts)
        cache = Path(cfg.out) / "teacher"
        key = {"teacher": teacher, "heldout_prompts": cfg.heldout_prompts, "gen_prompts": cfg.gen_prompts,
               "gen_tokens": cfg.gen_tokens}
        if not self.load(cache, key):
            self.compute(teacher)
            self.save(cache, key)
        log(f"study budget: teacher measured on {len(self.examples)} held-out answers")

    def compute(self, teacher: str) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from potstill.evaluate import heldout as ho
        from potstill.lm.loading import resolve_model_dir

        path = resolve_model_dir(teacher)
        model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        self.examples = ho.teacher_examples(model, tok, self.prompts)
        self.row = {**ho.measure(model, tok, self.examples), "params": sum(p.numel() for p in model.parameters())}
        ho.add_kept([self.row])
        self.answers = self.greedy(model, tok)

    def save(self, cache: Path, key: dict[str, Any]) -> None:
        """The teacher's side under out/teacher/ (arrays in an .npz, no pickle): a rerun skips the teacher."""
        import numpy as np

        from potstill.utils import atomic_path

        cache.mkdir(parents=True, exist_ok=True)
        arrays = {}
        for i, e in enumerate(self.examples):
            arrays.update({f"ids{i}": e.input_ids, f"tk{i}": e.topk_ids, f"lp{i}": e.topk_logprobs, f"tail{i}": e.tail_logprob})
        with atomic_path(cache / "examples.npz") as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)
        write_json(cache / "teacher.json", {"key": key, "row": self.row, "answers": self.answers,
                                            "prompt_lens": [e.prompt_len for e in self.examples]})

    def load(self, cache: Path, key: dict[str, Any]) -> bool:
        import numpy as np

        from potstill.train.data import Example

        if not (cache / "teacher.json").exists() or not (cache / "examples.npz").exists():
            return False
        meta = json.loads((cache / "teacher.json").read_text())
        if meta.get("key") != key:
            return False
        with np.load(cache / "examples.npz", allow_pickle=False) as z:
            self.examples = [Example(z[f"ids{i}"], n, z[f"tk{i}"], z[f"lp{i}"], z[f"tail{i}"])
                             for i, n in enumerate(meta["prompt_lens"])]
        self.row, self.answers = meta["row"], meta["answers"]
        return True

    def greedy(self, model, tok) -> list[list[int]]:
        from potstill.evaluate.metrics import generation_speed

        return generation_speed(model, tok, self.prompts, self.cfg.gen_prompts, self.cfg.gen_tokens)["_answers"]

    def student(self, path: str | Path) -> dict[str, Any]:
        """A student's held-out row; repetition beside the teacher's over the same token count."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from potstill.evaluate import heldout as ho

        model, tok = AutoModelForCausalLM.from_pretrained(path), AutoTokenizer.from_pretrained(path)
        row = {**ho.measure(model, tok, self.examples), "params": sum(p.numel() for p in model.parameters())}
        teacher_rep, rep = ho.equal_repetition([self.answers, self.greedy(model, tok)])
        row.update(rep)
        row.update({f"teacher_{k}": v for k, v in teacher_rep.items() if k in ("loop_rate", "distinct_1", "distinct_2")})
        ho.add_kept([self.row, row])
        row["params_share"] = row["params"] / self.row["params"]
        return row


def run_arm(cfg: BudgetConfig, arm: str, ref: Reference, log=print) -> dict[str, Any]:
    """One arm: its budgeted run (reused when its result.json matches), then its held-out row."""
    from potstill.pipeline import run_budgeted

    name, minutes = parse_arm(arm, cfg.minutes)
    parts = [ARMS[p] for p in name.split("+")]
    group = "+".join(dict.fromkeys(p[0] for p in parts))
    what = "; ".join(p[1] for p in parts)
    overrides = [o for p in parts for o in p[2]] + ["eval_before=false", "eval.heldout_prompts=null"]
    run = Path(cfg.out) / "arms" / arm
    key = {"arm": arm, "minutes": minutes, "overrides": overrides, "recipe": str(recipe_path(cfg.recipe).name),
           "heldout_prompts": cfg.heldout_prompts, "gen_prompts": cfg.gen_prompts, "gen_tokens": cfg.gen_tokens}
    done = run / "result.json"
    if done.exists():
        old = json.loads(done.read_text())
        if old.get("key") == key:
            log(f"study budget: {arm}: reusing {done}")
            return old
    log(f"study budget: {arm} ({what}), {minutes:g} min")
    t0 = time.perf_counter()
    result = run_budgeted(recipe_path(cfg.recipe), minutes, overrides, str(run), log=log, cpu_clock=True)
    plan = result["plan"]
    row = {"arm": arm, "group": group, "what": what, "minutes": minutes, "key": key,
           "wall_s": plan["actual_s"]["total"], "cpu_s": plan["cpu_s"]["total"], "cpu_share": plan["cpu_s"],
           "steps": plan.get("train_steps_done"), "capture_rows": plan.get("capture_rows"),
           "train_tokens_per_s": result["train"].get("train_tokens_per_s"), "student": plan_student(run),
           "run_s": time.perf_counter() - t0, "cpu": plan.get("cpu")}
    row.update(ref.student(run / "student"))
    row["goal"] = meets_goal(row)
    write_json(done, row)
    return row


def plan_student(run: Path) -> str | None:
    import yaml

    recipe = run / "recipe.budgeted.yaml"
    return (yaml.safe_load(recipe.read_text()) or {}).get("train", {}).get("student") if recipe.exists() else None


def meets_goal(row: dict[str, Any]) -> bool:
    return bool(row["params_share"] <= SIZE_GOAL and (row.get("heldout_nll_reference_kept") or 0) >= LIKELIHOOD_GOAL
                and (row.get("heldout_top1_agreement") or 0) >= TOP1_GOAL)


def pareto(rows: list[dict[str, Any]], key: str = "heldout_nll_reference_kept") -> list[str]:
    """Arms no other arm beats on both CPU seconds (fewer) and `key` (more)."""
    front = []
    for r in rows:
        if not any(o is not r and o["cpu_s"] <= r["cpu_s"] and o[key] >= r[key]
                   and (o["cpu_s"] < r["cpu_s"] or o[key] > r[key]) for o in rows):
            front.append(r["arm"])
    return front


def run_budget(cfg: BudgetConfig, log=print) -> dict[str, Any]:
    """Every arm in turn (finished ones reused), then results.json, table.md and the plot."""
    import yaml

    from potstill.utils import quiet_transformers

    quiet_transformers()
    data = yaml.safe_load(recipe_path(cfg.recipe).read_text()) or {}
    ref = Reference(cfg, (data.get("generate") or {}).get("teacher", "embedded"), log)
    rows = [run_arm(cfg, arm, ref, log) for arm in cfg.arms]
    result = {"config": asdict(cfg), "teacher": ref.row, "teacher_answers": len(ref.answers), "arms": rows,
              "pareto": pareto(rows), "pareto_top1": pareto(rows, "heldout_top1_agreement"),
              "goal": {"params_share_max": SIZE_GOAL, "reference_likelihood_kept_min": LIKELIHOOD_GOAL,
                       "top1_agreement_min": TOP1_GOAL, "reached_by": [r["arm"] for r in rows if r["goal"]]}}
    out = Path(cfg.out)
    write_json(out / "results.json", result)
    write_text(out / "table.md", "\n\n".join([markdown_table(*budget_table(result)), *summary_lines(result)]) + "\n")
    plot(result, out / "quality_vs_cpu.png")
    return result


def budget_table(result: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    headers = ["arm", "group", "student", "params %", "budget min", "CPU min", "wall min", "steps", "rows",
               "top-1 ↑", "KL ↓", "ref. lik. kept ↑", "loop rate (teacher)", "distinct-2 (teacher)", "Pareto"]
    rows = []
    for r in result["arms"]:
        mark = "★" if r["arm"] in result["pareto"] else ""
        rows.append([r["arm"], r["group"], r.get("student") or "", f"{r['params_share']:.0%}", f"{r['minutes']:g}",
                     f"{r['cpu_s'] / 60:.1f}", f"{r['wall_s'] / 60:.1f}", r.get("steps"), r.get("capture_rows"),
                     f"{r['heldout_top1_agreement']:.3f}", f"{r['heldout_kl']:.3f}",
                     f"{r['heldout_nll_reference_kept']:.1%}",
                     f"{r['loop_rate']:.0%} ({r['teacher_loop_rate']:.0%})",
                     f"{_f(r['distinct_2'])} ({_f(r['teacher_distinct_2'])})", mark])
    return headers, rows


def _f(x) -> str:
    return "–" if x is None else f"{x:.3f}"


def summary_lines(result: dict[str, Any]) -> list[str]:
    t, g = result["teacher"], result["goal"]
    lines = [f"teacher: {t['params']:,} params, held-out NLL of the references {t['heldout_nll_reference']:.3f} nats/token "
             f"over {t['heldout_tokens']} tokens of {t['heldout_answers']} answers; repetition over "
             f"{result['teacher_answers']} greedy answers.",
             f"Pareto front (CPU-minutes vs reference likelihood kept): {', '.join(result['pareto'])}.",
             f"goal (<= {g['params_share_max']:.0%} params, >= {g['reference_likelihood_kept_min']:.0%} ref. likelihood "
             f"kept, >= {g['top1_agreement_min']:.0%} top-1): "
             + (f"reached by {', '.join(g['reached_by'])}." if g["reached_by"] else "not reached by any arm.")]
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    plt = pyplot()
    rows = result["arms"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, key, front, label, goal in (
        (axes[0], "heldout_nll_reference_kept", result["pareto"], "reference likelihood kept", LIKELIHOOD_GOAL),
        (axes[1], "heldout_top1_agreement", result["pareto_top1"], "top-1 agreement", TOP1_GOAL),
    ):
        for r in rows:
            ax.scatter(r["cpu_s"] / 60, r[key], marker="*" if r["arm"] in front else "o",
                       s=120 if r["arm"] in front else 40, color="C1" if r["params_share"] <= SIZE_GOAL else "C0")
            ax.annotate(r["arm"], (r["cpu_s"] / 60, r[key]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        pts = sorted((r["cpu_s"] / 60, r[key]) for r in rows if r["arm"] in front)
        if pts:
            ax.plot(*zip(*pts, strict=True), color="C1", lw=1, ls="--", label="Pareto front")
        ax.axhline(goal, color="grey", lw=0.8, ls=":", label=f"goal {goal:.0%}")
        ax.set_xlabel("CPU-minutes per arm (process time)")
        ax.set_ylabel(f"held-out {label}")
        ax.legend(fontsize=7)
    fig.suptitle("potstill study budget: quality kept vs CPU-minutes (orange: <= 60% of the teacher's params)")
    save_figure(fig, path)
