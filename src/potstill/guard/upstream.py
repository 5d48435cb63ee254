"""The gateway's side of the wire: an OpenAI-compatible upstream (vLLM, llama.cpp, TGI, Ollama, potstill serve).

`Upstream` sends requests with httpx (async) and turns every way an upstream can fail into the
answer the gateway's client gets, never a 500 or a hang:

| upstream                                        | client gets                    | log `error_type`        |
|-------------------------------------------------|--------------------------------|-------------------------|
| refuses the connection / cannot be resolved     | 503, Retry-After               | `upstream_unavailable`  |
| 429 or 503 (overloaded)                         | 503, Retry-After               | `upstream_overloaded`   |
| no answer (or no next stream chunk) in time     | 504                            | `upstream_timeout`      |
| not JSON, not the OpenAI shape, cut off, 5xx    | 502                            | `upstream_bad_response` |
| 401/403 (the gateway's upstream key is wrong)   | 502                            | `upstream_auth`         |
| any other 4xx (the request's own fault)         | that status, upstream's message| its code or type        |

`StreamMeter` reads the SSE events passed through to the client and counts the completion
tokens they carry: the length of the chunk's log-prob list where it has one, else one token per
chunk with text (vLLM, llama.cpp, TGI and potstill send one token per chunk), and the
upstream's own `usage` once the stream has reached its end.
"""

from __future__ import annotations

import json
from typing import Any

import httpx

from potstill.guard.openai_api import APIError

MAX_ERROR_BODY = 64 * 1024
"""Most bytes of an upstream's error body read (its message is passed on, cut to 500 characters)."""


def unavailable(message: str) -> APIError:
    return APIError(503, message, type="server_error", code="upstream_unavailable", headers={"Retry-After": "5"})


def bad_response(message: str) -> APIError:
    return APIError(502, f"The upstream model server sent a bad response: {message}", type="server_error",
                    code="upstream_bad_response")


def timed_out() -> APIError:
    return APIError(504, "The upstream model server did not answer in time.", type="server_error",
                    code="upstream_timeout")


def transport_error(err: Exception) -> APIError:
    """An httpx failure as the client's answer (503 refused, 504 timeout, 502 otherwise)."""
    if isinstance(err, httpx.TimeoutException):
        return timed_out()
    if isinstance(err, httpx.ConnectError):
        return unavailable("The upstream model server is unavailable; retry later.")
    return bad_response(type(err).__name__)


def status_error(status: int, body: bytes, headers: httpx.Headers) -> APIError:
    """A non-200 upstream answer as the client's answer."""
    try:
        err = json.loads(body).get("error")
    except (ValueError, AttributeError, UnicodeDecodeError):
        err = None
    if isinstance(err, str):
        err = {"message": err}
    err = err if isinstance(err, dict) else {}
    message = str(err.get("message") or body[:500].decode("utf-8", "replace") or f"HTTP {status}")[:500]
    if status in (429, 503):
        retry = headers.get("retry-after", "5")
        return APIError(503, f"The upstream model server is overloaded: {message}", type="server_error",
                        code="upstream_overloaded", headers={"Retry-After": retry if retry.isdigit() else "5"})
    if status in (401, 403):
        return APIError(502, "The gateway could not authenticate to the upstream model server.",
                        type="server_error", code="upstream_auth")
    if 400 <= status < 500:
        code = err.get("code")
        return APIError(status, message, type=str(err.get("type") or "invalid_request_error")[:64],
                        param=err.get("param") if isinstance(err.get("param"), str) else None,
                        code=str(code)[:64] if code is not None else None)
    return bad_response(f"HTTP {status}: {message}")


