"""Agent recipes: agent generate -> train -> agent eval in one run directory (`potstill run recipes/agent.yaml`).

A recipe with an `agent_generate` section is an agent recipe: sections `agent_generate`
(agent/generate.py), `train` (config.TrainConfig) and `agent_eval` (agent/evaluate.py); paths
between stages come from `run_dir`: agentcap/, student/, student-before/ (with `eval_before`), eval/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from potstill.agent.evaluate import AgentEvalConfig, run_agent_eval
from potstill.agent.generate import AgentGenerateConfig, agent_generate
from potstill.config import TrainConfig, build, load_recipe
from potstill.errors import PotstillError
from potstill.utils import atomic_path

SECTIONS = {"agent_generate": AgentGenerateConfig, "train": TrainConfig, "agent_eval": AgentEvalConfig}


def is_agent_recipe(path: str | Path) -> bool:
    try:
        data = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and "agent_generate" in data


def load_agent_recipe(path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    return load_recipe(path, overrides, SECTIONS)


def run_agent_recipe(path: str | Path, overrides: list[str] = (), run_dir: str | None = None,
                     log=print) -> dict[str, Any]:
    """Run the three stages; returns {"eval": agent eval result, "capture": manifest, "timings": ...}."""
    from potstill.pipeline import run_stages

    data = load_agent_recipe(path, overrides)
    run = Path(run_dir or data.get("run_dir") or "runs/agent")
    run.mkdir(parents=True, exist_ok=True)
    where = str(path)
    gen = build(AgentGenerateConfig, {**data.get("agent_generate", {}), "out": str(run / "agentcap")},
                f"{where}: agent_generate")
    train_cfg = build(TrainConfig, {**data.get("train", {}), "capture": gen.out, "out": str(run / "student"),
                                    "teacher": gen.teacher}, f"{where}: train")
    students, labels = [train_cfg.out], ["student after"]
    if data.get("eval_before"):
        students.insert(0, str(run / "student-before"))
        labels.insert(0, "student before")
    eval_cfg = build(AgentEvalConfig, {"templates": gen.templates, **data.get("agent_eval", {}), "students": students, "labels": labels,
                                       "teacher": gen.teacher, "tasks": gen.tasks, "seed": gen.seed,
                                       "scaffold": gen.scaffold,
                                       "unsafe_sandbox": gen.unsafe_sandbox, "out": str(run / "eval")},
                     f"{where}: agent_eval")
    with atomic_path(run / "recipe.resolved.yaml") as tmp:
        tmp.write_text(yaml.safe_dump({"run_dir": str(run), "eval_before": bool(data.get("eval_before")),
                                       "agent_generate": gen.__dict__, "train": train_cfg.__dict__,
                                       "agent_eval": eval_cfg.__dict__}, sort_keys=False))
    def check_capture(manifest: dict) -> None:
        if not manifest.get("counts", {}).get("splits", {}).get("train", {}).get("rows"):
            raise PotstillError("the teacher solved no training task: no verified trajectory to learn from "
                                "(try --scaffold prefill, more --samples, another temperature, or easier --kinds / --templates)", where=gen.out)

    return run_stages(lambda: agent_generate(gen, log=log), train_cfg, lambda: run_agent_eval(eval_cfg, log=log),
                      run, bool(data.get("eval_before")), log, check_capture)
