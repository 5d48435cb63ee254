"""`ServeConfig`: how `potstill serve` runs, one home per setting (the CLI derives its flags from here).

Kept apart from the server's code so `potstill serve --help` and the gateway need no torch.
"""

from __future__ import annotations

import ipaddress
from dataclasses import asdict, dataclass, field
from typing import Any

from potstill.config import opt
from potstill.errors import PotstillError
from potstill.guard.ratelimit import DEFAULT_RPM, DEFAULT_TPM
from potstill.utils import potstill_home

TEXT_ONLY = 0
"""A key's `max_top_logprobs` when it may receive no log-probs at all: what new keys get (`KeyStore.create`)."""


@dataclass
class ServeConfig:
    """How `potstill serve` runs. URLs may also be plain SQLite file paths."""

    host: str = opt("127.0.0.1", "Interface to bind (0.0.0.0 to accept connections from other machines).")
    port: int = opt(8000, "TCP port.")
    keys_url: str | None = opt(None, "API-key store (SQLAlchemy URL or SQLite path); None -> "
                                     "$POTSTILL_HOME/guard/keys.db. Shared limits live here too.")
    querylog_url: str | None = opt(None, "Query log (SQLAlchemy URL or SQLite path, WAL); None -> "
                                         "$POTSTILL_HOME/guard/queries.db.")
    watermark: Any = field(default=None, repr=False, metadata={
        "help": "A `guard.watermark.WatermarkConfig`, or None for no watermark (off unless a key is given)."})
    max_tokens_cap: int = opt(1024, "Largest `max_tokens` a request may ask for (400 above it).")
    max_body_bytes: int = opt(1 << 20, "Largest request body in bytes (413 above it, by Content-Length or "
                                       "by the bytes received).")
    default_rpm: int | None = opt(DEFAULT_RPM, "Requests per minute for keys without their own limit "
                                               "(None = unlimited).")
    default_tpm: int | None = opt(DEFAULT_TPM, "Tokens (prompt + max_tokens) per minute for keys without their "
                                               "own limit (None = unlimited).")
    shared_limits: bool = opt(True, "Keep the rate-limit buckets in the key store's database, so every worker "
                                    "and replica using it shares one set of limits (and a restart resets "
                                    "nothing); off: per process, in memory.")
    model_name: str | None = opt(None, "Model id reported by /v1/models and in responses; None -> the "
                                       "teacher's name.")
    batch_window_ms: float = opt(5.0, "How long the batcher waits for more requests before decoding a batch.")
    max_batch_size: int = opt(32, "Most requests decoded together.")
    max_batch_tokens: int = opt(65_536, "Most prompt + max_tokens tokens in one batch (bounds KV-cache memory).")
    max_top_logprobs: int = opt(20, "Largest `top_logprobs` (chat) / `logprobs` (completions) a request may "
                                    "ask for; each key may receive at most its own allowance (`potstill keys "
                                    "create --max-top-logprobs`; new keys: text only, 403 otherwise).")
    max_pending: int = opt(1024, "Most requests waiting for a batch (gateway: in flight upstream); above it "
                                 "new requests get 503 with `Retry-After`.")
    max_concurrent_per_key: int | None = opt(64, "Most requests one key may have in flight (None = no cap); "
                                                 "above it 429 with `Retry-After`.")
    request_timeout_s: float = opt(600.0, "Deadline from admission to the last token: past it the row stops "
                                          "decoding and the request gets 504 (a stream: an error event), "
                                          "charged for the tokens delivered.")
    docs: bool = opt(False, "Serve /docs, /redoc and /openapi.json (off: they describe the API to anyone).")
    upstream: str | None = opt(None, "Gateway mode: the OpenAI-compatible server to forward to "
                                     "(e.g. http://10.0.0.5:8080/v1 for vLLM, llama.cpp, TGI, Ollama or "
                                     "potstill serve); no model is loaded here.")
    upstream_key_env: str = opt("POTSTILL_UPSTREAM_KEY", "Environment variable holding the upstream's API "
                                                         "key (sent as a bearer token; unset = none).")
    upstream_timeout_s: float = opt(60.0, "Gateway: longest wait for the upstream to connect, answer or send "
                                          "the next stream chunk (504 past it).")
    trusted_proxies: list[str] = opt([], "CIDRs of reverse proxies whose X-Forwarded-For is believed for the "
                                         "logged client address (others' is ignored).")
    antidistill: Any = field(default=None, repr=False, metadata={
        "help": "A `config.AntidistillConfig` (anti-distillation sampling, guard/antidistill.py), or None (off)."})

    def __post_init__(self) -> None:
        home = potstill_home() / "guard"
        self.keys_url = self.keys_url or str(home / "keys.db")
        self.querylog_url = self.querylog_url or str(home / "queries.db")
        for name in ("max_tokens_cap", "max_body_bytes", "max_batch_size", "max_batch_tokens", "max_pending",
                     "max_concurrent_per_key"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PotstillError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0 <= self.port <= 65535:
            raise PotstillError(f"port must be 0-65535, got {self.port}")
        if self.batch_window_ms < 0:
            raise PotstillError("batch_window_ms must be >= 0")
        for name in ("request_timeout_s", "upstream_timeout_s"):
            if not getattr(self, name) > 0:
                raise PotstillError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("default_rpm", "default_tpm"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise PotstillError(f"{name} must be >= 1 or None (unlimited)")
        if self.upstream is not None and not self.upstream.startswith(("http://", "https://")):
            raise PotstillError(f"upstream must be an http(s):// URL, got {self.upstream[:200]!r}")
        if self.upstream is not None and self.antidistill is not None:
            raise PotstillError("--antidistill tilts a local teacher's sampler; a gateway (--upstream) has none")
        self.trusted_proxies = list(self.trusted_proxies)
        for cidr in self.trusted_proxies:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise PotstillError(f"trusted_proxies: not an IP network: {cidr[:100]!r}") from None

    def public_dict(self) -> dict[str, Any]:
        """The config without secrets (the watermark key never appears)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__ if k not in ("watermark", "antidistill")}
        out["watermark"] = self.watermark.public_dict() if self.watermark is not None else None
        ad = self.antidistill  # returned log-probs are the tilted distribution's
        out["antidistill"] = None if ad is None else {**asdict(ad), "top_logprobs": "tilted"}
        return out
