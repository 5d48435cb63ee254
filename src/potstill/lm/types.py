"""Value types of decoding: how to sample (`SamplingParams`) and what comes back (`Completion`).

Shared by the engine (engine.py), teachers, the server and training's on-policy sampling.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass
class SamplingParams:
    """How a teacher samples. Recorded in the capture manifest."""

    max_new_tokens: int = 128
    """Most completion tokens per prompt."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""
    top_p: float = 1.0
    """Nucleus sampling mass."""
    top_logprobs: int = 20
    """How many top log-probs to keep per completion token (0 = none)."""
    seed: int = 0
    """Base seed; each completion draws from its own generator seeded from this and its id."""
    stop: list[str] = field(default_factory=list)
    """Stop strings (the EOS token always stops)."""

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.temperature < 0:
            raise ValueError("temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ValueError("top_p must be in (0, 1]")
        if self.top_logprobs < 0:
            raise ValueError("top_logprobs must be >= 0")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Completion:
    """One completion with its per-token log-probs (arrays have one row per completion token)."""

    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    finish_reason: str  # "stop" | "length"
    sampled_logprob: np.ndarray | None = None  # [T] float32
    topk_ids: np.ndarray | None = None  # [T, k] int64
    topk_logprobs: np.ndarray | None = None  # [T, k] float32


# context (prompt + generated ids so far, one list per row), logits [B, V] -> logits [B, V]
LogitsProcessor = Callable[[list[list[int]], Any], Any]
