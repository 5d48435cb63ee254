"""`potstill bench serve`: completion tokens/s served over HTTP to concurrent clients vs the local engine.

    potstill bench serve --teacher embedded --n 64 --max-new-tokens 64 --clients 64

The same prompts, sampled with the same per-row seeds, are decoded twice per round: by the engine in
this process (`complete_ids`, `batch_size` rows at a time, the anchor) and by `potstill serve` on
127.0.0.1 (the real app under uvicorn, keys and the query log on) answering `clients` concurrent
requests, each with its own seed, as `potstill generate` over HTTP sends them. Rounds alternate the
two so that a noisy machine hurts both alike; the figure is served / local from medians, in the
same run. Writes JSON (with the CPU's capability) and prints a table.
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from potstill.lm.types import SamplingParams
from potstill.utils import cpu_info, cpu_line, write_json

SEED0 = 1000


def local_run(teacher, ids: list[list[int]], max_new_tokens: int, batch_size: int) -> tuple[int, float]:
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_logprobs=0)
    t0 = time.perf_counter()
    out = teacher.complete_ids(ids, params, seeds=[SEED0 + i for i in range(len(ids))], batch_size=batch_size)
    return sum(len(c.completion_ids) for c in out), time.perf_counter() - t0


class _Server:
    """`potstill serve`'s app under uvicorn in a thread, on a free port of 127.0.0.1."""

    def __init__(self, teacher, tmp: Path, batch_size: int, max_new_tokens: int):
        import socket

        import uvicorn

        from potstill.guard.keys import KeyStore
        from potstill.guard.serve import ServeConfig, create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cfg = ServeConfig(port=port, keys_url=str(tmp / "keys.db"), querylog_url=str(tmp / "queries.db"),
                          default_rpm=None, default_tpm=None, max_batch_size=batch_size, max_concurrent_per_key=None,
                          max_tokens_cap=max_new_tokens)
        keys = KeyStore(cfg.keys_url)
        _, self.secret = keys.create("bench")
        self.app = create_app(teacher, cfg, keys=keys)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=port, log_level="warning",
                                                    backlog=2048, timeout_keep_alive=120))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.url = f"http://127.0.0.1:{port}/v1"

    def __enter__(self) -> _Server:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if not self.thread.is_alive() or time.time() > deadline:
                raise RuntimeError("bench serve: uvicorn did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=60)


def served_run(srv: _Server, messages: list[list[dict]], max_new_tokens: int, clients: int) -> tuple[int, float]:
    import httpx

    async def run() -> int:
        queue: asyncio.Queue = asyncio.Queue()
        for i, m in enumerate(messages):
            queue.put_nowait((i, m))
        tokens = 0

        async def client() -> None:
            nonlocal tokens
            async with httpx.AsyncClient(base_url=srv.url, timeout=600) as http:
                while not queue.empty():
                    i, m = queue.get_nowait()
                    r = await http.post("/chat/completions", headers={"Authorization": f"Bearer {srv.secret}"},
                                        json={"model": "bench", "messages": m, "max_tokens": max_new_tokens,
                                              "temperature": 1.0, "seed": SEED0 + i})
                    r.raise_for_status()
                    tokens += r.json()["usage"]["completion_tokens"]

        await asyncio.gather(*[client() for _ in range(clients)])
        return tokens

    t0 = time.perf_counter()
    tokens = asyncio.run(run())
    return tokens, time.perf_counter() - t0


def bench_serve(teacher, prompts, max_new_tokens: int = 64, batch_size: int = 32, clients: int = 64, rounds: int = 2,
                out_json: str | None = None, log=print) -> dict[str, Any]:
    import torch

    messages = [p.messages for p in prompts]
    ids = [teacher.encode_chat(m) for m in messages]
    local_run(teacher, ids[:2], 4, 2)  # warm-up
    runs: dict[str, list[dict[str, float]]] = {"local engine": [], "served over HTTP": []}
    with tempfile.TemporaryDirectory(prefix="potstill-bench-serve-") as tmp, \
            _Server(teacher, Path(tmp), batch_size, max_new_tokens) as srv:
        for r in range(rounds):
            for name, fn in (("local engine", lambda: local_run(teacher, ids, max_new_tokens, batch_size)),
                             ("served over HTTP", lambda: served_run(srv, messages, max_new_tokens, clients))):
                c0 = time.process_time()
                tokens, seconds = fn()
                cpu = time.process_time() - c0
                runs[name].append({"tokens": tokens, "seconds": round(seconds, 2), "cpu_s": round(cpu, 2),
                                   "tokens_per_s": round(tokens / seconds, 1)})
                log(f"round {r + 1}/{rounds} {name}: {tokens} tokens in {seconds:.1f} s = {tokens / seconds:.1f} tok/s")
        stats = dict(srv.app.state.service.batcher.stats)
    rows = [{"path": name, "tokens_per_s": statistics.median(x["tokens_per_s"] for x in rs), "runs": rs}
            for name, rs in runs.items()]
    ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
    out = {"model": teacher.name, "prompts": len(ids), "max_new_tokens": max_new_tokens, "batch_size": batch_size,
           "clients": clients, "rounds": rounds, "threads": torch.get_num_threads(), "cpu": cpu_info(),
           "results": rows, "served_vs_local": round(ratio, 3), "server_batches": stats}
    if out_json:
        write_json(out_json, out)
    return out


def format_table(result: dict[str, Any]) -> str:
    lines = [f"serve vs local engine: {result['model']}, {result['prompts']} prompts x {result['max_new_tokens']} "
             f"tokens, {result['clients']} clients with distinct seeds, batch {result['batch_size']}, "
             f"{result['rounds']} rounds (median), {cpu_line(result['cpu'])}",
             "| path | completion tok/s (median) | per round |", "|---|---:|---|"]
    for r in result["results"]:
        lines.append(f"| {r['path']} | {r['tokens_per_s']:.1f} | "
                     + ", ".join(f"{x['tokens_per_s']:.1f}" for x in r["runs"]) + " |")
    lines.append(f"served / local = {result['served_vs_local']:.2f}")
    return "\n".join(lines)
