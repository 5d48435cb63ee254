"""`potstill study agent-anchor`: SFT on the text vs potstill's top-k KD, on the same verified trajectories.

    potstill study agent-anchor --train-tasks 48 --max-steps 40 --out runs/study-agent-anchor

The anchor is agent distillation as the agent-distillation paper (KAIST 2025) does it: supervised
fine-tuning with cross-entropy on the trajectories' model-written tokens (TRL SFT with tool output
masked). potstill's arm is top-k KD (`--kd-loss`, default forward KL) on the same tokens. Both arms
start from the same student init (`--student`, built from `--teacher`) and see the same capture, steps,
batch size and learning rate; only the loss differs.

The trajectories: the embedded teacher verifies ~0 episodes, so they come from the scripted solver
(agent/scripted.py: correct code per task template, run in the real sandbox, checked by the task's
checker), with top-k from `--teacher` teacher-forced on them so KD has targets. That makes the KD
targets the 135M model's beliefs about a stronger teacher's text: what an API teacher without
log-probs plus a local scorer would give. Measured: agent eval pass@1 with and without the tool on
held-out tasks (unseen instances, unseen templates) for the student before training and both arms
(Wilson 95 % intervals, n = tasks, and the discordant pairs SFT vs KD on the same tasks), and the
per-token NLL of the scripted text and KL to the scorer's top-k on held-out trajectories.
Writes capture/, heldcap/, the students, eval/, results.json and table.md under --out.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from potstill.config import GenerateConfig, TrainConfig, derive, opt
from potstill.utils import write_json

ARMS = ("sft", "kd")


@dataclass
class AgentAnchorConfig:
    tasks: str = opt("builtin:potstill_tools", "Task set (built-in templates only: the solver is scripted per template).")
    teacher: str = derive(GenerateConfig, "teacher", note="Teacher-forced on the scripted trajectories (KD targets); "
                           "the student's source.")
    student: str = derive(TrainConfig, "student", note="The same init for both arms.")
    train_tasks: int = opt(48, "Scripted trajectories to train on (tasks of the train split).")
    heldout_tasks: int = opt(24, "Scripted trajectories on held-out tasks (NLL / KL after training).")
    eval_tasks: int = opt(12, "Agent-eval tasks per held-out split (heldout, heldout_template).")
    kd_loss: str = derive(TrainConfig, "loss", note="potstill's (KD) arm.")
    top_k: int = derive(GenerateConfig, "top_k", note="On model-written tokens.")
    max_steps: int = derive(TrainConfig, "max_steps", 40, "Per arm.")
    batch_size: int = derive(TrainConfig, "batch_size", 4, "Trajectories.")
    lr: float = derive(TrainConfig, "lr", note="Both arms.")
    max_turns: int = opt(2, "Agent eval: most assistant turns.")
    max_new_tokens: int = derive(GenerateConfig, "max_new_tokens", note="Agent eval: per turn.")
    seed: int = derive(TrainConfig, "seed", note="Also of the tasks.")
    dtype: str = derive(GenerateConfig, "dtype", "float32")
    out: str = opt("runs/study-agent-anchor", "Output directory.")
    unsafe_sandbox: bool = opt(False, "Run code without namespace isolation where none is available (unsafe).")


def _task_file(path: Path, tasks: list) -> str:
    """The tasks as a JSONL task file, all in split 'train' (agent generate runs train tasks only)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({**t.to_dict(), "split": "train"}) + "\n" for t in tasks))
    return str(path)


def scripted_capture(cfg: AgentAnchorConfig, tasks: list, out: Path, scorer, log=print) -> dict[str, Any]:
    """Scripted episodes on `tasks` through `agent generate` (sandbox, checker, capture); the manifest."""
    from potstill.agent.generate import AgentGenerateConfig, agent_generate
    from potstill.agent.scripted import ScriptedSolver

    gen = AgentGenerateConfig(tasks=_task_file(out.with_suffix(".tasks.jsonl"), tasks), teacher=cfg.teacher,
                              out=str(out), samples=1, max_turns=2, max_new_tokens=512, top_k=cfg.top_k,
                              temperature=0.0, seed=cfg.seed, dtype=cfg.dtype, batch_size=8,
                              unsafe_sandbox=cfg.unsafe_sandbox, scaffold="none")  # the solver writes whole turns
    return agent_generate(gen, teacher=ScriptedSolver(scorer, tasks), log=log)


