"""`potstill agent generate`: tasks -> teacher episodes with the sandboxed tool -> a capture.

One capture row per trajectory (store.py's Parquet + manifest, plus a per-token `role_mask`
column). Only episodes whose final answer passes the task's checker enter split "train";
the others go to split "rejected" (kept for analysis). Episodes come from the tasks' "train"
split only; held-out tasks (by instance and by template) are for `potstill agent eval`.
The manifest records the sandbox's isolation and limits and the yield per task kind.
Resumable like `potstill generate`: windows of `shard_rows` episodes, ids already in complete
shards are skipped after a kill -9.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from potstill.config import GenerateConfig, derive, opt
from potstill.errors import PotstillError


@dataclass
class AgentGenerateConfig:
    tasks: str = opt("builtin:potstill_tools", "Tasks: 'builtin:potstill_tools[:N]' or a JSONL task file.")
    teacher: str = derive(GenerateConfig, "teacher", note="An API teacher needs function calling (the tool is then a "
                                                          "run_python call).")
    model: str | None = derive(GenerateConfig, "model")
    tokenizer: str | None = derive(GenerateConfig, "tokenizer", note="API teacher: the trajectories are stored in it.")
    out: str = opt("runs/agentcap", "Capture directory (created; an existing one is resumed).")
    samples: int = derive(GenerateConfig, "samples", 4, "Here: episodes per task (self-consistency; verified ones are kept).")
    max_turns: int = opt(4, "Most assistant turns per episode.")
    scaffold: str = opt("prefill", "Local models: 'prefill' opens each assistant turn with ```python (call the tool) or "
                                   "'Final answer:' (after a run that printed something) as context, the model writes "
                                   "the rest; 'none': the model writes whole turns. API teachers: always none.")
    max_new_tokens: int = derive(GenerateConfig, "max_new_tokens", 192, "Here: per assistant turn.")
    max_tokens: int = opt(2048, "Most tokens per episode (prompt + trajectory).")
    max_tasks: int | None = opt(None, "Use at most this many tasks (of the train split).")
    kinds: list[str] = opt([], "Only tasks of these kinds (arithmetic, dates, units, strings, lists, primes, statistics).")
    templates: list[str] = opt([], "Only tasks of these templates (e.g. bigmul, powmod, crt, sort, mean; "
                                   "agent/tasks.py TEMPLATES): the difficulty mix.")
    temperature: float = derive(GenerateConfig, "temperature", 0.7)
    top_p: float = derive(GenerateConfig, "top_p", 0.95)
    top_k: int = derive(GenerateConfig, "top_k", note="Only model-written tokens have them.")
    codec: str = derive(GenerateConfig, "codec")
    batch_size: int = derive(GenerateConfig, "batch_size", 32, "Here: episodes decoded together.")
    seed: int = derive(GenerateConfig, "seed", note="Also the tasks and episodes.")
    dtype: str = derive(GenerateConfig, "dtype")
    shard_rows: int = derive(GenerateConfig, "shard_rows", 64, "Here: episodes per shard.")
    sandbox_cpu_s: int = opt(5, "Sandbox: CPU seconds per code run.")
    sandbox_wall_s: float = opt(10.0, "Sandbox: wall-clock seconds per code run.")
    sandbox_memory_mb: int = opt(512, "Sandbox: address-space limit per code run (MiB).")
    unsafe_sandbox: bool = opt(False, "Run model code without namespace isolation where none is available (unsafe).")

    def __post_init__(self) -> None:
        if self.samples < 1 or self.max_turns < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise PotstillError("agent generate: samples, max_turns, max_new_tokens and batch_size must be >= 1")
        if self.top_k < 0:
            raise PotstillError("agent generate: top_k must be >= 0")
        from potstill.agent.episode import check_scaffold

        check_scaffold(self.scaffold)


def make_sandbox(cfg):
    from potstill.agent.sandbox import Limits, Sandbox

    limits = Limits(cpu_seconds=cfg.sandbox_cpu_s, wall_seconds=cfg.sandbox_wall_s,
                    memory_bytes=cfg.sandbox_memory_mb * 2**20)
    return Sandbox(limits, allow_unsafe=cfg.unsafe_sandbox)


def load_agent_teacher(cfg):
    """A local HFTeacher, or for an http(s) URL an HTTPTeacher offered the run_python function."""
    if cfg.teacher.startswith(("http://", "https://")):
        from potstill.agent.api_episode import TOOLS
        from potstill.lm.loading import resolve_model_dir
        from potstill.teachers.http import HTTPTeacher

        if not cfg.tokenizer:
            raise PotstillError("agent generate: an API teacher needs --tokenizer (trajectories are stored as token ids)")
        return HTTPTeacher(cfg.teacher, model=cfg.model, tokenizer=str(resolve_model_dir(cfg.tokenizer)), tools=TOOLS)
    from potstill.teachers.hf import HFTeacher

    return HFTeacher.load(cfg.teacher, dtype=cfg.dtype)


def select_tasks(tasks: list, splits: tuple[str, ...], kinds: list[str], limit: int | None,
                 templates: list[str] = ()) -> list:
    for field, wanted, known in (("kinds", kinds, {t.kind for t in tasks}), ("templates", templates, {t.template for t in tasks})):
        unknown = [w for w in wanted if w not in known]
        if unknown:
            raise PotstillError(f"{field}: unknown {', '.join(map(repr, unknown))} (known: {', '.join(sorted(known))})")
    out = [t for t in tasks if t.split in splits and (not kinds or t.kind in kinds)
           and (not templates or t.template in templates)]
    if not out:
        raise PotstillError(f"no tasks in split(s) {', '.join(splits)}" + (f" of kinds {kinds}" if kinds else "")
                            + (f" of templates {list(templates)}" if templates else ""))
    return out[:limit] if limit else out


def yield_table(summaries: list[dict]) -> dict[str, Any]:
    """Verified / episodes and tasks with >= 1 verified episode, per task kind and in total."""
    per: dict[str, dict[str, Any]] = defaultdict(lambda: {"episodes": 0, "verified": 0, "tasks": set(), "solved": set()})
    for s in summaries:
        for key in (s["kind"], "all"):
            p = per[key]
            p["episodes"] += 1
            p["verified"] += int(s["verified"])
            p["tasks"].add(s["task"])
            if s["verified"]:
                p["solved"].add(s["task"])
    return {k: {"episodes": v["episodes"], "verified": v["verified"],
                "yield": round(v["verified"] / v["episodes"], 4) if v["episodes"] else None,
                "tasks": len(v["tasks"]), "tasks_solved": len(v["solved"])} for k, v in sorted(per.items())}


def agent_generate(cfg: AgentGenerateConfig, teacher=None, log=print) -> dict[str, Any]:
    """Run the episodes and write the capture. Returns the final manifest."""
    import pyarrow as pa

    from potstill.agent.api_episode import ApiEpisodeRunner
    from potstill.agent.episode import EpisodeRunner, episode_row, start_messages
    from potstill.agent.tasks import load_tasks, tasks_hash
    from potstill.capture.codec import get_codec
    from potstill.capture.store import CaptureWriter, row_id
    from potstill.lm.types import SamplingParams
    from potstill.utils import quiet_transformers

    tasks = select_tasks(load_tasks(cfg.tasks, cfg.seed), ("train",), cfg.kinds, cfg.max_tasks,
                         cfg.templates)  # bad input first
    sandbox = make_sandbox(cfg)
    log(f"sandbox: isolation={sandbox.isolation}")
    quiet_transformers()
    api = cfg.teacher.startswith(("http://", "https://")) if teacher is None else bool(getattr(teacher, "tools", None))
    if teacher is None:
        teacher = load_agent_teacher(cfg)
    if api and cfg.top_k:
        log("API teacher: function-call arguments come without log-probs; the capture is text-only "
            "(train it with --loss ce)")
    top_k = 0 if api else cfg.top_k
    scaffold = "none" if api else cfg.scaffold
    if api and cfg.scaffold != "none":
        log("API teacher: no prefill scaffold (the API writes whole turns); scaffold=none")
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p,
                            top_logprobs=top_k, seed=cfg.seed)
    identity = teacher.identity()
    codec = get_codec(cfg.codec if top_k else "none", vocab_size=identity.get("vocab_size") or 2**32, k=top_k)
    sampling = {**params.to_dict(), "max_turns": cfg.max_turns, "max_tokens": cfg.max_tokens,
                "tool": "run_python function" if api else "python", "scaffold": scaffold}
    manifest = {
        "kind": "agent",
        "teacher": identity,
        "sampling": sampling,
        "k": top_k,
        "samples_per_prompt": cfg.samples,
        "prompts": {"source": cfg.tasks, "sha256": tasks_hash(tasks), "count": len(tasks), "kinds": cfg.kinds,
                    "templates": cfg.templates},
        "split": {"seed": cfg.seed, "rule": "verified -> train, others -> rejected; tasks of split 'train' only"},
        "sandbox": sandbox.describe(),
        "eos_in_completion": True,
    }
    runner = (ApiEpisodeRunner if api else EpisodeRunner)(teacher, sandbox, params, max_turns=cfg.max_turns,
                                                          max_tokens=cfg.max_tokens, seed=cfg.seed,
                                                          batch_size=cfg.batch_size,
                                                          **({} if api else {"scaffold": scaffold}))
    role_field = pa.field("role_mask", pa.list_(pa.uint8()))
    summaries: list[dict] = []
    t0 = time.perf_counter()
    try:
        with CaptureWriter(cfg.out, manifest, codec, shard_rows=cfg.shard_rows, extra_fields=[role_field]) as writer:
            todo = [(row_id(start_messages(t), sampling, s), t, s) for t in tasks for s in range(cfg.samples)]
            done = writer.done_ids
            todo = [j for j in todo if j[0] not in done]
            if done:
                log(f"resuming: {len(done)} episodes already in complete shards, {len(todo)} to go")
            for w in range(0, len(todo), cfg.shard_rows):
                window = [runner.new(eid, t, s) for eid, t, s in todo[w : w + cfg.shard_rows]]
                runner.run(window, log=log)
                for e in window:
                    writer.add(episode_row(e, teacher.tokenizer, "train" if e.verified else "rejected"))
                    summaries.append(e.summary())
                ok = sum(s["verified"] for s in summaries)
                log(f"episodes {w + len(window)}/{len(todo)}: {ok} verified ({time.perf_counter() - t0:.0f}s)")
            writer.manifest["yield"] = yield_table(_all_summaries(writer, summaries, tasks))
            writer.manifest["episodes_this_run"] = _means(summaries)
    finally:
        runner.close()
    final = writer.manifest
    y = final["yield"].get("all", {})
    log(f"agent capture: {y.get('verified')} verified of {y.get('episodes')} episodes "
        f"({y.get('tasks_solved')} of {y.get('tasks')} tasks solved) in {cfg.out}")
    return final


def _all_summaries(writer, this_run: list[dict], tasks: list) -> list[dict]:
    """Summaries of every row in the capture (earlier runs included), from the stored columns."""
    import json

    import pyarrow.parquet as pq

    by_q = {t.question: t for t in tasks}
    out = []
    for s in writer.manifest["shards"]:
        table = pq.read_table(writer.directory / s["file"], columns=["id", "prompt", "split"])
        for rid, prompt, split in zip(*(table.column(c).to_pylist() for c in ("id", "prompt", "split")), strict=True):
            t = by_q.get(json.loads(prompt)[1]["content"])
            if t is not None:
                out.append({"id": rid, "task": t.id, "kind": t.kind, "verified": split == "train"})
    stored = {o["id"] for o in out}
    return out + [s for s in this_run if s["id"] not in stored]


def _means(summaries: list[dict]) -> dict[str, Any]:
    n = len(summaries)
    if not n:
        return {"episodes": 0}
    calls = sum(s["tool_calls"] for s in summaries)
    return {"episodes": n, "mean_turns": round(sum(s["turns"] for s in summaries) / n, 3),
            "tool_calls": calls, "well_formed_call_share": round(sum(s["well_formed_calls"] for s in summaries) / calls, 4)
            if calls else None, "sandbox_errors": sum(s["sandbox_errors"] for s in summaries),
            "mean_tokens": round(sum(s["tokens"] for s in summaries) / n, 1)}
