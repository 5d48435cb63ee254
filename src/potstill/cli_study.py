"""Study verbs of the CLI: `potstill study transfer` and `potstill study collapse`. Thin, like cli.py.

    potstill study transfer --seeds 3 --max-tokens 32000        # KD vs teacher text vs human text
    potstill study collapse --generations 3                     # distil a distillation, N times
    potstill study budget --minutes 3                           # recipes compared per CPU-minute

Flags come from the typed configs in studies/transfer.py, collapse.py and budget.py (`--config FILE.yaml`
works as for the other verbs); the library does the work, this prints the tables.
"""

from __future__ import annotations

import sys

import click

from potstill.studies.budget import BudgetConfig
from potstill.studies.collapse import CollapseConfig
from potstill.studies.transfer import TransferConfig


def register(app: click.Group) -> None:
    """Attach the `study` group to the main CLI group."""
    from potstill.cli import config_options, make_config

    @app.group()
    def study():
        """Studies composed from the pipeline's stages (JSON + table + PNG under --out)."""

    @study.command("transfer")
    @config_options(TransferConfig)
    def transfer_cmd(config_file, **flags):
        """Tokens to reach a quality: KD on top-k vs CE on teacher text vs CE on human references."""
        from potstill.studies.report import ratio_lines, transfer_table
        from potstill.studies.transfer import run_transfer

        cfg = make_config(TransferConfig, "transfer", config_file, flags)
        result = run_transfer(cfg)
        _show(transfer_table(result), "potstill study transfer", ratio_lines(result), cfg.out,
              ["results.json", "table.md", "quality_vs_tokens.png"])

    @study.command("collapse")
    @config_options(CollapseConfig)
    def collapse_cmd(config_file, **flags):
        """Each generation's student teaches the next: diversity, fidelity to gen 0, reference NLL."""
        from potstill.studies.collapse import run_collapse
        from potstill.studies.report import collapse_table

        cfg = make_config(CollapseConfig, "collapse", config_file, flags)
        result = run_collapse(cfg)
        _show(collapse_table(result), "potstill study collapse", [], cfg.out, ["results.json", "table.md", "drift.png"])

    @study.command("budget")
    @config_options(BudgetConfig)
    def budget_cmd(config_file, **flags):
        """Recipes (compression, data, training) compared by held-out quality kept per CPU-minute."""
        from potstill.studies.budget import budget_table, run_budget, summary_lines

        cfg = make_config(BudgetConfig, "budget", config_file, flags)
        result = run_budget(cfg)
        _show(budget_table(result), "potstill study budget", summary_lines(result), cfg.out,
              ["results.json", "table.md", "quality_vs_cpu.png"])


def _show(table, title: str, lines: list[str], out: str, files: list[str]) -> None:
    from rich.console import Console

    from potstill.studies.common import rich_table

    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(rich_table(*table, title=title))
    for line in lines:
        console.print(line)
    console.print(f"artefacts: {out}/ ({', '.join(files)})")
