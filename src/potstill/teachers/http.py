"""HTTP teacher: any OpenAI-compatible server (vLLM, llama.cpp server, Ollama, hosted APIs, potstill serve).

    teacher = HTTPTeacher("http://127.0.0.1:8000/v1", model="Qwen/Qwen2.5-7B-Instruct", tokenizer="Qwen/...")
    outs = teacher.complete([[{"role": "user", "content": "Hi"}]], SamplingParams(max_new_tokens=64))

The API is synchronous; underneath, requests go out from a private event loop on a daemon thread
(`httpx.AsyncClient`, keep-alive across calls), at most `concurrency` in flight for the whole teacher
(whichever threads call it), optionally paced by a requests/s token bucket. 429, 408, 5xx, timeouts
and connection errors are retried with exponential backoff and full jitter, honouring `Retry-After`
(seconds or an HTTP date; also `retry-after-ms`); any other 4xx fails at once with the server's own
message. Successful responses can be cached on disk (`cache_dir`, one JSON file per request keyed by
the sha256 of the canonical request), so a resumed capture does not pay twice.

Log-prob shapes understood (first match wins):
- chat `choices[0].logprobs.content[i] = {token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}`
  (OpenAI, vLLM, potstill serve, Ollama >= 0.12.11, llama.cpp >= b4380, whose entries also carry `id`,
  and `prob`/`top_probs` instead when it runs with `post_sampling_probs`); llama.cpp's `/v1/completions`
  uses this shape too;
- completions `choices[0].logprobs = {tokens, token_logprobs, top_logprobs: [{token: logprob}], text_offset}`
  (OpenAI legacy, vLLM);
- llama.cpp `completion_probabilities` (top level or in the choice): new rows `{id, token, bytes, logprob,
  top_logprobs}` and the older `{content, probs: [{tok_str, prob}]}` rows (ask old servers with
  `extra_body={"n_probs": k}`);
- no log-probs at all (Ollama before 0.12.11, many hosted APIs): the completion is text-only.

Token ids come, in this order, from the entry's own `id` (llama.cpp), the choice's `token_ids` (vLLM
`return_token_ids`), a `token_id:N` token string (vLLM `return_tokens_as_token_ids`), else the token
string mapped through `tokenizer` (vocab form first, then the `bytes` field rewritten to the
tokenizer's byte-level (`Ġ`) or SentencePiece (`▁`, `<0xNN>`) form). Top-k entries that do not map are
dropped and counted in `stats["token_map_mismatches"]`; a sampled token that does not map becomes
the tokenizer's unk id (also counted).

Text-only: when a completion has no per-token log-probs (or no way to turn them into ids, e.g. no
tokenizer), its `sampled_logprob`, `topk_ids` and `topk_logprobs` are None, `completion_ids` are the
server's ids if given, else `tokenizer.encode(text)`, else [], and `teacher.text_only` becomes True.
The same holds when top-k was asked for but the server returned no alternatives.
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import math
import os
import random
import re
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
import numpy as np

from potstill.errors import PotstillError
from potstill.teachers.base import Completion, SamplingParams
from potstill.utils import atomic_path, bytes_to_unicode, sha256_text

log = logging.getLogger(__name__)

ENDPOINTS = {"chat": "/chat/completions", "completions": "/completions"}
RETRY_AFTER_MAX = 300.0  # never sleep longer than this on one Retry-After
_TOKEN_ID = re.compile(r"^token_id:(\d+)$")
_ESCAPED_BYTES = re.compile(r"\\x([0-9a-fA-F]{2})")


def retryable(status: int) -> bool:
    """429 (rate limited), 408 (request timeout) and every 5xx are worth another try."""
    return status in (408, 429) or status >= 500


def retry_after_seconds(headers: httpx.Headers | dict, now: datetime | None = None) -> float | None:
    """Seconds the server asks us to wait: `retry-after-ms`, or `Retry-After` as seconds or an HTTP date."""
    headers = httpx.Headers(headers)
    ms = headers.get("retry-after-ms")
    if ms:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def redact_url(url: str) -> str:
    """The URL without user:password and query string (it may hold keys): safe for logs and manifests."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


