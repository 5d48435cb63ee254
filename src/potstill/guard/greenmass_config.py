"""`GreenMassConfig`: how open-weights detection scores a suspect, apart from the statistic's code
(greenmass.py) so that the CLI takes its flags from here without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from potstill.config import opt
from potstill.errors import PotstillError


@dataclass
class GreenMassConfig:
    """How open-weights detection scores a suspect (guard/greenmass.py explains the statistics and their null)."""

    statistic: str = opt("mass", "Open-weights statistic: mass (green probability mass over the top-k), "
                                 "logit (centred log-probs vs greenness) or argmax (the older top-token count).")
    top_k: int = opt(64, "Suspect tokens read per position (mass and logit statistics).")
    null_keys: int = opt(200, "Random keys the suspect is also scored under: the empirical null (0 = analytic only).")
    controls: list[str] = opt([], "Reference model dirs that never saw our outputs, scored the same way under our key.")

    def __post_init__(self) -> None:
        if self.statistic not in ("mass", "logit", "argmax"):
            raise PotstillError(f"statistic must be mass, logit or argmax, not {self.statistic!r}", where="detect")
        if self.top_k < 1 or self.null_keys < 0:
            raise PotstillError("top_k must be >= 1 and null_keys >= 0", where="detect")
