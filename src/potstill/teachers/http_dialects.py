"""The HTTP teacher's pure half: the servers' response dialects, and their tokens mapped to ids.

No I/O here: `parse_response` reads one recorded JSON response, `ResponseMapper.to_completion` turns
it into a `Completion` in a tokenizer's ids. The transport (event loop, pacing, retries, disk cache)
is `teachers/http_transport.py`; the teacher that joins them is `teachers/http.py`.

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
server's ids if given, else `tokenizer.encode(text)`, else [], and the teacher's `text_only` becomes
True. The same holds when top-k was asked for but the server returned no alternatives.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from potstill.lm.types import Completion
from potstill.utils import bytes_to_unicode

_TOKEN_ID = re.compile(r"^token_id:(\d+)$")
_ESCAPED_BYTES = re.compile(r"\\x([0-9a-fA-F]{2})")


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


# ---- response parsing: the four dialects -----------------------------------------------------------
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


def tool_calls_of(data: dict) -> list[dict] | None:
    """The function calls of a chat response (`choices[0].message.tool_calls`), as sent; None without any."""
    try:
        calls = data["choices"][0]["message"].get("tool_calls")
    except (KeyError, IndexError, TypeError, AttributeError):
        return None
    if not isinstance(calls, list):
        return None
    return [c for c in calls if isinstance(c, dict)] or None


def special_ids(tokenizer) -> set[int]:
    """Special tokens (EOS, end-of-turn, ...): the stop token a server may append is one of these."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    for tid, added in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(tid))
    return ids


# ---- parsed response -> Completion ------------------------------------------------------------------
@dataclass
class Mapped:
    """One response as a Completion; `text_only` when it carried no usable log-probs, `no_tokenizer`
    when that was because token strings could not be mapped without a tokenizer."""

    completion: Completion
    text_only: bool = False
    no_tokenizer: bool = False


def _no_count(key: str, n: int = 1) -> None:
    return None


class ResponseMapper:
    """Parsed responses -> Completions in `tokenizer`'s ids; `count(stat, n)` tallies lookups and mismatches."""

    def __init__(self, tokenizer: Any = None, count: Callable[..., None] = _no_count):
        self.tokenizer = tokenizer
        self.mapper = TokenMapper(tokenizer) if tokenizer is not None else None
        self.special_ids = special_ids(tokenizer) if tokenizer is not None else set()
        self.count = count

    def resolve(self, tok: _Tok) -> int | None:
        """An id for one token entry: its own id, a token_id:N string, else the tokenizer mapping."""
        if tok.id is not None:
            return tok.id
        if tok.text is not None:
            m = _TOKEN_ID.match(tok.text)
            if m:
                return int(m.group(1))
        if self.mapper is None:
            return None
        self.count("token_lookups")
        tid = self.mapper.lookup(tok.text, tok.raw)
        if tid is None:
            self.count("token_map_mismatches")
        return tid

    def to_completion(self, parsed: _Parsed, prompt_ids: list[int], k: int) -> Mapped:
        """`parsed` (see `parse_response`) with `k` top log-probs per position, or text-only."""
        positions = parsed.positions
        if not parsed.text and not parsed.token_ids:
            positions = positions or []  # an empty answer: nothing is missing
        elif positions is not None and not positions:
            positions = None  # log-probs asked for, none given for a non-empty answer
        if positions is None:
            return self.text_only(parsed, prompt_ids)

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
                tid = self.resolve(pos.tok)
            if tid is None:
                if self.mapper is None:
                    out = self.text_only(parsed, prompt_ids)
                    out.no_tokenizer = True
                    return out
                ok = False
                tid = self.mapper.unk_id if self.mapper.unk_id is not None else 0
            ids.append(int(tid))
            exact.append(ok)
        # the stop token (EOS / end-of-turn) some servers include is not part of the completion
        if parsed.finish_reason == "stop" and ids and exact[-1] and ids[-1] in self.special_ids:
            ids, positions = ids[:-1], positions[:-1]
        return self._with_logprobs(parsed, prompt_ids, ids, positions, k)

    def _with_logprobs(self, parsed: _Parsed, prompt_ids: list[int], ids: list[int], positions: list[_Pos], k: int) -> Mapped:
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
                aid = self.resolve(alt)
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
        self.count("tokens", t)
        if k and t and not any_top:  # top-k asked for, the server gave only the sampled token's log-prob
            self.count("text_only_completions")
            return Mapped(Completion(prompt_ids, ids, parsed.text, parsed.finish_reason, sampled, None, None), text_only=True)
        return Mapped(Completion(
            prompt_ids=prompt_ids,
            completion_ids=ids,
            text=parsed.text,
            finish_reason=parsed.finish_reason,
            sampled_logprob=sampled,
            topk_ids=topk_ids if k else None,
            topk_logprobs=topk_lps if k else None,
        ))

    def text_only(self, parsed: _Parsed, prompt_ids: list[int]) -> Mapped:
        """A Completion without log-probs: the server's ids, else the text encoded locally, else []."""
        ids = parsed.token_ids
        if ids is None:
            ids = [int(i) for i in self.tokenizer.encode(parsed.text, add_special_tokens=False)] if self.tokenizer is not None else []
        elif parsed.finish_reason == "stop" and ids and ids[-1] in self.special_ids:
            ids = ids[:-1]
        if parsed.text:
            self.count("text_only_completions")
        return Mapped(Completion(prompt_ids, list(ids), parsed.text, parsed.finish_reason, None, None, None), text_only=bool(parsed.text))