class TokenMapper:
    """Token strings (as servers send them) -> ids of a Hugging Face tokenizer."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.vocab: dict[str, int] = dict(tokenizer.get_vocab())  # == convert_tokens_to_ids, but tells unknowns apart
        self.unk_id = tokenizer.unk_token_id
        self.byte_chars = bytes_to_unicode()
        self._memo: dict[tuple[str | None, bytes | None], int | None] = {}

    def lookup(self, token: str | None, raw: bytes | None = None) -> int | None:
        key = (token, raw)
        if key not in self._memo:
            self._memo[key] = self._lookup(token, raw)
        return self._memo[key]

    def _lookup(self, token: str | None, raw: bytes | None) -> int | None:
        if token is not None and token in self.vocab:  # the server sent the vocab form itself
            return self.vocab[token]
        if raw is None and token is not None:
            raw = _bytes_from_token_string(token)
        if not raw:
            return None
        forms = ["".join(self.byte_chars[b] for b in raw)]  # byte-level BPE ('Ġ', 'Ċ', 'Ã')
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            text = None
        if text is not None:
            forms += [text.replace(" ", "▁"), text]  # SentencePiece
        if len(raw) == 1:
            forms.append(f"<0x{raw[0]:02X}>")  # SentencePiece byte fallback
        for form in forms:
            if form in self.vocab:
                return self.vocab[form]
        if text:  # last resort: the tokenizer itself, when the text is exactly one token
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            if len(ids) == 1:
                return int(ids[0])
        return None


def _bytes_from_token_string(token: str) -> bytes:
    """A token string's bytes; OpenAI writes partial UTF-8 tokens as 'bytes:\\xe2\\x80'."""
    if token.startswith("bytes:") and _ESCAPED_BYTES.search(token):
        return bytes(int(h, 16) for h in _ESCAPED_BYTES.findall(token))
    return token.encode("utf-8")


# ---- response parsing ---------------------------------------------------------------------------
@dataclass
class _Tok:
    text: str | None
    id: int | None
    raw: bytes | None
    logprob: float | None


@dataclass
class _Pos:
    tok: _Tok
    top: list[_Tok]


def _log(p) -> float | None:
    if p is None:
        return None
    p = float(p)
    return math.log(p) if p > 0 else -math.inf


def _as_float(x) -> float | None:
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


def _entry(d: dict) -> _Tok:
    lp = _as_float(d.get("logprob"))
    if lp is None and d.get("prob") is not None:  # llama.cpp post_sampling_probs
        lp = _log(d.get("prob"))
    raw = None
    if isinstance(d.get("bytes"), list):
        try:
            raw = bytes(d["bytes"])
        except (TypeError, ValueError):
            raw = None
    tid = d.get("id")
    tid = tid if isinstance(tid, int) and not isinstance(tid, bool) and tid >= 0 else None
    token = d.get("token")
    return _Tok(token if isinstance(token, str) else None, tid, raw, lp)


def _positions_content(content: list) -> list[_Pos]:
    out = []
    for d in content:
        if not isinstance(d, dict):
            continue
        top = d.get("top_logprobs")
        if top is None:
            top = d.get("top_probs")
        out.append(_Pos(_entry(d), [_entry(t) for t in (top or []) if isinstance(t, dict)]))
    return out


def _positions_completions(lp: dict) -> list[_Pos]:
    tokens = lp.get("tokens") or []
    token_lps = lp.get("token_logprobs") or []
    tops = lp.get("top_logprobs") or []
    out = []
    for i, token in enumerate(tokens):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        sampled = _as_float(token_lps[i]) if i < len(token_lps) else None
        out.append(_Pos(_Tok(token, None, None, sampled), [_Tok(t, None, None, _as_float(v)) for t, v in top.items()]))
    return out


def _positions_llamacpp(rows: list) -> list[_Pos]:
    out = []
    for r in rows:
        if not isinstance(r, dict):
            continue
        if "probs" in r and "token" not in r:  # before b4380: {content, probs: [{tok_str, prob}]}
            token = r.get("content")
            top = [_Tok(p.get("tok_str"), None, None, _log(p.get("prob"))) for p in r.get("probs") or [] if isinstance(p, dict)]
            sampled = next((t.logprob for t in top if t.text == token), None)
            out.append(_Pos(_Tok(token, None, None, sampled), top))
        else:
            out.extend(_positions_content([r]))
    return out


def _int_list(x) -> list[int] | None:
    if isinstance(x, list) and all(isinstance(i, int) and not isinstance(i, bool) for i in x):
        return list(x)
    return None


