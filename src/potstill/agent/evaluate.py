"""`potstill agent eval`: teacher and students solve held-out tasks with and without the tool.

Per model and mode (tool / no tool), greedy, one episode per task (pass@1): success rate with a
Wilson 95% interval (n = tasks), split into held-out instances of seen templates ("heldout") and
unseen templates ("heldout_template"); mean turns; the share of well-formed tool calls (code that
compiles) among tool calls; sandbox errors (runs that did not exit 0); tokens per episode.
Writes results.json, table.md, pass_at_1.png (pass@1 per model with and without the tool, Wilson
intervals) and episodes.jsonl (one line per episode) under --out (temp file, then rename).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from potstill.agent.generate import AgentGenerateConfig
from potstill.config import EvalConfig, derive, opt
from potstill.errors import PotstillError
from potstill.utils import atomic_path, write_json

MODES = ("tool", "no_tool")


@dataclass
class AgentEvalConfig:
    tasks: str = derive(AgentGenerateConfig, "tasks")
    teacher: str | None = derive(EvalConfig, "teacher", note="'' or none to skip it.")
    students: list[str] = derive(EvalConfig, "students")
    labels: list[str] = derive(EvalConfig, "labels")
    splits: list[str] = opt(["heldout", "heldout_template"], "Task splits to evaluate on.")
    max_tasks: int = opt(60, "At most this many tasks per split (0 = all).")
    templates: list[str] = derive(AgentGenerateConfig, "templates",
                                  note="Here: the 'heldout' split (unseen instances) only; unseen templates stay whole.")
    max_turns: int = derive(AgentGenerateConfig, "max_turns")
    max_new_tokens: int = derive(AgentGenerateConfig, "max_new_tokens")
    scaffold: str = derive(AgentGenerateConfig, "scaffold", note="The same for every model evaluated.")
    max_tokens: int = derive(AgentGenerateConfig, "max_tokens")
    batch_size: int = derive(AgentGenerateConfig, "batch_size")
    seed: int = derive(AgentGenerateConfig, "seed", note="Here only the task set's.")
    dtype: str = derive(AgentGenerateConfig, "dtype", note="Every model evaluated.")
    out: str = opt("runs/agent-eval", "Output directory: results.json, table.md.")
    sandbox_cpu_s: int = derive(AgentGenerateConfig, "sandbox_cpu_s")
    sandbox_wall_s: float = derive(AgentGenerateConfig, "sandbox_wall_s")
    sandbox_memory_mb: int = derive(AgentGenerateConfig, "sandbox_memory_mb")
    unsafe_sandbox: bool = derive(AgentGenerateConfig, "unsafe_sandbox")

    def __post_init__(self) -> None:
        if self.teacher in ("", "none"):
            self.teacher = None
        if not self.teacher and not self.students:
            raise PotstillError("agent eval: give --teacher and/or --students")
        if self.labels and len(self.labels) != len(self.students):
            raise PotstillError("agent eval: --labels needs one label per student")
        from potstill.agent.episode import check_scaffold

        check_scaffold(self.scaffold)


def wilson(k: int, n: int, z: float = 1.96) -> list[float | None]:
    """95% Wilson score interval for k successes in n trials."""
    if n == 0:
        return [None, None]
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def metrics(summaries: list[dict], splits: dict[str, str]) -> dict[str, Any]:
    """Aggregate episode summaries (see Episode.summary) of one model and mode."""
    n = len(summaries)
    ok = sum(s["verified"] for s in summaries)
    calls = sum(s["tool_calls"] for s in summaries)
    out: dict[str, Any] = {
        "n": n, "solved": ok, "pass@1": round(ok / n, 4) if n else None, "pass@1_ci95": wilson(ok, n),
        "mean_turns": round(sum(s["turns"] for s in summaries) / n, 3) if n else None,
        "tool_calls": calls,
        "well_formed_call_share": round(sum(s["well_formed_calls"] for s in summaries) / calls, 4) if calls else None,
        "sandbox_errors": sum(s["sandbox_errors"] for s in summaries),
        "tokens_per_episode": round(sum(s["tokens"] for s in summaries) / n, 1) if n else None,
        "answered": sum(s["answer"] is not None for s in summaries),
    }
    for split in sorted(set(splits.values())):
        sub = [s for s in summaries if splits[s["task"]] == split]
        k = sum(s["verified"] for s in sub)
        out[f"pass@1[{split}]"] = {"n": len(sub), "solved": k, "rate": round(k / len(sub), 4) if sub else None,
                                   "ci95": wilson(k, len(sub))}
    return out


def evaluate_model(model, label: str, tasks: list, sandbox, cfg: AgentEvalConfig, log=print) -> dict[str, Any]:
    """Both modes for one loaded model (an Engine: potstill.lm.engine)."""
    from potstill.agent.episode import EpisodeRunner
    from potstill.lm.types import SamplingParams

    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, top_logprobs=0, seed=cfg.seed)
    splits = {t.id: t.split for t in tasks}
    row: dict[str, Any] = {"model": label}
    for mode in MODES:
        t0 = time.perf_counter()
        runner = EpisodeRunner(model, sandbox, params, max_turns=cfg.max_turns, max_tokens=cfg.max_tokens,
                               tool=mode == "tool", seed=cfg.seed, batch_size=cfg.batch_size,
                               scaffold=cfg.scaffold)
        try:
            episodes = runner.run([runner.new(f"{label}:{mode}:{t.id}", t, 0) for t in tasks])
        finally:
            runner.close()
        summaries = [{**e.summary(), "model": label, "mode": mode} for e in episodes]
        row.setdefault("episodes", []).extend(summaries)
        m = metrics(summaries, splits)
        m["seconds"] = round(time.perf_counter() - t0, 1)
        row[mode] = m
        log(f"{label} [{mode}]: pass@1 {m['solved']}/{m['n']} = {m['pass@1']} {m['pass@1_ci95']}, "
            f"mean turns {m['mean_turns']}, well-formed calls {m['well_formed_call_share']}, "
            f"sandbox errors {m['sandbox_errors']} ({m['seconds']}s)")
    return row


def eval_tasks(cfg: AgentEvalConfig, all_tasks: list) -> list:
    """Up to `max_tasks` of each split; `templates` narrows the unseen-instance split only."""
    from potstill.agent.generate import select_tasks

    tasks = []
    for split in cfg.splits:
        tasks += select_tasks(all_tasks, (split,), [], cfg.max_tasks or None,
                              cfg.templates if split == "heldout" else ())
    return tasks


def run_agent_eval(cfg: AgentEvalConfig, log=print, models: dict[str, Any] | None = None) -> dict[str, Any]:
    """Teacher and students on the held-out tasks; `models` maps label -> loaded model (tests)."""
    from potstill.agent.generate import make_sandbox
    from potstill.agent.tasks import load_tasks
    from potstill.teachers.hf import HFTeacher
    from potstill.utils import quiet_transformers

    tasks = eval_tasks(cfg, load_tasks(cfg.tasks, cfg.seed))
    sandbox = make_sandbox(cfg)
    log(f"agent eval: {len(tasks)} tasks ({', '.join(cfg.splits)}); sandbox isolation={sandbox.isolation}")
    quiet_transformers()
    if models is None:
        specs = ([("teacher", cfg.teacher)] if cfg.teacher else []) + list(
            zip(cfg.labels or [Path(s).name for s in cfg.students], cfg.students, strict=True))
        models = {label: spec for label, spec in specs}
    rows = []
    for label, model in models.items():
        if isinstance(model, str):
            model = HFTeacher.load(model, dtype=cfg.dtype)
        rows.append(evaluate_model(model, label, tasks, sandbox, cfg, log))
    episodes = [e for r in rows for e in r.pop("episodes")]
    result = {"tasks": cfg.tasks, "splits": cfg.splits, "n_tasks": len(tasks), "scaffold": cfg.scaffold,
              "sandbox": sandbox.describe(),
              "rows": rows, "config": cfg.__dict__}
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    with atomic_path(out / "episodes.jsonl") as tmp:  # one line per episode: paired comparisons between models
        tmp.write_text("".join(json.dumps(e) + "\n" for e in episodes))
    write_json(out / "results.json", result)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(markdown_table(result))
    from potstill.evaluate.report_plots import agent_pass_bars

    png = agent_pass_bars([(r["model"], r) for r in rows])
    with atomic_path(out / "pass_at_1.png") as tmp:
        tmp.write_bytes(png)
    log(f"wrote {out / 'results.json'}, {out / 'table.md'} and {out / 'pass_at_1.png'}")
    return result


def table_rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    head = ["model", "pass@1 tool", "95% CI", "pass@1 no tool", "95% CI", "unseen templates (tool)", "mean turns",
            "well-formed calls", "sandbox errors", "tokens/episode"]
    body = []
    for r in result["rows"]:
        t, nt = r["tool"], r["no_tool"]
        unseen = t.get("pass@1[heldout_template]", {})
        body.append([
            r["model"], f"{t['solved']}/{t['n']} = {t['pass@1']:.3f}", _ci(t["pass@1_ci95"]),
            f"{nt['solved']}/{nt['n']} = {nt['pass@1']:.3f}", _ci(nt["pass@1_ci95"]),
            f"{unseen.get('solved', '-')}/{unseen.get('n', '-')}", f"{t['mean_turns']:.2f}",
            "-" if t["well_formed_call_share"] is None else f"{t['well_formed_call_share']:.2f} of {t['tool_calls']}",
            str(t["sandbox_errors"]), f"{t['tokens_per_episode']:.0f}",
        ])
    return head, body


def markdown_table(result: dict[str, Any]) -> str:
    from potstill.present import markdown_table as md_table

    head, body = table_rows(result)
    lines = [md_table(head, body)]
    iso = result["sandbox"]["isolation"]
    return (f"# potstill agent eval\n\n{result['n_tasks']} tasks from {result['tasks']} ({', '.join(result['splits'])}),"
            f" greedy, one episode per task, scaffold {result.get('scaffold', 'none')}; sandbox isolation: {iso}.\n\n" + "\n".join(lines) + "\n")


def _ci(ci: list) -> str:
    return "-" if ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"
