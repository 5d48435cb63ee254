"""`WatermarkConfig`: the watermark's settings, apart from the scheme's code (watermark.py) so the CLI
takes its flags' defaults and help from here without importing torch.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from potstill.config import opt
from potstill.errors import PotstillError
from potstill.guard.keymat import check_fingerprint, check_key_strength, derive_key, fingerprint, read_secret

WATERMARK_KEY_ENV = "POTSTILL_WATERMARK_KEY"
"""Where the watermark secret is read from by default (never a command-line argument: `ps` and shell history)."""
SERVED_LOGPROBS = ("decoy", "unbiased", "biased")


@dataclass
class WatermarkConfig:
    """The watermark's settings. Detection needs the same settings (and key) as generation."""

    key: str = field(repr=False, metadata={"help": "The secret (>= 128 bits, e.g. `secrets.token_hex(32)`); anyone "
                                                   "holding it can detect, forge or strip the mark. Never in the repr."})
    gamma: float = opt(0.25, "Green fraction of the vocabulary: expected share of green tokens after any context.")
    delta: float = opt(2.0, "Logit bias added to green tokens while sampling (0 = no watermark).")
    context_width: int = opt(1, "Previous tokens (h) seeding the green list.")
    self_hash: bool = opt(False, "Min-SelfHash seeding (the candidate token takes part in the seed) instead of LeftHash.")
    vocab_size: int | None = opt(None, "Vocabulary size (for validating ids and the public description); "
                                       "the hash itself needs none.")
    served_logprobs: str = opt("decoy", "What served `logprob`/`top_logprobs` are: 'decoy' = the model's log-probs "
                                        "biased by the green lists of a key derived from this one (reveal nothing of "
                                        "the sampling lists; a top-k distiller still learns a mark `detect` finds), "
                                        "'unbiased' = the model's own, 'biased' = the sampling distribution (gives "
                                        "the green lists away: ~20 exact bits per top-20 query).")
    _fingerprint: str | None = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        where = "watermark config"
        if not isinstance(self.key, str) or not self.key:
            raise PotstillError("key must be a non-empty string", where=where)
        check_key_strength(self.key, "the watermark key")
        if not 0.0 < self.gamma < 1.0:
            raise PotstillError(f"gamma must be in (0, 1), got {self.gamma}", where=where)
        if not (math.isfinite(self.delta) and self.delta >= 0):
            raise PotstillError(f"delta must be finite and >= 0, got {self.delta}", where=where)
        if not 1 <= self.context_width <= 16:
            raise PotstillError(f"context_width must be in 1..16, got {self.context_width}", where=where)
        if self.served_logprobs not in SERVED_LOGPROBS:
            raise PotstillError(f"served_logprobs must be one of {', '.join(SERVED_LOGPROBS)}, got "
                                f"{self.served_logprobs!r}", where=where)
        if self.vocab_size is not None and self.vocab_size < 2:
            raise PotstillError(f"vocab_size must be >= 2, got {self.vocab_size}", where=where)

    def logprob_config(self) -> WatermarkConfig:
        """The decoy scheme biasing served log-probs: same settings, key HMAC(key, "watermark/logprobs")."""
        return replace(self, key=derive_key(self.key, "watermark/logprobs"), served_logprobs="biased")

    def detection_configs(self) -> list[WatermarkConfig]:
        """Every scheme a model distilled from our API may carry: the sampling key's (text), and with
        'decoy' log-probs the decoy's (top-k targets). Detection tests each (Bonferroni over them)."""
        return [self] + ([self.logprob_config()] if self.served_logprobs == "decoy" else [])

    def key_fingerprint(self) -> str:
        """`v1:<nonce>:<64-bit HMAC>` (guard/keymat.py): checkable only with the key.

        Stable for this config object; a new config (another run) draws a new nonce, so reports
        made in different runs with the same key cannot be linked without the key.
        """
        if self._fingerprint is None:
            self._fingerprint = fingerprint(self.key, "watermark")
        return self._fingerprint

    def check_fingerprint(self, fp: str) -> bool:
        """Whether a fingerprint from some report was made with this key."""
        return check_fingerprint(self.key, "watermark", fp)

    def public_dict(self) -> dict[str, Any]:
        """Everything but the key (replaced by its fingerprint): safe to log and to save."""
        d = asdict(self)
        del d["key"], d["_fingerprint"]
        d["key_fingerprint"] = self.key_fingerprint()
        d["scheme"] = "kgw-min-selfhash" if self.self_hash else "kgw-lefthash"
        if self.served_logprobs == "decoy":
            d["logprob_key_fingerprint"] = self.logprob_config().key_fingerprint()
        return d


def load_watermark(key_env: str = WATERMARK_KEY_ENV, key_file: str | None = None, required: bool = True,
                   **params: Any) -> WatermarkConfig | None:
    """A WatermarkConfig whose secret comes from `key_file`, else $`key_env`; `params` are its other fields.

    No secret: a one-line PotstillError when `required`, else None (the watermark is off).
    """
    key = read_secret(key_env, None, key_file)
    if not key:
        if required:
            raise PotstillError(f"no watermark key: set ${key_env} or pass --watermark-key-file")
        return None
    try:
        return WatermarkConfig(key=key, **params)
    except ValueError as e:
        raise PotstillError(f"watermark: {e}") from None