@dataclass
class _Parsed:
    text: str
    finish_reason: str
    positions: list[_Pos] | None
    token_ids: list[int] | None
    prompt_ids: list[int] | None


def parse_response(data: dict) -> _Parsed:
    """One OpenAI-compatible response (chat or completions, any of the servers above) -> text + positions."""
    choices = data.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        raise ValueError("response has no choices")
    choice = choices[0]
    message = choice.get("message") if isinstance(choice.get("message"), dict) else {}
    text = message.get("content")
    if not isinstance(text, str):
        text = choice.get("text") if isinstance(choice.get("text"), str) else ""
    finish = "length" if choice.get("finish_reason") == "length" else "stop"

    positions = None
    lp = choice.get("logprobs")
    if isinstance(lp, dict):
        if isinstance(lp.get("content"), list):
            positions = _positions_content(lp["content"])
        elif isinstance(lp.get("tokens"), list):
            positions = _positions_completions(lp)
    if positions is None:
        rows = data.get("completion_probabilities", choice.get("completion_probabilities"))
        if isinstance(rows, list):
            positions = _positions_llamacpp(rows)
    prompt_ids = _int_list(data.get("prompt_token_ids")) or _int_list(choice.get("prompt_token_ids"))
    return _Parsed(text, finish, positions, _int_list(choice.get("token_ids")), prompt_ids)


def _special_ids(tokenizer) -> set[int]:
    """Special tokens (EOS, end-of-turn, ...): the stop token a server may append is one of these."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return ids


# ---- the event loop the sync API runs on ----------------------------------------------------------
class _Runner:
    """A private event loop on a daemon thread, with the teacher's client and concurrency semaphore."""

    def __init__(self):
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="potstill-http", daemon=True)
        self.thread.start()
        self.pid = os.getpid()
        self.client: httpx.AsyncClient | None = None
        self.sem: asyncio.Semaphore | None = None

    def alive(self) -> bool:
        return self.pid == os.getpid() and self.thread.is_alive() and not self.loop.is_closed()

    def run(self, coro):
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return fut.result()
        except BaseException:
            fut.cancel()
            raise

    def shutdown(self) -> None:
        if not self.alive():
            return

        async def _close():
            if self.client is not None:
                await self.client.aclose()
            self.loop.stop()

        if threading.current_thread() is self.thread:  # collected on its own loop: just stop it
            self.loop.call_soon(self.loop.stop)
            return
        asyncio.run_coroutine_threadsafe(_close(), self.loop)
        self.thread.join(timeout=5)
        if not self.thread.is_alive():
            self.loop.close()


class _TokenBucket:
    """Requests/s pacing shared by every caller of one teacher (reservations: no thundering herd)."""

    def __init__(self, rate: float, burst: float = 1.0):
        self.rate = float(rate)
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.stamp = time.monotonic()
        self.lock = threading.Lock()

    def reserve(self) -> float:
        with self.lock:
            now = time.monotonic()
            self.tokens = min(self.capacity, self.tokens + (now - self.stamp) * self.rate)
            self.stamp = now
            self.tokens -= 1.0
            return 0.0 if self.tokens >= 0 else -self.tokens / self.rate

    async def acquire(self) -> None:
        wait = self.reserve()
        if wait > 0:
            await asyncio.sleep(wait)


