"""Shared bits of the studies: held-out measurements, a study-wide ETA, tables and atomic PNG/markdown output.

The studies compose the pipeline's stages (capture.generate, train.loop.train, evaluate.metrics);
nothing here trains or generates by itself.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from potstill import present
from potstill.errors import PotstillError
from potstill.lm.tokens import pad_token_id
from potstill.utils import atomic_path, pyplot  # noqa: F401  (pyplot: re-exported)


def heldout_inputs(capture_dir: str | Path, max_rows: int | None = None):
    """Held-out examples (teacher top-k, for KL) and prompts with references (for reference NLL)."""
    from potstill.config import EvalConfig
    from potstill.evaluate import load_eval_inputs

    _, examples, prompts = load_eval_inputs(EvalConfig(capture=str(capture_dir), split="heldout", max_rows=max_rows))
    if not examples:
        raise PotstillError("the capture has no held-out rows; raise --heldout or the prompt count", where=str(capture_dir))
    return examples, prompts


def measure(model, tokenizer, examples, prompts, batch_size: int = 8) -> dict[str, Any]:
    """KL(capture's model ‖ model), top-1 agreement, NLL of the capture's text and of the references.

    Leaves the model in the mode it was in (the transfer study measures in the middle of training).
    """
    from potstill.evaluate.metrics import fidelity, reference_nll

    was_training = model.training
    pad = pad_token_id(tokenizer)
    try:
        row = fidelity(model, examples, pad, batch_size)
        row.update(reference_nll(model, tokenizer, prompts, batch_size) or {})
    finally:
        model.train(was_training)
    return row


class Clock:
    """A study-wide ETA from units of work done per second so far (tokens, steps, stages)."""

    def __init__(self, total: float):
        self.total = float(total)
        self.done = 0.0
        self.t0 = time.perf_counter()

    def advance(self, units: float) -> None:
        self.done += units

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def eta(self) -> float | None:
        if self.done <= 0:
            return None
        return self.elapsed() / self.done * max(self.total - self.done, 0.0)  # total can shrink (reused work)

    def line(self) -> str:
        eta = self.eta()
        pct = 100 * min(self.done / self.total, 1.0) if self.total > 0 else 100.0
        return f"{pct:.0f}% | elapsed {fmt_s(self.elapsed())} | eta {'?' if eta is None else fmt_s(eta)}"


def fmt_s(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    """The studies' tables: first column left, numbers right-aligned."""
    return present.markdown_table(headers, rows, align="l" + "r" * (len(headers) - 1))


def rich_table(headers: list[str], rows: list[list[Any]], title: str = ""):
    return present.rich_table(headers, rows, title=title)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def save_figure(fig, path: str | Path) -> None:
    """Save a matplotlib figure as PNG atomically and close it."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)