def run_agent_anchor(cfg: AgentAnchorConfig, log=print) -> dict[str, Any]:
    from potstill.agent.evaluate import AgentEvalConfig, run_agent_eval
    from potstill.agent.tasks import load_tasks
    from potstill.capture.store import Capture
    from potstill.config import TrainConfig
    from potstill.evaluate.metrics import fidelity
    from potstill.lm.tokens import pad_token_id
    from potstill.pipeline import build_and_save_before
    from potstill.teachers.hf import HFTeacher
    from potstill.train.data import examples_from_capture
    from potstill.train.loop import train
    from potstill.utils import quiet_transformers

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tasks = load_tasks(cfg.tasks, cfg.seed)
    train_tasks = [t for t in tasks if t.split == "train"][: cfg.train_tasks]
    held_tasks = [t for t in tasks if t.split == "heldout"][: cfg.heldout_tasks]
    quiet_transformers()
    scorer = HFTeacher.load(cfg.teacher, dtype=cfg.dtype)
    manifest = scripted_capture(cfg, train_tasks, out / "capture", scorer, log)
    held_manifest = scripted_capture(cfg, held_tasks, out / "heldcap", scorer, log)
    del scorer
    timings = {"capture_s": round(time.perf_counter() - t0, 1)}

    t = time.perf_counter()
    base = dict(capture=str(out / "capture"), teacher=cfg.teacher, student=cfg.student, max_steps=cfg.max_steps,
                batch_size=cfg.batch_size, lr=cfg.lr, warmup_steps=min(5, cfg.max_steps // 4), max_seq_len=1024,
                checkpoint_every=0, seed=cfg.seed, bf16="off")
    arms = {"sft": TrainConfig(**base, loss="ce", out=str(out / "sft")),
            "kd": TrainConfig(**base, loss=cfg.kd_loss, out=str(out / "kd"))}
    build_and_save_before(arms["sft"], out / "before", log)
    summaries = {arm: train(c, log=log) for arm, c in arms.items()}
    timings["train_s"] = round(time.perf_counter() - t, 1)

    t = time.perf_counter()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    held = examples_from_capture(Capture.open(out / "heldcap"), split="train", max_seq_len=1024)
    heldout_fit = {}
    for name in ("before", *ARMS):
        model = AutoModelForCausalLM.from_pretrained(out / name)
        tok = AutoTokenizer.from_pretrained(out / name)
        heldout_fit[name] = {k: round(v, 4) if isinstance(v, float) else v
                             for k, v in fidelity(model, held, pad_token_id(tok), batch_size=4).items()}
    ev = run_agent_eval(AgentEvalConfig(tasks=cfg.tasks, teacher=None, students=[str(out / n) for n in ("before", *ARMS)],
                                        labels=["before", "sft (ce)", f"kd ({cfg.kd_loss})"], max_tasks=cfg.eval_tasks,
                                        max_turns=cfg.max_turns, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed,
                                        dtype=cfg.dtype, out=str(out / "eval"), unsafe_sandbox=cfg.unsafe_sandbox,
                                        scaffold="none"),
                        log=log)
    timings["eval_s"] = round(time.perf_counter() - t, 1)
    result = {
        "config": asdict(cfg),
        "trajectories": {"source": "scripted solver (agent/scripted.py), top-k from the teacher, teacher-forced",
                         "train": manifest["yield"]["all"], "heldout": held_manifest["yield"]["all"]},
        "train": {arm: {"loss": arms[arm].loss, "steps": s["steps"], "examples": s["examples"]}
                  for arm, s in summaries.items()},
        "heldout_fit": heldout_fit,
        "agent_eval": ev["rows"],
        "discordant": discordant(out / "eval"),
        "timings": timings,
    }
    write_json(out / "results.json", result)
    from potstill.studies.common import write_text

    write_text(out / "table.md", anchor_markdown(result))
    log(f"wrote {out / 'results.json'} and {out / 'table.md'}")
    return result


def discordant(eval_dir: Path) -> dict[str, Any]:
    """Tasks SFT solved and KD did not, and the reverse (tool mode), from the eval's per-episode file."""
    path = eval_dir / "episodes.jsonl"
    if not path.exists():
        return {}
    solved: dict[str, set] = {}
    for line in path.read_text().splitlines():
        e = json.loads(line)
        if e["mode"] == "tool" and e["verified"]:
            solved.setdefault(e["model"], set()).add(e["task"])
    sft, kd = (next((v for k, v in solved.items() if k.startswith(p)), set()) for p in ("sft", "kd"))
    return {"sft_only": len(sft - kd), "kd_only": len(kd - sft), "both": len(sft & kd)}


def anchor_lines(result: dict[str, Any]) -> list[str]:
    """The discordant pairs of the tool-mode eval, one line."""
    d = result["discordant"]
    return [f"tool mode, same tasks: SFT only {d.get('sft_only')}, KD only {d.get('kd_only')}, both {d.get('both')}"]


def anchor_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "pass@1 tool", "95% CI", "pass@1 no tool", "95% CI", "held-out NLL (scripted text)",
            "held-out KL (teacher top-k)", "tokens"]
    body = []
    for row, name in zip(result["agent_eval"], ("before", *ARMS), strict=True):
        t, nt, fit = row["tool"], row["no_tool"], result["heldout_fit"][name]
        body.append([row["model"], f"{t['solved']}/{t['n']}", _ci(t["pass@1_ci95"]), f"{nt['solved']}/{nt['n']}",
                     _ci(nt["pass@1_ci95"]), f"{fit['nll_teacher_tokens']:.3f}", f"{fit.get('kl', float('nan')):.3f}",
                     str(fit["tokens"])])
    return head, body


def anchor_markdown(result: dict[str, Any]) -> str:
    from potstill.studies.common import markdown_table

    c, tr = result["config"], result["trajectories"]
    d = result["discordant"]
    return (f"# potstill study agent-anchor\n\nSame student init ({c['student']} of {c['teacher']}), same "
            f"{tr['train']['verified']} verified scripted trajectories, {c['max_steps']} steps x {c['batch_size']}, "
            f"lr {c['lr']}: SFT (CE on model-written tokens) vs KD ({c['kd_loss']} on the teacher's top-{c['top_k']}).\n"
            f"Held-out fit on {tr['heldout']['verified']} scripted trajectories of unseen instances; agent eval greedy, "
            f"pass@1 with Wilson 95 % intervals (n = tasks).\n\n" + markdown_table(*anchor_rows(result))
            + f"\n\nTool mode, same tasks: solved by SFT only {d.get('sft_only')}, by KD only {d.get('kd_only')}, "
            f"by both {d.get('both')}.\n")


def _ci(ci: list) -> str:
    return "-" if ci[0] is None else f"[{ci[0]:.2f}, {ci[1]:.2f}]"
