"""Study verbs of the CLI: `potstill study transfer` and `potstill study collapse`. Thin, like cli.py.

    potstill study transfer --seeds 3 --max-tokens 32000        # KD vs teacher text vs human text
    potstill study collapse --generations 3                     # distil a distillation, N times
    potstill study antidistill --lambdas 0.5 1 2                # anti-distillation vs temperature

Flags come from the typed configs in studies/transfer.py and studies/collapse.py (`--config FILE.yaml`
works as for the other verbs); the library does the work, this prints the tables.
"""

from __future__ import annotations

import sys

import click

from potstill.studies.antidistill import AntidistillStudyConfig
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


    @study.command("antidistill")
    @config_options(AntidistillStudyConfig)
    def antidistill_cmd(config_file, **flags):
        """Anti-distillation sampling vs temperature: teacher cost against the distilled student's loss."""
        from potstill.studies.antidistill import run_antidistill
        from potstill.studies.antidistill_report import summary_lines, table

        cfg = make_config(AntidistillStudyConfig, "antidistill", config_file, flags)
        result = run_antidistill(cfg)
        _show(table(result), "potstill study antidistill", summary_lines(result), cfg.out,
              ["results.json", "table.md", "tradeoff.png"])


def _show(table, title: str, lines: list[str], out: str, files: list[str]) -> None:
    from rich.console import Console

    from potstill.studies.common import rich_table

    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(rich_table(*table, title=title))
    for line in lines:
        console.print(line)
    console.print(f"artefacts: {out}/ ({', '.join(files)})")
