"""Study verbs of the CLI: `potstill study …`, one table of commands. Thin, like cli.py.

    potstill study transfer --seeds 3 --max-tokens 32000        # KD vs teacher text vs human text
    potstill study collapse --generations 3                     # distil a distillation, N times
    potstill study agent-anchor --max-steps 40                  # agents: SFT on text vs top-k KD
    potstill study detect-power                                 # served tokens a distiller needs before we catch it
    potstill study budget --minutes 3                           # recipes compared per CPU-minute
    potstill study antidistill --lambdas 0.5 1 2                # anti-distillation vs temperature

Flags come from each study's typed config (studies/*.py) (`--config FILE.yaml`
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

# command, config, YAML section, runner, table, summary lines ("module:function" under potstill.studies,
# imported when the command runs), artefacts under --out, help
_STUDIES = (
    ("transfer", TransferConfig, "transfer", "transfer:run_transfer", "report:transfer_table", "report:ratio_lines",
     "results.json table.md quality_vs_tokens.png",
     "Tokens to reach a quality: KD on top-k vs CE on teacher text vs CE on human references."),
    ("collapse", CollapseConfig, "collapse", "collapse:run_collapse", "report:collapse_table", None,
     "results.json table.md drift.png",
     "Each generation's student teaches the next: diversity, fidelity to gen 0, reference NLL."),
    ("budget", BudgetConfig, "budget", "budget:run_budget", "budget:budget_table", "budget:summary_lines",
     "results.json table.md quality_vs_cpu.png",
     "Recipes (compression, data, training) compared by held-out quality kept per CPU-minute."),
    ("agent-anchor", AgentAnchorConfig, "agent_anchor", "agent_anchor:run_agent_anchor", "agent_anchor:anchor_rows",
     "agent_anchor:anchor_lines", "results.json table.md eval/",
     "Agents: SFT on verified trajectories' text (the anchor) vs top-k KD, same init, then agent eval."),
    ("detect-power", DetectPowerConfig, "detect-power", "detect_power:run_detect_power",
     "detect_power_report:power_table", "detect_power_report:summary_lines", "results.json table.md power.png",
     "Detection p-value (green mass vs argmax) against served tokens and steps, fkl and ce, with null controls."),
    ("antidistill", AntidistillStudyConfig, "antidistill", "antidistill:run_antidistill", "antidistill_report:table",
     "antidistill_report:summary_lines", "results.json table.md tradeoff.png",
     "Anti-distillation sampling vs temperature: teacher cost against the distilled student's loss."),
)


def register(app: click.Group) -> None:
    """Attach the `study` group to the main CLI group."""

    @app.group()
    def study():
        """Studies composed from the pipeline's stages (JSON + table + PNG under --out)."""

    for spec in _STUDIES:
        _add_study(study, *spec)


def _add_study(group: click.Group, name: str, cls: type, section: str, runner: str, table: str,
               lines: str | None, files: str, doc: str) -> None:
    from potstill.cli import config_options, make_config

    @group.command(name, help=doc)
    @config_options(cls)
    def command(config_file, **flags):
        cfg = make_config(cls, section, config_file, flags)
        result = _study_function(runner)(cfg)
        _show(_study_function(table)(result), f"potstill study {name}",
              _study_function(lines)(result) if lines else [], cfg.out, files.split())


def _study_function(ref: str):
    import importlib

    module, function = ref.split(":")
    return getattr(importlib.import_module(f"potstill.studies.{module}"), function)


def _show(table, title: str, lines: list[str], out: str, files: list[str]) -> None:
    from rich.console import Console

    from potstill.studies.common import rich_table

    console = Console(width=None if sys.stdout.isatty() else 160)
    console.print(rich_table(*table, title=title))
    for line in lines:
        console.print(line)
    console.print(f"artefacts: {out}/ ({', '.join(files)})")
