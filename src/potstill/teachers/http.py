"""HTTP teacher: any OpenAI-compatible server (vLLM, llama.cpp server, Ollama, hosted APIs, potstill serve).

    teacher = HTTPTeacher("http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-7B-Instruct", tokenizer="Qwen/...")
    outs = teacher.complete([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=64))

The API is synchronous; underneath, requests go out from a private event loop on a daemon thread,
at most `concurrency` in flight for the whole teacher, optionally paced (`rate_limit_rps`), retried
with backoff honouring `Retry-After`, and cached on disk when `cache_dir` is given, so a resumed
capture does not pay twice: all of that is `http_transport.py`. What the four server dialects
send and how their tokens map to the tokenizer's ids (or a text-only completion) is
`http_dialects.py`, pure functions over the JSON. This module joins them: the request body, the
prompt's ids from the local chat template, the teacher's identity and `stats`. Its options are
declared once, in `config.HttpConfig` (`potstill generate --http-…`, a recipe's `generate:` section).
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx

from potstill.config import HttpConfig
from potstill.errors import PotstillError
from potstill.lm.tokens import row_seed, tokenizer_hash
from potstill.lm.types import Completion, SamplingParams
from potstill.teachers.http_dialects import ResponseMapper, TokenMapper, parse_response, tool_calls_of
from potstill.teachers.http_transport import (
    ENDPOINTS,
    RETRY_AFTER_MAX,
    ResponseCache,
    Transport,
    redact_url,
    retry_after_seconds,
    retryable,
)
from potstill.utils import sha256_text

__all__ = ["ENDPOINTS", "RETRY_AFTER_MAX", "HTTPTeacher", "TokenMapper", "parse_response", "redact_url",
           "retry_after_seconds", "retryable"]

log = logging.getLogger(__name__)
_D = HttpConfig()  # the options' one home: HTTPTeacher's defaults are its defaults


class HTTPTeacher:
    """A teacher behind an OpenAI-compatible HTTP API. See the module docstring."""

    local_ids = False  # the server templates and tokenises; ids are mapped back from its tokens
    can_score = False  # an API cannot teacher-force

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key_env: str | None = _D.http_api_key_env,
        tokenizer=None,
        endpoint: str = _D.http_endpoint,
        concurrency: int = _D.http_concurrency,
        max_retries: int = _D.http_max_retries,
        timeout: float = _D.http_timeout,
        rate_limit_rps: float | None = _D.http_rate_limit_rps,
        cache_dir: str | os.PathLike | None = None,
        max_top_logprobs: int = _D.http_max_top_logprobs,
        backoff_base: float = _D.http_backoff_base,
        backoff_max: float = _D.http_backoff_max,
        extra_body: dict[str, Any] | None = _D.http_extra_body,
        tools: list[dict] | None = None,
    ):
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PotstillError(f"{redact_url(base_url)}: not an http(s) URL")
        path = parts.path.rstrip("/")
        for name, suffix in (("chat", "/chat/completions"), ("completions", "/completions")):
            if path.endswith(suffix):  # a full endpoint URL names its endpoint
                path, endpoint = path[: -len(suffix)], name
                break
        if endpoint not in ENDPOINTS:
            raise PotstillError(f"endpoint must be 'chat' or 'completions', not {endpoint!r}")
        if concurrency < 1 or max_retries < 0 or max_top_logprobs < 0:
            raise PotstillError("concurrency must be >= 1, max_retries and max_top_logprobs >= 0")
        if rate_limit_rps is not None and rate_limit_rps <= 0:
            raise PotstillError("rate_limit_rps must be > 0")
        path = path or "/v1"
        self.base_url = redact_url(urlunsplit((parts.scheme, parts.netloc, path, "", "")))
        self.endpoint = endpoint
        self.url = self.base_url + ENDPOINTS[endpoint]  # for messages: no credentials
        self.model = model
        self._model_checked = model is not None
        self.api_key_env = api_key_env
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.stats: dict[str, Any] = {
            "requests": 0,  # HTTP requests sent, retries included
            "retries": 0,
            "cache_hits": 0,
            "tokens": 0,  # completion tokens received with log-probs
            "token_lookups": 0,  # token strings mapped to ids (sampled + top-k)
            "token_map_mismatches": 0,
            "token_map_mismatch_rate": 0.0,
            "text_only_completions": 0,
        }
        self._stats_lock = threading.Lock()
        self.responses = ResponseMapper(tokenizer, count=self._bump)
        self.mapper = self.responses.mapper
        self.transport = Transport(
            urlunsplit((parts.scheme, parts.netloc, path, "", "")), parts.query, self.url,
            api_key=os.environ.get(api_key_env) if api_key_env else None, concurrency=concurrency,
            max_retries=max_retries, timeout=timeout, rate_limit_rps=rate_limit_rps, backoff_base=backoff_base,
            backoff_max=backoff_max, cache_dir=cache_dir, count=self._bump,
        )
        self.concurrency = self.transport.concurrency
        self.max_retries = self.transport.max_retries
        self.timeout = self.transport.timeout
        self.rate_limit_rps = rate_limit_rps
        self.cache_dir = self.transport.cache.root if self.transport.cache is not None else None
        self.max_top_logprobs = int(max_top_logprobs)
        self.extra_body = dict(extra_body or {})
        if tools and self.endpoint != "chat":
            raise PotstillError("tools (function calling) need the chat endpoint")
        self.tools = list(tools or [])  # OpenAI function specs sent with every request; calls come back in Completion.tool_calls
        self.text_only = False
        self._warned_no_tokenizer = False

    def __repr__(self) -> str:
        return f"HTTPTeacher({self.url!r}, model={self.model!r}, endpoint={self.endpoint!r})"

    @property
    def name(self) -> str:
        return self.model or f"http:{urlsplit(self.base_url).netloc}"

    # ---- identity / prompts ---------------------------------------------------------------------
    def identity(self) -> dict[str, Any]:
        if not self._model_checked:
            self._resolve_model_sync()
        tok = self.tokenizer
        tok_sha = tmpl_sha = None
        if tok is not None:
            tok_sha = tokenizer_hash(tok)
            tmpl_sha = sha256_text(getattr(tok, "chat_template", None) or "")
        return {
            "name": self.name,
            "backend": "http",
            "base_url": self.base_url,
            "endpoint": self.endpoint,
            "weights_sha256": None,
            "tokenizer_sha256": tok_sha,
            "chat_template_sha256": tmpl_sha,
            "vocab_size": len(tok) if tok is not None else None,
        }

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Prompt ids from the local tokenizer's chat template ([] without a tokenizer or template)."""
        tok = self.tokenizer
        if tok is None or not getattr(tok, "chat_template", None):
            return []
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    def _prompt_text(self, messages) -> str:
        """The text sent to the completions endpoint: the chat template rendered locally, if there is one."""
        if isinstance(messages, str):
            return messages
        tok = self.tokenizer
        if tok is not None and getattr(tok, "chat_template", None):
            return tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return "\n\n".join(str(m.get("content", "")) for m in messages)

    def _prompt_ids(self, messages, prompt_text: str | None) -> list[int]:
        if self.tokenizer is None:
            return []
        if isinstance(messages, str) or (prompt_text is not None and not getattr(self.tokenizer, "chat_template", None)):
            return [int(i) for i in self.tokenizer.encode(prompt_text or messages, add_special_tokens=False)]
        return self.encode_chat(messages)

    # ---- requests -------------------------------------------------------------------------------
    def request_body(self, messages, params: SamplingParams, seed: int) -> dict[str, Any]:
        """The JSON body for one prompt (also the cache key, with the endpoint)."""
        k = min(params.top_logprobs, self.max_top_logprobs)
        body: dict[str, Any] = {}
        if self.model is not None:
            body["model"] = self.model
        if self.endpoint == "chat":
            body["messages"] = messages
        else:
            body["prompt"] = self._prompt_text(messages)
        body.update(max_tokens=params.max_new_tokens, temperature=params.temperature, top_p=params.top_p, seed=int(seed))
        if params.stop:
            body["stop"] = list(params.stop)
        if self.tools:
            body["tools"] = self.tools
        if self.endpoint == "chat":
            body.update(logprobs=True, top_logprobs=k)
        else:
            body["logprobs"] = k
        body.update(self.extra_body)
        return body

    def cache_key(self, body: dict) -> str:
        return ResponseCache.key(self.endpoint, body)

    def _bump(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    async def _setup(self) -> None:
        client = await self.transport.client()
        if not self._model_checked:
            try:
                resp = await client.get(self.transport.endpoint_url("/models"))
                self._pick_model(resp)
            except httpx.HTTPError:
                pass
            self._model_checked = True

    def _pick_model(self, resp) -> None:
        """With no model given, use the server's only model; several -> ask the user to choose."""
        if resp.status_code != 200:
            return
        try:
            ids = [m["id"] for m in resp.json().get("data", []) if isinstance(m, dict) and "id" in m]
        except (ValueError, AttributeError, TypeError):
            return
        if len(ids) == 1:
            self.model = str(ids[0])
        elif len(ids) > 1:
            self._model_checked = True
            raise PotstillError(f"{self.base_url}: serves {len(ids)} models, pass model= one of: {', '.join(map(str, ids[:10]))}")

    def _resolve_model_sync(self) -> None:
        try:
            with httpx.Client(timeout=min(self.timeout, 30.0), headers=self.transport.headers()) as client:
                self._pick_model(client.get(self.transport.endpoint_url("/models")))
        except httpx.HTTPError:
            pass
        self._model_checked = True

    async def _complete_async(self, prompts, params: SamplingParams, seeds: list[int]) -> list[dict]:
        await self._setup()
        bodies = [self.request_body(m, params, s) for m, s in zip(prompts, seeds, strict=True)]
        tasks = [asyncio.ensure_future(self.transport.one(self.endpoint, b, parse_response)) for b in bodies]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    # ---- the protocol ---------------------------------------------------------------------------
    def complete(self, prompts: list[list[dict]], params: SamplingParams, seeds: list[int] | None = None) -> list[Completion]:
        """Answer a batch of chat prompts (one request each, `concurrency` at a time). Thread-safe."""
        if not prompts:
            return []
        if seeds is None:
            seeds = [row_seed(params.seed, i) & 0x7FFFFFFF for i in range(len(prompts))]  # fits every server's seed type
        if len(seeds) != len(prompts):
            raise PotstillError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        runner = self.transport.get_runner(self)
        responses = runner.run(self._complete_async(prompts, params, list(seeds)))
        outs = [self._to_completion(d, m, params) for d, m in zip(responses, prompts, strict=True)]
        for out, data in zip(outs, responses, strict=True):
            out.tool_calls = tool_calls_of(data)
        return outs

    async def acomplete(self, prompts, params: SamplingParams, seeds: list[int] | None = None) -> list[Completion]:
        """`complete` for async callers: waits in a worker thread; requests still go out on the teacher's loop."""
        return await asyncio.to_thread(self.complete, prompts, params, seeds)

    def close(self) -> None:
        """Close connections and stop the background loop (a later call starts a new one)."""
        self.transport.close()

    def __enter__(self) -> HTTPTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- response -> Completion -----------------------------------------------------------------
    def _to_completion(self, data: dict, messages, params: SamplingParams) -> Completion:
        parsed = parse_response(data)
        prompt_text = self._prompt_text(messages) if self.endpoint == "completions" else None
        prompt_ids = parsed.prompt_ids if parsed.prompt_ids is not None else self._prompt_ids(messages, prompt_text)
        out = self.responses.to_completion(parsed, prompt_ids, params.top_logprobs)
        if out.no_tokenizer:
            self._warn_no_tokenizer()
        if out.text_only:
            self.text_only = True
        with self._stats_lock:
            n = self.stats["token_lookups"]
            self.stats["token_map_mismatch_rate"] = self.stats["token_map_mismatches"] / n if n else 0.0
        return out.completion

    def _warn_no_tokenizer(self) -> None:
        if not self._warned_no_tokenizer:
            self._warned_no_tokenizer = True
            log.warning("%s: the server names tokens by string only and no tokenizer was given: text-only capture "
                        "(pass tokenizer= to map tokens to ids)", self.url)