# ---- the teacher --------------------------------------------------------------------------------
class HTTPTeacher:
    """A teacher behind an OpenAI-compatible HTTP API. See the module docstring."""

    local_ids = False  # the server templates and tokenises; ids are mapped back from its tokens
    can_score = False  # an API cannot teacher-force

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        api_key_env: str | None = "OPENAI_API_KEY",
        tokenizer=None,
        endpoint: str = "chat",
        concurrency: int = 8,
        max_retries: int = 6,
        timeout: float = 120,
        rate_limit_rps: float | None = None,
        cache_dir: str | os.PathLike | None = None,
        max_top_logprobs: int = 20,
        backoff_base: float = 0.5,
        backoff_max: float = 60.0,
        extra_body: dict[str, Any] | None = None,
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
        self._root = urlunsplit((parts.scheme, parts.netloc, path, "", ""))
        self._query = parts.query
        self.base_url = redact_url(urlunsplit((parts.scheme, parts.netloc, path, "", "")))
        self.endpoint = endpoint
        self.url = self.base_url + ENDPOINTS[endpoint]  # for messages: no credentials
        self.model = model
        self._model_checked = model is not None
        self.api_key_env = api_key_env
        self._api_key = os.environ.get(api_key_env) if api_key_env else None
        if isinstance(tokenizer, (str, os.PathLike)):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(tokenizer)
        self.tokenizer = tokenizer
        self.mapper = TokenMapper(tokenizer) if tokenizer is not None else None
        self._special_ids = _special_ids(tokenizer) if tokenizer is not None else set()
        self.concurrency = int(concurrency)
        self.max_retries = int(max_retries)
        self.timeout = float(timeout)
        self.rate_limit_rps = rate_limit_rps
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.max_top_logprobs = int(max_top_logprobs)
        self.backoff_base = float(backoff_base)
        self.backoff_max = float(backoff_max)
        self.extra_body = dict(extra_body or {})
        self.text_only = False
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
        self._bucket = _TokenBucket(rate_limit_rps) if rate_limit_rps else None
        self._runner: _Runner | None = None
        self._runner_lock = threading.Lock()
        self._warned_no_tokenizer = False
        self._finalizer = None

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
            from potstill.teachers.hf import tokenizer_hash

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
        if self.endpoint == "chat":
            body.update(logprobs=True, top_logprobs=k)
        else:
            body["logprobs"] = k
        body.update(self.extra_body)
        return body

    def cache_key(self, body: dict) -> str:
        canonical = json.dumps({"endpoint": self.endpoint, "body": body}, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return sha256_text(canonical)

    def _cache_path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.json"

    def _cache_get(self, key: str) -> dict | None:
        if self.cache_dir is None:
            return None
        path = self._cache_path(key)
        try:
            return json.loads(path.read_text())["response"]
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def _cache_put(self, key: str, body: dict, data: dict) -> None:
        if self.cache_dir is None:
            return
        with atomic_path(self._cache_path(key)) as tmp:
            tmp.write_text(json.dumps({"request": body, "response": data}, ensure_ascii=False))

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _endpoint_url(self, suffix: str) -> str:
        return self._root + suffix + (f"?{self._query}" if self._query else "")

    def _redact(self, text: str) -> str:
        if self._api_key:
            text = text.replace(self._api_key, "***")
        return text

    def _error_message(self, resp: httpx.Response) -> str:
        """The server's own error message, on one line."""
        msg = None
        try:
            data = resp.json()
        except ValueError:
            data = None
        if isinstance(data, dict):
            err = data.get("error")
            if isinstance(err, dict):
                msg = err.get("message") or err.get("msg")
            elif isinstance(err, str):
                msg = err
            msg = msg or data.get("detail") or data.get("message")
            if msg is not None and not isinstance(msg, str):
                msg = json.dumps(msg)
        if not msg:
            msg = resp.text or resp.reason_phrase or ""
        return self._redact(" ".join(str(msg).split()))[:300]

    def _bump(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[key] += n

    def _backoff(self, attempt: int) -> float:
        return random.uniform(0.0, min(self.backoff_max, self.backoff_base * (2.0**attempt)))

    async def _post(self, client: httpx.AsyncClient, body: dict) -> dict:
        url = self._endpoint_url(ENDPOINTS[self.endpoint])
        last = "no attempt"
        for attempt in range(self.max_retries + 1):
            if self._bucket is not None:
                await self._bucket.acquire()
            self._bump("requests")
            delay = None
            try:
                resp = await client.post(url, json=body)
            except httpx.TransportError as e:  # timeouts, refused/reset connections, protocol errors
                last = self._redact(f"{type(e).__name__}: {e}".strip().rstrip(":"))
            else:
                if resp.status_code < 300:
                    try:
                        data = resp.json()
                    except ValueError:
                        last = f"HTTP {resp.status_code} with a body that is not JSON"
                    else:
                        if isinstance(data, dict) and data.get("error") and not data.get("choices"):
                            raise PotstillError(f"{self.url}: server error: {self._error_message(resp)}")
                        return data
                elif retryable(resp.status_code):
                    last = f"HTTP {resp.status_code} ({self._error_message(resp)})"
                    ra = retry_after_seconds(resp.headers)
                    if ra is not None:
                        delay = min(ra, RETRY_AFTER_MAX) + random.uniform(0.0, 0.05 * min(ra, RETRY_AFTER_MAX))
                else:
                    raise PotstillError(f"{self.url}: HTTP {resp.status_code}: {self._error_message(resp)}")
            if attempt == self.max_retries:
                break
            delay = self._backoff(attempt) if delay is None else delay
            self._bump("retries")
            log.info("%s: %s; retry %d/%d in %.2fs", self.url, last, attempt + 1, self.max_retries, delay)
            await asyncio.sleep(delay)
        raise PotstillError(f"{self.url}: gave up after {self.max_retries + 1} attempts (max_retries={self.max_retries}); last: {last}")

    async def _one(self, body: dict) -> dict:
        key = self.cache_key(body)
        cached = self._cache_get(key)
        if cached is not None:
            self._bump("cache_hits")
            return cached
        runner = self._runner
        assert runner is not None and runner.sem is not None and runner.client is not None
        async with runner.sem:
            data = await self._post(runner.client, body)
        try:
            parse_response(data)
        except ValueError as e:
            raise PotstillError(f"{self.url}: unexpected response ({e}): {self._redact(json.dumps(data)[:200])}") from None
        self._cache_put(key, body, data)
        return data

    def _get_runner(self) -> _Runner:
        with self._runner_lock:
            if self._runner is None or not self._runner.alive():
                self._runner = _Runner()
                self._finalizer = weakref.finalize(self, _Runner.shutdown, self._runner)
            return self._runner

    async def _setup(self) -> None:
        runner = self._runner
        assert runner is not None
        if runner.client is None:
            limits = httpx.Limits(max_connections=self.concurrency, max_keepalive_connections=self.concurrency)
            runner.client = httpx.AsyncClient(timeout=httpx.Timeout(self.timeout), limits=limits, headers=self._headers())
            runner.sem = asyncio.Semaphore(self.concurrency)
        if not self._model_checked:
            try:
                resp = await runner.client.get(self._endpoint_url("/models"))
                self._pick_model(resp)
            except httpx.HTTPError:
                pass
            self._model_checked = True

    def _pick_model(self, resp: httpx.Response) -> None:
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
            with httpx.Client(timeout=min(self.timeout, 30.0), headers=self._headers()) as client:
                self._pick_model(client.get(self._endpoint_url("/models")))
        except httpx.HTTPError:
            pass
        self._model_checked = True

    async def _complete_async(self, prompts, params: SamplingParams, seeds: list[int]) -> list[dict]:
        await self._setup()
        bodies = [self.request_body(m, params, s) for m, s in zip(prompts, seeds, strict=True)]
        tasks = [asyncio.ensure_future(self._one(b)) for b in bodies]
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
            from potstill.teachers.hf import row_seed

            seeds = [row_seed(params.seed, i) & 0x7FFFFFFF for i in range(len(prompts))]  # fits every server's seed type
        if len(seeds) != len(prompts):
            raise PotstillError(f"{len(seeds)} seeds for {len(prompts)} prompts")
        runner = self._get_runner()
        responses = runner.run(self._complete_async(prompts, params, list(seeds)))
        return [self._to_completion(d, m, params) for d, m in zip(responses, prompts, strict=True)]

    async def acomplete(self, prompts, params: SamplingParams, seeds: list[int] | None = None) -> list[Completion]:
        """`complete` for async callers: waits in a worker thread; requests still go out on the teacher's loop."""
        return await asyncio.to_thread(self.complete, prompts, params, seeds)

    def close(self) -> None:
        """Close connections and stop the background loop (a later call starts a new one)."""
        with self._runner_lock:
            if self._finalizer is not None:
                self._finalizer()
            self._runner = None
            self._finalizer = None

    def __enter__(self) -> HTTPTeacher:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- response -> Completion -----------------------------------------------------------------
    def _resolve(self, tok: _Tok) -> int | None:
        """An id for one token entry: its own id, a token_id:N string, else the tokenizer mapping."""
        if tok.id is not None:
            return tok.id
        if tok.text is not None:
            m = _TOKEN_ID.match(tok.text)
            if m:
                return int(m.group(1))
        if self.mapper is None:
            return None
        self._bump("token_lookups")
        tid = self.mapper.lookup(tok.text, tok.raw)
        if tid is None:
            self._bump("token_map_mismatches")
        return tid

    def _to_completion(self, data: dict, messages, params: SamplingParams) -> Completion:
        parsed = parse_response(data)
        prompt_text = self._prompt_text(messages) if self.endpoint == "completions" else None
        prompt_ids = parsed.prompt_ids if parsed.prompt_ids is not None else self._prompt_ids(messages, prompt_text)
        k = params.top_logprobs
        positions = parsed.positions
        if not parsed.text and not parsed.token_ids:
            positions = positions or []  # an empty answer: nothing is missing
        elif positions is not None and not positions:
            positions = None  # log-probs asked for, none given for a non-empty answer
        if positions is None:
            return self._text_only(parsed, prompt_ids)

        last = positions[-1].tok if positions else None
        if parsed.finish_reason == "stop" and last is not None and last.id is None and not last.text and not last.raw:
            positions = positions[:-1]  # the stop token, sent as "" (special tokens decoded with skip_special_tokens)
        aligned_ids = parsed.token_ids if parsed.token_ids is not None and len(parsed.token_ids) == len(positions) else None
        ids: list[int] = []
        exact: list[bool] = []
        for i, pos in enumerate(positions):
            tid = pos.tok.id if pos.tok.id is not None else (aligned_ids[i] if aligned_ids is not None else None)
            ok = True
            if tid is None:
                tid = self._resolve(pos.tok)
            if tid is None:
                if self.mapper is None:
                    self._warn_no_tokenizer()
                    return self._text_only(parsed, prompt_ids)
                ok = False
                tid = self.mapper.unk_id if self.mapper.unk_id is not None else 0
            ids.append(int(tid))
            exact.append(ok)
        # the stop token (EOS / end-of-turn) some servers include is not part of the completion
        if parsed.finish_reason == "stop" and ids and exact[-1] and ids[-1] in self._special_ids:
            ids, positions = ids[:-1], positions[:-1]

        t = len(ids)
        sampled = np.full(t, np.nan, dtype=np.float32)
        topk_ids = np.zeros((t, k), dtype=np.int64)
        topk_lps = np.full((t, k), -np.inf, dtype=np.float32)
        any_top = False
        for i, pos in enumerate(positions):
            best: dict[int, float] = {}
            for alt in pos.top:
                if alt.logprob is None:
                    continue
                aid = self._resolve(alt)
                if aid is None:
                    continue
                if aid not in best or alt.logprob > best[aid]:
                    best[aid] = alt.logprob
            lp = pos.tok.logprob if pos.tok.logprob is not None else best.get(ids[i])
            if lp is not None:
                sampled[i] = lp
            row = sorted(best.items(), key=lambda kv: -kv[1])[:k]
            if row:
                any_top = True
                topk_ids[i, : len(row)] = [a for a, _ in row]
                topk_lps[i, : len(row)] = [b for _, b in row]
        self._bump("tokens", t)
        self._update_rate()
        if k and t and not any_top:  # top-k asked for, the server gave only the sampled token's log-prob
            self.text_only = True
            self._bump("text_only_completions")
            return Completion(prompt_ids, ids, parsed.text, parsed.finish_reason, sampled, None, None)
        return Completion(
            prompt_ids=prompt_ids,
            completion_ids=ids,
            text=parsed.text,
            finish_reason=parsed.finish_reason,
            sampled_logprob=sampled,
            topk_ids=topk_ids if k else None,
            topk_logprobs=topk_lps if k else None,
        )

    def _text_only(self, parsed: _Parsed, prompt_ids: list[int]) -> Completion:
        ids = parsed.token_ids
        if ids is None:
            ids = [int(i) for i in self.tokenizer.encode(parsed.text, add_special_tokens=False)] if self.tokenizer is not None else []
        elif parsed.finish_reason == "stop" and ids and ids[-1] in self._special_ids:
            ids = ids[:-1]
        if parsed.text:
            self.text_only = True
            self._bump("text_only_completions")
        return Completion(prompt_ids, list(ids), parsed.text, parsed.finish_reason, None, None, None)

    def _update_rate(self) -> None:
        with self._stats_lock:
            n = self.stats["token_lookups"]
            self.stats["token_map_mismatch_rate"] = self.stats["token_map_mismatches"] / n if n else 0.0

    def _warn_no_tokenizer(self) -> None:
        if not self._warned_no_tokenizer:
            self._warned_no_tokenizer = True
            log.warning("%s: the server names tokens by string only and no tokenizer was given: text-only capture "
                        "(pass tokenizer= to map tokens to ids)", self.url)
