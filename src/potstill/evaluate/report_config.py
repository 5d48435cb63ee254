"""`ReportConfig`: the settings of `potstill report`, apart from the report's code so the CLI reads them
without importing numpy (report_data.py) or matplotlib (report_plots.py).
"""

from __future__ import annotations

from dataclasses import dataclass

from potstill.config import EvalConfig, GenerateConfig, derive, opt
from potstill.errors import PotstillError

# (metric key, higher is better) for the quality axis of the Pareto plots
QUALITY = {"kl": False, "top1_agreement": True, "nll_teacher_tokens": False, "nll_reference": False}


@dataclass
class ReportConfig:
    out: str = opt("runs/report", "Directory for report.html, its PNG plots and report.json.")
    title: str = opt("potstill report", "Page title.")
    quality: str = opt("kl", "Quality axis of the Pareto plots: kl, top1_agreement, nll_teacher_tokens, nll_reference.")
    examples: int = opt(6, "Held-out capture rows shown per run, each student teacher-forced on them (0 = none).")
    split: str = derive(EvalConfig, "split", note="The examples come from it.")
    max_new_tokens: int = derive(GenerateConfig, "max_new_tokens", 64, "Here: each student's own (greedy) answer in the examples.")

    def __post_init__(self) -> None:
        if self.quality not in QUALITY:
            raise PotstillError(f"report: quality must be one of {', '.join(QUALITY)}, not {self.quality!r}")
        if self.examples < 0 or self.max_new_tokens < 1:
            raise PotstillError("report: examples >= 0 and max_new_tokens >= 1")
