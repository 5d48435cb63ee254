"""The teacher protocol and its value types, plus the registry that turns a spec into a teacher.

A teacher answers chat prompts with completions and, per completion token, its top-k
log-probabilities (`complete`), and scores existing token sequences under teacher forcing
(`score`). Specs: "embedded", a local HF model directory, a `.gguf` file, or an
`http(s)://…/v1` URL of an OpenAI-compatible server.
"""

from __future__ import annotations

from typing import Any, Protocol

from potstill.lm.types import Completion, LogitsProcessor, SamplingParams  # noqa: E402,F401  (re-exported)


class Teacher(Protocol):
    """What every teacher backend provides."""

    name: str
    local_ids: bool
    """Decodes token ids itself (`complete_ids`, `encode_chat`) and keeps EOS at the end of a completion
    (its top-k teaches a student when to stop). False for a remote API, which templates and tokenises."""
    can_score: bool
    """Teacher-forces given completions (`score_ids`): `--answers reference`, online training."""

    def identity(self) -> dict[str, Any]:
        """Name, weights sha256, tokenizer and chat-template hashes (for the manifest)."""
        ...

    def complete(
        self, prompts: list[list[dict]], params: SamplingParams, seeds: list[int] | None = None
    ) -> list[Completion]:
        """Answer a batch of chat prompts."""
        ...


def load_teacher(spec: str, **kwargs: Any) -> Teacher:
    """Turn a teacher spec into a teacher: "embedded", a model dir, a .gguf file, or an http(s) URL."""
    if spec.startswith(("http://", "https://")):
        from potstill.teachers.http import HTTPTeacher

        return HTTPTeacher(spec, **kwargs)
    from potstill.teachers.hf import HFTeacher

    return HFTeacher.load(spec, **kwargs)
