"""The OpenAI wire format of `potstill serve`: request models, errors, and response bodies.

Nothing here runs a model. It holds what the official `openai` client sends and expects back:

- pydantic models of the request bodies (`ChatRequest`, `CompletionRequest`), strict about
  JSON types so a bad field answers 400 naming it;
- `APIError`, answered as `{"error": {message, type, param, code}}`;
- the text of each token for log-probs (`TokenText`, GPT-2 byte-level or SentencePiece),
  incremental detokenizing for streams (`Detokenizer`, `safe_prefix` holding back stop strings);
- builders of the response bodies and SSE chunks, with `logprobs` in the chat and completions
  shapes and `usage`.
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from potstill.lm.types import Completion
from potstill.utils import bytes_to_unicode

SSE_DONE = "data: [DONE]\n\n"
"""The last event of every stream."""


# ---- request models ---------------------------------------------------------------------------
Stop = Annotated[str, StringConstraints(max_length=256)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool | None = False


class RequestBase(BaseModel):
    """The sampling fields shared by both endpoints."""

    model_config = ConfigDict(extra="ignore", strict=True)  # JSON types as the schema says

    model: str | None = Field(None, max_length=256)
    max_tokens: int | None = Field(None, ge=1, le=2**31)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    n: int | None = Field(None, ge=1, le=128)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    seed: int | None = Field(None, ge=-(2**63), le=2**64 - 1)
    stop: Stop | Annotated[list[Stop], Field(max_length=4)] | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    logit_bias: dict[str, float] | None = None
    user: str | None = Field(None, max_length=256)

    def stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        return tuple(s for s in stops if s)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True)

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # JSON types as the schema says

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = Field(None, max_length=256)

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class ChatRequest(RequestBase):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1, max_length=2048)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=1000)


class CompletionRequest(RequestBase):
    """POST /v1/completions (one prompt: a string or a list of token ids)."""

    prompt: str | list[Annotated[int, Field(ge=0, le=2**31)]] | list[str] | list[list[Annotated[int, Field(ge=0, le=2**31)]]]
    logprobs: int | None = Field(None, ge=0, le=1000)
    echo: bool | None = False
    best_of: int | None = Field(None, ge=1, le=128)
    suffix: str | None = None


# ---- errors -----------------------------------------------------------------------------------
class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status, headers=self.headers)

    def sse(self) -> str:
        """This error as an SSE event, for a stream whose 200 headers are already sent."""
        return sse({"error": {"message": self.message, "type": self.type, "param": None, "code": self.code}})

    @property
    def log_type(self) -> str:
        return self.code or self.type


def validation_error(errors: list[dict[str, Any]]) -> APIError:
    """A 400 naming the first (at most three) invalid fields of a pydantic validation error."""

    def where(loc) -> str:  # drop "body" and pydantic's union-branch tags ("constrained-str", ...)
        return ".".join(str(x) for x in loc if isinstance(x, int) or (x != "body" and str(x).isidentifier()))

    parts = list(dict.fromkeys(f"{where(e.get('loc', ())) or 'body'}: {e.get('msg', 'invalid')}" for e in errors))
    parts = parts[:3]
    param = where(errors[0].get("loc", ())) or None if errors else None
    return APIError(400, "Invalid request: " + "; ".join(parts), param=param)


ERROR_SCHEMA = {"application/json": {"schema": {"type": "object", "properties": {"error": {"type": "object"}}}}}
"""OpenAPI content of an error response."""
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}, "description": "JSON, or SSE when stream=true"},
    **{s: {"description": d, "content": ERROR_SCHEMA} for s, d in [
        (400, "Invalid request"), (401, "Missing, unknown or revoked API key"),
        (403, "More log-probs than this key may receive"), (413, "Body too large"),
        (429, "Rate limit reached (see Retry-After)"),
    ]},
}
"""OpenAPI responses of the completion routes."""


# ---- token text for log-probs -----------------------------------------------------------------
class TokenText:
    """The bytes and display string of each token id (cached)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        decoder = getattr(getattr(tokenizer, "backend_tokenizer", None), "decoder", None)
        self.byte_level = decoder is not None and "ByteLevel" in type(decoder).__name__
        self.byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        self._cache: dict[int, bytes] = {}

    def bytes(self, tid: int) -> bytes:
        b = self._cache.get(tid)
        if b is None:
            b = self._cache[tid] = self._bytes(int(tid))
        return b

    def _bytes(self, tid: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(tid)
        if isinstance(piece, str):
            if self.byte_level and all(c in self.byte_decoder for c in piece):
                return bytes(self.byte_decoder[c] for c in piece)
            if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                try:
                    return bytes([int(piece[3:5], 16)])
                except ValueError:
                    pass
            if not self.byte_level:
                return piece.replace("\u2581", " ").encode()
        return self.tokenizer.decode([tid]).encode()

    def text(self, tid: int) -> str:
        return self.bytes(tid).decode("utf-8", errors="replace")


def _lp(x: float) -> float:
    """A JSON-safe log-prob (OpenAI reports -9999.0 for impossible tokens)."""
    x = float(x)
    return x if math.isfinite(x) and x > -9999.0 else -9999.0


# ---- incremental detokenizer (streaming) -------------------------------------------------------
class Detokenizer:
    """Text deltas from a growing id list: `tokenizers`' DecodeStream for a fast tokenizer (it holds back
    an incomplete UTF-8 sequence until its last byte arrives); otherwise a short decoded window."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
        if self.backend is not None:
            from tokenizers.decoders import DecodeStream

            self.stream = DecodeStream(skip_special_tokens=True)
        self.ids: list[int] = []
        self.prefix = 0
        self.read = 0

    def add(self, new: list[int]) -> str:
        if self.backend is not None:
            return "".join(filter(None, (self.stream.step(self.backend, int(i)) for i in new)))
        self.ids.extend(new)
        dec = self.tokenizer.decode
        prefix_text = dec(self.ids[self.prefix : self.read], skip_special_tokens=True)
        new_text = dec(self.ids[self.prefix :], skip_special_tokens=True)
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return new_text[len(prefix_text) :]
        return ""


def safe_prefix(text: str, stops: tuple[str, ...]) -> str:
    """The part of `text` that can be sent: before any stop string and any partial stop suffix."""
    cut = len(text)
    for s in stops:
        i = text.find(s)
        if i >= 0:
            cut = min(cut, i)
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                cut = min(cut, len(text) - k)
                break
    return text[:cut]


# ---- response bodies --------------------------------------------------------------------------
def usage(c: Completion) -> dict[str, int]:
    p, o = len(c.prompt_ids), len(c.completion_ids)
    return {"prompt_tokens": p, "completion_tokens": o, "total_tokens": p + o}


def sse(obj: Any) -> str:
    """One server-sent event carrying `obj` as JSON."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def chat_logprobs(tt: TokenText, c: Completion, lo: int = 0, hi: int | None = None) -> dict[str, Any]:
    """`choices[0].logprobs` of a chat completion, for completion tokens lo..hi."""
    content = []
    hi = len(c.completion_ids) if hi is None else hi
    for i in range(lo, hi):
        tid = c.completion_ids[i]
        tops = []
        if c.topk_ids is not None:
            tops = [{"token": tt.text(t), "logprob": _lp(lp), "bytes": list(tt.bytes(t))}
                    for t, lp in zip(c.topk_ids[i].tolist(), c.topk_logprobs[i].tolist(), strict=True)]
        content.append({"token": tt.text(tid), "logprob": _lp(c.sampled_logprob[i]),
                        "bytes": list(tt.bytes(tid)), "top_logprobs": tops})
    return {"content": content, "refusal": None}


def completion_logprobs(tt: TokenText, c: Completion, offset: int, lo: int = 0,
                        hi: int | None = None) -> dict[str, Any]:
    """`choices[0].logprobs` of a text completion for tokens lo..hi; the first starts at `offset`."""
    hi = len(c.completion_ids) if hi is None else hi
    tokens, lps, tops, offsets = [], [], [], []
    for i in range(lo, hi):
        tid = c.completion_ids[i]
        offsets.append(offset)
        tokens.append(tt.text(tid))
        offset += len(tokens[-1])
        lps.append(_lp(c.sampled_logprob[i]))
        if c.topk_ids is not None:
            tops.append({tt.text(t): _lp(lp) for t, lp in zip(c.topk_ids[i].tolist(), c.topk_logprobs[i].tolist(), strict=True)})
        else:
            tops.append({})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def completion_body(head: dict[str, Any], c: Completion, *, chat: bool, logprobs: dict[str, Any] | None) -> dict[str, Any]:
    """The whole (non-streamed) response: a `chat.completion` or a `text_completion`."""
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": c.text, "refusal": None},
                  "logprobs": logprobs, "finish_reason": c.finish_reason}
        return {**head, "object": "chat.completion", "choices": [choice], "usage": usage(c)}
    choice = {"index": 0, "text": c.text, "finish_reason": c.finish_reason, "logprobs": logprobs}
    return {**head, "object": "text_completion", "choices": [choice], "usage": usage(c)}


class StreamChunks:
    """The SSE events of one streamed response (`chat.completion.chunk` or `text_completion`)."""

    def __init__(self, head: dict[str, Any], *, chat: bool, include_usage: bool):
        self.head, self.chat, self.include_usage = head, chat, include_usage
        self.object = "chat.completion.chunk" if chat else "text_completion"

    def delta(self, text: str | None, finish: str | None = None, lp: Any = None, first: bool = False) -> str:
        """A chunk of new text (chat: `first` opens the assistant message; None -> empty delta)."""
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({} if text is None else {"content": text})
            choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": finish}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}
        extra = {"usage": None} if self.include_usage else {}
        return sse({**self.head, "object": self.object, "choices": [choice], **extra})

    def usage_chunk(self, c: Completion) -> str:
        """The final chunk with no choices and the usage (stream_options.include_usage)."""
        return sse({**self.head, "object": self.object, "choices": [], "usage": usage(c)})
