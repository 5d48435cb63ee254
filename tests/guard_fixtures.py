"""Shared helpers for the guard tests: a tiny HF teacher and a real uvicorn server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.tiny import make_tiny_model, make_tiny_tokenizer

WATERMARK_KEY = "wm-secret-do-not-leak-7d41c9"


def wm_key(name: str) -> str:
    """A deterministic test key strong enough for WatermarkConfig (>= 128 bits): never use in production."""
    import hashlib

    return f"test-{name}-" + hashlib.sha256(name.encode()).hexdigest()[:32]


def tiny_teacher(layers: int = 2, seed: int = 0):
    from potstill.teachers.hf import HFTeacher

    tok = make_tiny_tokenizer()
    return HFTeacher(make_tiny_model(tok, layers=layers, seed=seed), tok, name="tiny")


@contextmanager
def one_torch_thread():
    """Tiny models decode faster on one thread, and a busy shared CI box makes 2-thread OMP barriers stall."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    app: object
    url: str  # http://127.0.0.1:PORT
    keys: object  # KeyStore
    querylog_url: str

    @property
    def base(self) -> str:
        return self.url + "/v1"

    def flush(self) -> None:
        self.app.state.querylog.flush()


@contextmanager
def live_server(teacher, tmp: Path, limiter=None, log_level: str = "warning", server_kwargs: dict | None = None,
                **cfg_kwargs):
    """Serve `teacher` with uvicorn in a thread; yields a LiveServer; stops (and flushes the log) on exit.

    `server_kwargs` go to `uvicorn.Config` (e.g. root_path), the rest to `ServeConfig` (keys_url and
    querylog_url default to SQLite files in `tmp`)."""
    from potstill.guard.serve import create_app

    with _running(lambda cfg, keys: create_app(teacher, cfg, keys=keys, limiter=limiter), tmp, log_level,
                  server_kwargs, cfg_kwargs) as srv:
        yield srv


@contextmanager
def live_gateway(upstream: str, tmp: Path, limiter=None, log_level: str = "warning", **cfg_kwargs):
    """`potstill serve --upstream` in a thread (like `live_server`, no model)."""
    from potstill.guard.gateway import create_gateway

    with _running(lambda cfg, keys: create_gateway(cfg, keys=keys, limiter=limiter), tmp, log_level, None,
                  {"upstream": upstream, **cfg_kwargs}) as srv:
        yield srv


@contextmanager
def _running(build, tmp: Path, log_level: str, server_kwargs: dict | None, cfg_kwargs: dict):
    import uvicorn

    from potstill.guard.keys import KeyStore
    from potstill.guard.middleware import uvicorn_options
    from potstill.guard.serve import ServeConfig

    cfg = ServeConfig(**{"host": "127.0.0.1", "port": free_port(), "keys_url": str(tmp / "keys.db"),
                         "querylog_url": str(tmp / "queries.db"), **cfg_kwargs})
    keys = KeyStore(cfg.keys_url)
    app = build(cfg, keys)
    server = uvicorn.Server(
        uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=log_level, lifespan="on", backlog=2048,
                       **{**uvicorn_options(), **(server_kwargs or {})})
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        if not thread.is_alive() or time.time() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield LiveServer(app, f"http://127.0.0.1:{cfg.port}", keys, cfg.querylog_url)
    finally:
        server.should_exit = True
        thread.join(timeout=60)
