"""Agent verbs of the CLI: `potstill agent generate` and `potstill agent eval`. Thin, like cli.py.

    potstill agent generate --tasks builtin:potstill_tools --teacher embedded --samples 4 --out runs/agentcap
    potstill agent eval --tasks builtin:potstill_tools --students runs/agent-student --out runs/agent-eval

Flags come from the typed configs in agent/generate.py and agent/evaluate.py (`--config FILE.yaml`
works as for the other verbs). `potstill run` hands a recipe with an `agent_generate` section to
agent/pipeline.py.
"""

from __future__ import annotations

import sys

import click

from potstill.agent.evaluate import AgentEvalConfig
from potstill.agent.generate import AgentGenerateConfig


def register(app: click.Group) -> None:
    """Attach the `agent` group to the main CLI group."""
    from potstill.cli import config_options, make_config

    @app.group()
    def agent():
        """Distil tool-using agents: verified trajectories with a sandboxed Python tool."""

    @agent.command("generate")
    @config_options(AgentGenerateConfig)
    def generate_cmd(config_file, **flags):
        """Teacher episodes with the sandboxed tool -> capture (verified: train, others: rejected)."""
        from potstill.agent.generate import agent_generate

        agent_generate(make_config(AgentGenerateConfig, "agent_generate", config_file, flags))

    @agent.command("eval")
    @config_options(AgentEvalConfig)
    def eval_cmd(config_file, **flags):
        """pass@1 with and without the tool, turns, well-formed calls, sandbox errors, tokens per episode."""
        from potstill.agent.evaluate import run_agent_eval

        result = run_agent_eval(make_config(AgentEvalConfig, "agent_eval", config_file, flags))
        show(result, "potstill agent eval")


def show(result: dict, title: str) -> None:
    from rich.console import Console

    from potstill.agent.evaluate import table_rows
    from potstill.present import rich_table

    head, body = table_rows(result)
    table = rich_table(head, body, title=title, align="l" * len(head))
    Console(width=None if sys.stdout.isatty() else 200).print(table)
