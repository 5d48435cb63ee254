"""`potstill report RUN_DIR [RUN_DIR ...] --out DIR`: the report verb, registered on the main CLI.

Thin, like cli.py: flags come from `ReportConfig` (potstill.evaluate.report_config), the work happens there.
"""

from __future__ import annotations

import click


def register(app: click.Group) -> None:
    from potstill.cli import config_options, make_config
    from potstill.evaluate.report_config import ReportConfig

    @app.command("report")
    @click.argument("run_dirs", nargs=-1, required=True, type=click.Path())
    @config_options(ReportConfig)
    def report(run_dirs, config_file, **flags):
        """One self-contained HTML page over run directories (or student / eval / capture dirs)."""
        from potstill.evaluate.report import build_report

        cfg = make_config(ReportConfig, "report", config_file, flags)
        result = build_report(list(run_dirs), cfg)
        click.echo(f"wrote {result['files'][-1]}")