def base_url(url: str) -> str:
    """The upstream's /v1 base: `http://h:p`, `http://h:p/` and `http://h:p/v1` all mean `http://h:p/v1`."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


class Upstream:
    """An async client of one OpenAI-compatible server (`api_key` sent as a bearer token when set)."""

    def __init__(self, url: str, api_key: str | None, timeout_s: float):
        self.base = base_url(url)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), headers=headers,
                                        limits=httpx.Limits(max_connections=None, max_keepalive_connections=64))

    def __repr__(self) -> str:  # never the key
        return f"Upstream({self.base!r})"

    async def get_json(self, path: str) -> Any:
        try:
            r = await self.client.get(self.base + path)
        except httpx.HTTPError as err:
            raise transport_error(err) from None
        return self._json(r)

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST and the JSON object answered, or the mapped APIError."""
        try:
            r = await self.client.post(self.base + path, json=body)
        except httpx.HTTPError as err:
            raise transport_error(err) from None
        data = self._json(r)
        if not isinstance(data, dict):
            raise bad_response("not a JSON object")
        return data

    async def open_stream(self, path: str, body: dict[str, Any]) -> httpx.Response:
        """POST with a streamed answer: the 200 response (read it with `aiter_lines`, then `aclose`)."""
        try:
            r = await self.client.send(self.client.build_request("POST", self.base + path, json=body), stream=True)
        except httpx.HTTPError as err:
            raise transport_error(err) from None
        if r.status_code != 200:
            try:
                raw = b""
                async for part in r.aiter_bytes():
                    raw += part
                    if len(raw) > MAX_ERROR_BODY:
                        break
            except httpx.HTTPError:
                raw = b""
            finally:
                await r.aclose()
            raise status_error(r.status_code, raw, r.headers)
        return r

    async def aclose(self) -> None:
        await self.client.aclose()

    @staticmethod
    def _json(r: httpx.Response) -> Any:
        if r.status_code != 200:
            raise status_error(r.status_code, r.content[:MAX_ERROR_BODY], r.headers)
        try:
            return r.json()
        except (ValueError, UnicodeDecodeError):
            raise bad_response("not JSON") from None


def first_choice(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The first choice of a response or chunk, or None when it has none; 502 when `choices` is malformed."""
    choices = obj.get("choices")
    if not isinstance(choices, list) or any(not isinstance(c, dict) for c in choices):
        raise bad_response("no 'choices' list")
    return choices[0] if choices else None


def choice_text(choice: dict[str, Any], chat: bool) -> str:
    """The text a (chat) completion choice or chunk carries ('' when none)."""
    part = (choice.get("delta") or choice.get("message") or {}) if chat else choice
    text = part.get("content") if chat else part.get("text")
    return text if isinstance(text, str) else ""


def usage_of(obj: dict[str, Any]) -> tuple[int, int] | None:
    """(prompt_tokens, completion_tokens) from an answer's `usage`, or None when absent or malformed."""
    u = obj.get("usage")
    if not isinstance(u, dict):
        return None
    p, c = u.get("prompt_tokens"), u.get("completion_tokens")
    if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in (p, c)):
        return None
    return p, c


class StreamMeter:
    """Counts what a passed-through stream delivers: completion tokens, text, the upstream's usage."""

    def __init__(self, chat: bool):
        self.chat = chat
        self.tokens = 0
        self.text = ""
        self.usage: tuple[int, int] | None = None
        self.finish: str | None = None

    def add(self, obj: dict[str, Any]) -> None:
        """One event about to be sent to the client (502 if it is not a chunk)."""
        self.usage = usage_of(obj) or self.usage
        choice = first_choice(obj)
        if choice is None:
            return
        text = choice_text(choice, self.chat)
        lp = choice.get("logprobs") if isinstance(choice.get("logprobs"), dict) else {}
        listed = lp.get("content") if self.chat else lp.get("tokens")
        delta = choice.get("delta") if isinstance(choice.get("delta"), dict) else {}
        if isinstance(listed, list) and listed:
            self.tokens += len(listed)
        elif text or delta.get("tool_calls"):
            self.tokens += 1
        self.text += text
        self.finish = choice.get("finish_reason") or self.finish
