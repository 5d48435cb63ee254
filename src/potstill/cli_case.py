"""`potstill case`: the case file about one key or one campaign (guard/case.py)."""

from __future__ import annotations

from pathlib import Path

import click

from potstill.errors import PotstillError
from potstill.guard.case import CaseConfig


def register(app: click.Group) -> None:
    from potstill.cli import config_options, make_config
    from potstill.cli_guard import watermark_config, watermark_options

    @app.command("case")
    @config_options(CaseConfig)
    @watermark_options
    @click.option("--log-key-file", type=click.Path(), default=None,
                  help="File holding the log key (default: $POTSTILL_LOG_KEY, $POTSTILL_LOG_KEY_FILE, "
                       "then $POTSTILL_HOME/guard/log.key).")
    def case(config_file, watermark_key_env, watermark_key_file, gamma, delta, context_width, self_hash,
             log_key_file, **flags):
        """Write case.json + case.html: who, what, the evidence (monitor, watermark, suspect with controls),
        the log's integrity and the commands that reproduce it."""
        from potstill.guard.case import build_case, write_case
        from potstill.utils import potstill_home

        cfg = make_config(CaseConfig, "case", config_file, flags)
        cfg.log_db = cfg.log_db or str(potstill_home() / "guard" / "queries.db")
        if "://" not in cfg.log_db and not Path(cfg.log_db).exists():
            raise PotstillError("no query log here", where=cfg.log_db)
        wm = watermark_config(watermark_key_env, watermark_key_file, gamma, delta, context_width, self_hash,
                              required=bool(cfg.suspect))
        case_data = build_case(cfg, wm, log_key_file, log=lambda m: click.echo(m, err=True))
        for f in write_case(case_data, cfg.out):
            click.echo(f"wrote {f}")
