"""Guard verbs of the CLI: serve, keys, watermark detect, detect, monitor. Thin, like cli.py.

The watermark secret is read from an environment variable (default POTSTILL_WATERMARK_KEY) or a
file, never from a command-line argument, so it does not show up in `ps` or shell history.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import click

from potstill.errors import PotstillError


def watermark_options(fn):
    """--watermark-key-env/--watermark-key-file plus the scheme's parameters (defaults and help: WatermarkConfig)."""
    from potstill.guard.watermark_config import WatermarkConfig

    default = {f.name: f for f in dataclasses.fields(WatermarkConfig)}

    def param(name: str, flag: str):
        f = default[name]
        return click.option(flag, default=f.default, show_default=True, help=f.metadata["help"])

    opts = [
        click.option("--watermark-key-env", default="POTSTILL_WATERMARK_KEY", show_default=True,
                     help="Environment variable holding the watermark secret."),
        click.option("--watermark-key-file", type=click.Path(), default=None,
                     help="File holding the watermark secret (instead of the env var)."),
        param("gamma", "--gamma"),
        param("delta", "--delta"),
        param("context_width", "--context-width"),
        param("self_hash", "--self-hash/--no-self-hash"),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def watermark_config(key_env, key_file, gamma, delta, context_width, self_hash, required: bool):
    from potstill.guard.watermark_config import WatermarkConfig

    key = None
    if key_file:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as e:
            raise PotstillError(f"cannot read watermark key: {e.strerror}", where=key_file) from None
    elif os.environ.get(key_env):
        key = os.environ[key_env].strip()
    if not key:
        if required:
            raise PotstillError(f"no watermark key: set ${key_env} or pass --watermark-key-file")
        return None
    try:
        return WatermarkConfig(key=key, gamma=gamma, delta=delta, context_width=context_width, self_hash=self_hash)
    except ValueError as e:
        raise PotstillError(f"watermark: {e}") from None


SERVE_DERIVED = {  # ServeConfig field -> flag; default and help come from the field (flag omitted -> its default)
    "upstream": "--upstream", "upstream_key_env": "--upstream-key-env", "upstream_timeout_s": "--upstream-timeout-s",
    "trusted_proxies": "--trusted-proxy", "shared_limits": "--shared-limits/--no-shared-limits",
    "max_concurrent_per_key": "--max-concurrent-per-key", "max_pending": "--max-pending",
    "request_timeout_s": "--request-timeout-s", "max_body_bytes": "--max-body-bytes",
    "max_top_logprobs": "--max-top-logprobs", "batch_window_ms": "--batch-window-ms",
    "max_batch_tokens": "--max-batch-tokens",
}


def serve_options(fn):
    """The SERVE_DERIVED flags of `potstill serve`, each from its ServeConfig field."""
    import typing

    from potstill.cli import _click_type, _shown_default
    from potstill.guard.serve_config import ServeConfig

    hints = typing.get_type_hints(ServeConfig)
    fields = {f.name: f for f in dataclasses.fields(ServeConfig)}
    for name, flag in reversed(SERVE_DERIVED.items()):
        f, tp = fields[name], hints[name]
        helptext = f.metadata["help"] + _shown_default(f)
        if typing.get_origin(tp) is list:
            fn = click.option(flag, name, multiple=True, default=(), help=helptext + " (repeatable)")(fn)
        elif tp is bool:
            fn = click.option(flag, name, default=None, help=helptext)(fn)
        else:
            fn = click.option(flag, name, type=_click_type(tp), default=None, help=helptext)(fn)
    return fn


def register(app: click.Group) -> None:
    """Attach the guard verbs to the main CLI group."""
    from potstill.cli import field_options, make_config
    from potstill.config import AntidistillConfig

    @app.command()
    @click.argument("model", default="embedded")
    @click.option("--host", default="127.0.0.1", show_default=True, help="Interface to bind.")
    @click.option("--port", default=8000, show_default=True, help="TCP port.")
    @click.option("--keys-db", default=None, help="API-key store (SQLite path or SQLAlchemy URL).")
    @click.option("--log-db", default=None, help="Query log (SQLite path or SQLAlchemy URL, e.g. PostgreSQL).")
    @click.option("--rpm", default=None, type=int, help="Default requests/minute per key.")
    @click.option("--tpm", default=None, type=int, help="Default tokens/minute per key.")
    @click.option("--max-tokens-cap", default=1024, show_default=True, help="Largest max_tokens a request may ask.")
    @click.option("--max-batch-size", default=None, type=int,
                  help="Most requests decoded together [default: ServeConfig.max_batch_size, 32].")
    @click.option("--docs/--no-docs", default=False, show_default=True,
                  help="Serve /docs, /redoc and /openapi.json (off: they describe the API to anyone).")
    @click.option("--name", default=None, help="Model id reported by /v1/models.")
    @serve_options
    @watermark_options
    @field_options(AntidistillConfig)
    def serve(model, host, port, keys_db, log_db, rpm, tpm, max_tokens_cap, max_batch_size, docs, name,
              watermark_key_env, watermark_key_file, gamma, delta, context_width, self_hash, **derived):
        """Serve MODEL behind an OpenAI-compatible API with keys, limits, watermark and query log.

        With --upstream URL no model is loaded: the same guard runs in front of that OpenAI-compatible
        server (vLLM, llama.cpp, TGI, Ollama, potstill serve); its API key comes from --upstream-key-env.
        The query log is hash-chained under the log key: $POTSTILL_LOG_KEY, else the file named by
        $POTSTILL_LOG_KEY_FILE, else $POTSTILL_HOME/guard/log.key (created). Check it with `potstill log verify`.
        """
        from potstill.guard.serve import ServeConfig
        from potstill.guard.serve import serve as run_serve
        from potstill.utils import quiet_transformers

        wm = watermark_config(watermark_key_env, watermark_key_file, gamma, delta, context_width, self_hash, False)
        ad_flags = {f.name: derived.pop(f.name) for f in dataclasses.fields(AntidistillConfig)}
        ad = make_config(AntidistillConfig, "serve", None, ad_flags).antidistill_config()
        kw = {k: (list(v) if isinstance(v, tuple) else v)
              for k, v in {"default_rpm": rpm, "default_tpm": tpm, "max_batch_size": max_batch_size, **derived}.items()
              if v is not None and v != ()}
        cfg = ServeConfig(host=host, port=port, keys_url=keys_db, querylog_url=log_db, watermark=wm,
                          max_tokens_cap=max_tokens_cap, model_name=name, docs=docs, antidistill=ad, **kw)
        quiet_transformers()
        what = f"gateway to {cfg.upstream}" if cfg.upstream else model
        click.echo(f"serving {what} on http://{host}:{port}/v1 (watermark {'on' if wm else 'off'}, "
                   f"antidistill {'lambda ' + str(ad.antidistill) if ad else 'off'})", err=True)
        run_serve(model, cfg)

    @app.group()
    def keys():
        """Create, list and revoke API keys (stored hashed)."""

    def _store(db):
        from potstill.guard.keys import KeyStore
        from potstill.utils import potstill_home

        return KeyStore(db or str(potstill_home() / "guard" / "keys.db"))

    @keys.command("create")
    @click.argument("name")
    @click.option("--db", default=None, help="Key store (default: $POTSTILL_HOME/guard/keys.db).")
    @click.option("--rpm", default=None, type=int, help="Requests per minute for this key.")
    @click.option("--tpm", default=None, type=int, help="Tokens per minute for this key.")
    def keys_create(name, db, rpm, tpm):
        """Create a key; the secret is printed once and stored only as a hash."""
        key_id, secret = _store(db).create(name, rpm=rpm, tpm=tpm)
        click.echo(f"key id: {key_id}", err=True)
        click.echo(secret)

    @keys.command("list")
    @click.option("--db", default=None, help="Key store.")
    def keys_list(db):
        """List keys (ids, names, limits, revoked) — never secrets."""
        for r in _store(db).list():
            click.echo(f"{r.key_id}\t{r.name}\trpm={r.rpm}\ttpm={r.tpm}\t{'revoked' if r.revoked else 'active'}")

    @keys.command("revoke")
    @click.argument("key_id")
    @click.option("--db", default=None, help="Key store.")
    def keys_revoke(key_id, db):
        """Revoke a key by id (requests with it get 401)."""
        store = _store(db)
        if store.get(key_id) is None:
            raise PotstillError(f"no key with id {key_id!r}")
        store.revoke(key_id)
        click.echo(f"revoked {key_id}")

    @app.group()
    def watermark():
        """Watermark tools."""

    @watermark.command("detect")
    @click.argument("text_file", default="-")
    @click.option("--tokenizer", default="embedded", show_default=True, help="Model (dir or 'embedded') whose tokenizer produced the text.")
    @click.option("--jsonl-field", default=None, help="Treat TEXT_FILE as JSONL and score this field of each line.")
    @watermark_options
    def watermark_detect(text_file, tokenizer, jsonl_field, watermark_key_env, watermark_key_file, gamma, delta,
                         context_width, self_hash):
        """Green count, z-score and exact p-value of a text (file or stdin)."""
        cfg = watermark_config(watermark_key_env, watermark_key_file, gamma, delta, context_width, self_hash, True)
        from transformers import AutoTokenizer

        from potstill.guard.watermark import detect_text
        from potstill.lm.loading import resolve_model_dir

        try:
            raw = sys.stdin.read() if text_file == "-" else Path(text_file).read_text()
        except OSError as e:
            raise PotstillError(f"cannot read: {e.strerror}", where=text_file) from None
        texts: str | list[str] = raw
        if jsonl_field:
            texts = []
            for n, line in enumerate(raw.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    texts.append(str(json.loads(line)[jsonl_field]))
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise PotstillError(f"no field {jsonl_field!r} in a JSON object", where=f"{text_file}:{n}") from None
        tok = AutoTokenizer.from_pretrained(resolve_model_dir(tokenizer))
        score = detect_text(texts, tok, cfg)
        click.echo(json.dumps(score.to_dict(), indent=2))

    @app.command()
    @click.option("--suspect", required=True, help="Suspect model directory (open weights) or a JSONL/text file of its generations.")
    @click.option("--prompts", default="builtin:seed_tasks", show_default=True, help="Prompts/texts to score the suspect on (open-weights mode).")
    @click.option("--tokenizer", default="embedded", show_default=True, help="Tokenizer for text-only mode.")
    @click.option("--log-db", default=None, help="Score on the answers we served (query log): the distiller's contexts.")
    @click.option("--key-id", default=None, help="With --log-db: only this API key's traffic.")
    @click.option("--max-tokens", default=20000, show_default=True, help="Stop after this many scored (context, token) pairs.")
    @click.option("--out", default=None, help="Write the result as JSON here.")
    @watermark_options
    def detect(suspect, prompts, tokenizer, log_db, key_id, max_tokens, out, watermark_key_env, watermark_key_file,
               gamma, delta, context_width, self_hash):
        """Was SUSPECT distilled from our watermarked outputs? Exact p-value and tokens scored."""
        from potstill.guard.suspect import run_detect
        from potstill.utils import quiet_transformers, write_json

        cfg = watermark_config(watermark_key_env, watermark_key_file, gamma, delta, context_width, self_hash, True)
        quiet_transformers()
        result = run_detect(suspect, cfg, prompts=prompts, tokenizer=tokenizer, max_tokens=max_tokens,
                            log_db=log_db, key_id=key_id)
        if out:
            write_json(out, result.to_dict())
        click.echo(result.summary())

    @app.command()
    @click.option("--log-db", default=None, help="Query log (default: $POTSTILL_HOME/guard/queries.db).")
    @click.option("--keys-db", default=None, help="Key store (for --throttle).")
    @click.option("--since-hours", default=None, type=float, help="Only the last N hours of traffic.")
    @click.option("--out", default=None, help="Write the ranked report as JSON here.")
    @click.option("--throttle", is_flag=True, help="Lower the limits of flagged keys.")
    @click.option("--factor", default=0.1, show_default=True, help="Multiply flagged keys' limits by this.")
    @click.option("--campaigns", is_flag=True, help="Group keys that behave alike and score each group's pooled "
                  "traffic (--throttle then lowers every key of a flagged group).")
    def monitor(log_db, keys_db, since_hours, out, throttle, factor, campaigns):
        """Rank API keys by extraction risk from the query log."""
        import time

        from potstill.guard import monitor as mon
        from potstill.utils import potstill_home

        log_db = log_db or str(potstill_home() / "guard" / "queries.db")
        if not log_db.startswith(("sqlite:", "postgresql", "mysql")) and not Path(log_db).exists():
            raise PotstillError("no query log here", where=log_db)
        since = time.time() - since_hours * 3600 if since_hours else None
        if campaigns:
            from potstill.guard.campaigns import format_campaigns, score_campaigns
            from potstill.utils import write_json

            groups = score_campaigns(log_db, since=since)
            click.echo(format_campaigns(groups))
            if out:
                write_json(out, {"weights": mon.WEIGHTS, "intercept": mon.INTERCEPT, "threshold": mon.THRESHOLD,
                                 "log": log_db, "campaigns": [g.to_dict() for g in groups]})
            flagged = [k for g in groups if g.flagged for k in g.keys]
        else:
            risks = mon.score_keys(log_db, since=since)
            click.echo(mon.format_table(risks))
            if out:
                mon.write_report(out, risks, log=log_db)
            flagged = [r.key_id for r in risks if r.flagged]
        if throttle:
            if flagged:
                from potstill.guard.querylog import server_config
                from potstill.guard.ratelimit import DEFAULT_RPM, DEFAULT_TPM

                served = server_config(log_db)  # keys on server defaults start from the server's own
                if served is None:
                    click.echo(f"note: no server config in the log; keys without limits start from "
                               f"rpm={DEFAULT_RPM} tpm={DEFAULT_TPM}", err=True)
                limits = {k: served.get(k) for k in ("default_rpm", "default_tpm")} if served else {}
                new = mon.throttle(_store(keys_db), flagged, factor, **limits)
                for k, (rpm, tpm) in new.items():
                    click.echo(f"throttled {k}: rpm={rpm} tpm={tpm}")

    @app.group("log")
    def log_group():
        """Query-log tools."""

    @log_group.command("verify")
    @click.option("--log-db", default=None, help="Query log (default: $POTSTILL_HOME/guard/queries.db).")
    @click.option("--log-key-file", type=click.Path(), default=None,
                  help="File holding the log key (default: $POTSTILL_LOG_KEY, $POTSTILL_LOG_KEY_FILE, "
                       "then $POTSTILL_HOME/guard/log.key).")
    @click.option("--out", default=None, help="Write the report as JSON here.")
    def log_verify(log_db, log_key_file, out):
        """Check the log's hash chain and checkpoints; name the first edited, deleted, inserted or reordered row.

        Exit code 0: intact; 1: tampered; 2: bad input (no log, no key).
        """
        from potstill.guard.logchain import load_log_key, verify
        from potstill.utils import potstill_home, write_json

        log_db = log_db or str(potstill_home() / "guard" / "queries.db")
        if "://" not in log_db and not Path(log_db).exists():
            raise PotstillError("no query log here", where=log_db)
        report = verify(log_db, load_log_key(key_file=log_key_file, create=False))
        if out:
            write_json(out, report.to_dict())
        click.echo(report.summary())
        sys.exit(0 if report.ok else 1)
