"""`potstill case`: the case file about one key or one campaign (guard/case.py)."""

from __future__ import annotations

import click

from potstill.guard.case import CaseConfig


def register(app: click.Group) -> None:
    from potstill.cli import config_options, make_config
    from potstill.cli_guard import split_watermark_flags, watermark_config, watermark_options

    @app.command("case")
    @config_options(CaseConfig)
    @watermark_options
    @click.option("--log-key-file", type=click.Path(), default=None,
                  help="File holding the log key (default: $POTSTILL_LOG_KEY, $POTSTILL_LOG_KEY_FILE, "
                       "then $POTSTILL_HOME/guard/log.key).")
    def case(config_file, log_key_file, **flags):
        """Write case.json + case.html: who, what, the evidence (monitor, watermark, suspect with controls),
        the log's integrity and the commands that reproduce it."""
        from potstill.guard.case import build_case, write_case
        from potstill.guard.db import existing_db

        wm_flags = split_watermark_flags(flags)
        cfg = make_config(CaseConfig, "case", config_file, flags)
        cfg.log_db = existing_db(cfg.log_db)
        wm = watermark_config(wm_flags, required=bool(cfg.suspect))
        case_data = build_case(cfg, wm, log_key_file, log=lambda m: click.echo(m, err=True))
        for f in write_case(case_data, cfg.out):
            click.echo(f"wrote {f}")
