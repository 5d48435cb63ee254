"""Study verbs of the CLI: `potstill study transfer`, `collapse` and `detect-power`. Thin, like cli.py.

    potstill study transfer --seeds 3 --max-tokens 32000        # KD vs teacher text vs human text
    potstill study collapse --generations 3                     # distil a distillation, N times
    potstill study agent-anchor --max-steps 40                  # agents: SFT on text vs top-k KD
    potstill study detect-power                                 # served tokens a distiller needs before we catch it
    potstill study budget --minutes 3                           # recipes compared per CPU-minute
    potstill study antidistill --lambdas 0.5 1 2                # anti-distillation vs temperature

Flags come from the typed configs in studies/transfer.py, collapse.py and budget.py (`--config FILE.yaml`
works as for the other verbs); the library does the work, this prints the tables.
"""

from __future__ import annotations

import sys

import click

from potstill.studies.agent_anchor import AgentAnchorConfig
from potstill.studies.antidistill import AntidistillStudyConfig
from potstill.studies.budget import BudgetConfig
from potstill.studies.collapse import CollapseConfig
from potstill.studies.detect_power import DetectPowerConfig
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


    @study.command("agent-anchor")
    @config_options(AgentAnchorConfig)
    def agent_anchor_cmd(config_file, **flags):
        """Agents: SFT on verified trajectories' text (the anchor) vs top-k KD, same init, then agent eval."""
        from potstill.studies.agent_anchor import anchor_rows, run_agent_anchor

        cfg = make_config(AgentAnchorConfig, "agent_anchor", config_file, flags)
        result = run_agent_anchor(cfg)
        d = result["discordant"]
        _show(anchor_rows(result), "potstill study agent-anchor",
              [f"tool mode, same tasks: SFT only {d.get('sft_only')}, KD only {d.get('kd_only')}, both {d.get('both')}"],
              cfg.out, ["results.json", "table.md", "eval/"])

    @study.command("detect-power")
    @config_options(DetectPowerConfig)
    def detect_power_cmd(config_file, **flags):
        """Detection p-value (green mass vs argmax) against served tokens and steps, fkl and ce, with null controls."""
        from potstill.studies.detect_power import run_detect_power
        from potstill.studies.detect_power_report import power_table, summary_lines

        cfg = make_config(DetectPowerConfig, "detect-power", config_file, flags)
        result = run_detect_power(cfg)
        _show(power_table(result), "potstill study detect-power", summary_lines(result), cfg.out,
              ["results.json", "table.md", "power.png"])


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
