"""Guard verbs of the CLI: serve, keys, watermark detect, detect, monitor. Thin, like cli.py.

The watermark secret is read from an environment variable (default POTSTILL_WATERMARK_KEY) or a
file, never from a command-line argument, so it does not show up in `ps` or shell history.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import click

from potstill.errors import PotstillError


def watermark_options(fn):
    """--watermark-key-env/--watermark-key-file plus the scheme's parameters (defaults and help: WatermarkConfig)."""
    from potstill.guard.watermark_config import WATERMARK_KEY_ENV, WatermarkConfig

    default = {f.name: f for f in dataclasses.fields(WatermarkConfig)}

    def param(name: str, flag: str):
        f = default[name]
        return click.option(flag, name, default=f.default, show_default=True, help=f.metadata["help"])

    opts = [
        click.option("--watermark-key-env", default=WATERMARK_KEY_ENV, show_default=True,
                     help="Environment variable holding the watermark secret."),
        click.option("--watermark-key-file", type=click.Path(), default=None,
                     help="File holding the watermark secret (instead of the env var)."),
        *(param(name, flag) for name, flag in WATERMARK_FLAGS.items()),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def served_logprobs_option(fn):
    """--served-logprobs (serve only; choices, default and help: WatermarkConfig.served_logprobs)."""
    from potstill.guard.watermark_config import SERVED_LOGPROBS, WatermarkConfig

    f = next(f for f in dataclasses.fields(WatermarkConfig) if f.name == "served_logprobs")
    return click.option("--served-logprobs", type=click.Choice(SERVED_LOGPROBS), default=f.default,
                        show_default=True, help=f.metadata["help"])(fn)


WATERMARK_FLAGS = {"gamma": "--gamma", "delta": "--delta", "context_width": "--context-width",
                   "self_hash": "--self-hash/--no-self-hash"}


def split_watermark_flags(flags: dict) -> dict:
    """The watermark options, popped from a command's `flags` (what is left is the command's own)."""
    return {name: flags.pop(name) for name in ("watermark_key_env", "watermark_key_file", *WATERMARK_FLAGS)}


def watermark_config(flags: dict, required: bool):
    """The WatermarkConfig the watermark flags in `flags` describe (popped from it); secret read by the library."""
    from potstill.guard.watermark_config import load_watermark

    wm = split_watermark_flags(flags)
    return load_watermark(wm.pop("watermark_key_env"), wm.pop("watermark_key_file"), required, **wm)


def _given(**values):
    """The options given on the command line (None: the config's own default decides)."""
    return {k: v for k, v in values.items() if v is not None}


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


_UNSET = object()


def _top_logprobs(ctx, param, value):
    """--max-top-logprobs / N|server: an int >= 0, 'server' (None: the server's cap), or unset."""
    if value is None:
        return _UNSET
    if value == "server":
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 0:
        raise click.BadParameter(f"expected an integer >= 0 or 'server', got {value!r}")
    return n


def _shown_top(n: int | None) -> str:
    return "server" if n is None else "0 (text only)" if n == 0 else str(n)


def register(app: click.Group) -> None:
    """Attach the guard verbs to the main CLI group."""
    from potstill.cli import config_options, field_options, make_config
    from potstill.config import AntidistillConfig
    from potstill.guard.serve_config import TEXT_ONLY
    from potstill.guard.suspect import DetectConfig

    @app.command()
    @click.argument("model", default="embedded")
    @click.option("--host", default=None, help="Interface to bind [default: ServeConfig.host, loopback].")
    @click.option("--port", default=None, type=int, help="TCP port [default: ServeConfig.port].")
    @click.option("--keys-db", default=None, help="API-key store (SQLite path or SQLAlchemy URL).")
    @click.option("--log-db", default=None, help="Query log (SQLite path or SQLAlchemy URL, e.g. PostgreSQL).")
    @click.option("--rpm", default=None, type=int, help="Default requests/minute per key [default: ServeConfig.default_rpm].")
    @click.option("--tpm", default=None, type=int, help="Default tokens/minute per key [default: ServeConfig.default_tpm].")
    @click.option("--max-tokens-cap", default=None, type=int,
                  help="Largest max_tokens a request may ask [default: ServeConfig.max_tokens_cap].")
    @click.option("--max-batch-size", default=None, type=int,
                  help="Most requests decoded together [default: ServeConfig.max_batch_size].")
    @click.option("--docs/--no-docs", default=None,
                  help="Serve /docs, /redoc and /openapi.json (they describe the API to anyone) [default: ServeConfig.docs].")
    @click.option("--name", default=None, help="Model id reported by /v1/models.")
    @serve_options
    @served_logprobs_option
    @watermark_options
    @field_options(AntidistillConfig)
    def serve(model, host, port, keys_db, log_db, rpm, tpm, max_tokens_cap, max_batch_size, docs, name, **flags):
        """Serve MODEL behind an OpenAI-compatible API with keys, limits, watermark and query log.

        With --upstream URL no model is loaded: the same guard runs in front of that OpenAI-compatible
        server (vLLM, llama.cpp, TGI, Ollama, potstill serve); its API key comes from --upstream-key-env.
        The query log is hash-chained under the log key: $POTSTILL_LOG_KEY, else the file named by
        $POTSTILL_LOG_KEY_FILE, else $POTSTILL_HOME/guard/log.key (created). Check it with `potstill log verify`.
        """
        from potstill.guard.serve import ServeConfig
        from potstill.guard.serve import serve as run_serve
        from potstill.utils import quiet_transformers

        derived = {k: flags.pop(k) for k in list(flags) if k in SERVE_DERIVED}
        served_logprobs = flags.pop("served_logprobs")
        ad_flags = {f.name: flags.pop(f.name) for f in dataclasses.fields(AntidistillConfig)}
        ad = make_config(AntidistillConfig, "serve", None, ad_flags).antidistill_config()
        wm = watermark_config(flags, required=False)
        if wm is not None:
            wm = dataclasses.replace(wm, served_logprobs=served_logprobs)
        kw = {k: (list(v) if isinstance(v, tuple) else v) for k, v in derived.items() if v is not None and v != ()}
        cfg = ServeConfig(keys_url=keys_db, querylog_url=log_db, watermark=wm, model_name=name, antidistill=ad,
                          **_given(host=host, port=port, default_rpm=rpm, default_tpm=tpm, docs=docs,
                                   max_tokens_cap=max_tokens_cap, max_batch_size=max_batch_size), **kw)
        quiet_transformers()
        what = f"gateway to {cfg.upstream}" if cfg.upstream else model
        click.echo(f"serving {what} on http://{cfg.host}:{cfg.port}/v1 (watermark {'on' if wm else 'off'}, "
                   f"antidistill {'lambda ' + str(ad.antidistill) if ad else 'off'})", err=True)
        run_serve(model, cfg)

    @app.group()
    def keys():
        """Create, list and revoke API keys (stored hashed)."""

    def _store(db):
        from potstill.guard.db import home_db
        from potstill.guard.keys import KeyStore

        return KeyStore(db or home_db("keys.db"))

    @keys.command("create")
    @click.argument("name")
    @click.option("--db", default=None, help="Key store (default: $POTSTILL_HOME/guard/keys.db).")
    @click.option("--rpm", default=None, type=int, help="Requests per minute for this key.")
    @click.option("--tpm", default=None, type=int, help="Tokens per minute for this key.")
    @click.option("--max-top-logprobs", "top", default=None, metavar="N|server", callback=_top_logprobs,
                  help="Log-probs this key may receive: N top alternatives, 0 = text only, 'server' = the "
                       f"server's --max-top-logprobs [default: {TEXT_ONLY} (text only)].")
    def keys_create(name, db, rpm, tpm, top):
        """Create a key; the secret is printed once and stored only as a hash."""
        given = {} if top is _UNSET else {"max_top_logprobs": top}  # unset: KeyStore.create's default
        key_id, secret = _store(db).create(name, rpm=rpm, tpm=tpm, **given)
        click.echo(f"key id: {key_id}", err=True)
        click.echo(secret)

    @keys.command("set-logprobs")
    @click.argument("key_id")
    @click.argument("top", metavar="N|server", callback=_top_logprobs)
    @click.option("--db", default=None, help="Key store.")
    def keys_set_logprobs(key_id, top, db):
        """Set how many top log-probs KEY_ID may receive (0: text only; 'server': the server's cap)."""
        _store(db).set_max_top_logprobs(key_id, top)
        click.echo(f"{key_id}: top_logprobs={_shown_top(top)}")

    @keys.command("list")
    @click.option("--db", default=None, help="Key store.")
    def keys_list(db):
        """List keys (ids, names, limits, log-probs, revoked) — never secrets."""
        for r in _store(db).list():
            click.echo(f"{r.key_id}\t{r.name}\trpm={r.rpm}\ttpm={r.tpm}\ttop_logprobs={_shown_top(r.max_top_logprobs)}"
                       f"\t{'revoked' if r.revoked else 'active'}")

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
    def watermark_detect(text_file, tokenizer, jsonl_field, **wm_flags):
        """Green count, z-score and exact p-value of a text (file or stdin)."""
        cfg = watermark_config(wm_flags, required=True)
        from transformers import AutoTokenizer

        from potstill.guard.suspect import read_texts
        from potstill.guard.watermark import detect_text
        from potstill.lm.loading import resolve_model_dir

        texts = read_texts(text_file, jsonl_field)
        tok = AutoTokenizer.from_pretrained(resolve_model_dir(tokenizer))
        click.echo(json.dumps(detect_text(texts, tok, cfg).to_dict(), indent=2))

    @app.command()
    @config_options(DetectConfig)
    @watermark_options
    def detect(config_file, **flags):
        """Was SUSPECT distilled from our watermarked outputs (even from the text alone)? p-value, controls, n."""
        from potstill.guard.suspect import run_detect
        from potstill.utils import quiet_transformers, write_json

        wm_flags = split_watermark_flags(flags)
        cfg = make_config(DetectConfig, "detect", config_file, flags)
        wm = watermark_config(wm_flags, required=True)
        if cfg.log_db:  # check the settings against the watermark the server recorded; take its log-prob policy
            from potstill.guard.detect_keys import align_with_log

            wm, notes = align_with_log(wm, cfg.log_db)
            for note in notes:
                click.echo(f"warning: {note}", err=True)
        quiet_transformers()
        result = run_detect(cfg.suspect, wm, prompts=cfg.prompts, tokenizer=cfg.tokenizer, max_tokens=cfg.max_tokens,
                            log_db=cfg.log_db, key_id=cfg.key_id, gm=cfg)
        if cfg.out:
            write_json(cfg.out, result.to_dict())
        click.echo(result.summary())

    @app.command()
    @click.option("--log-db", default=None, help="Query log (default: $POTSTILL_HOME/guard/queries.db).")
    @click.option("--keys-db", default=None, help="Key store (for --throttle).")
    @click.option("--since-hours", default=None, type=float, help="Only the last N hours of traffic.")
    @click.option("--out", default=None, help="Write the ranked report as JSON here.")
    @click.option("--throttle", is_flag=True, help="Lower the limits of flagged keys and withdraw their log-probs (text only).")
    @click.option("--factor", default=0.1, show_default=True, help="Multiply flagged keys' limits by this.")
    @click.option("--campaigns", is_flag=True, help="Group keys that behave alike and score each group's pooled "
                  "traffic (--throttle then lowers every key of a flagged group).")
    def monitor(log_db, keys_db, since_hours, out, throttle, factor, campaigns):
        """Rank API keys by extraction risk from the query log."""
        import time

        from potstill.guard import monitor as mon
        from potstill.guard.db import existing_db

        log_db = existing_db(log_db)
        since = time.time() - since_hours * 3600 if since_hours else None
        if campaigns:
            from potstill.guard.campaigns import format_campaigns, score_campaigns, write_campaign_report

            groups = score_campaigns(log_db, since=since)
            click.echo(format_campaigns(groups))
            if out:
                write_campaign_report(out, groups, log=log_db)
            flagged = [k for g in groups if g.flagged for k in g.keys]
        else:
            risks = mon.score_keys(log_db, since=since)
            click.echo(mon.format_table(risks))
            if out:
                mon.write_report(out, risks, log=log_db)
            flagged = [r.key_id for r in risks if r.flagged]
        if throttle and flagged:
            new, note = mon.throttle_flagged(_store(keys_db), log_db, flagged, factor)
            if note:
                click.echo(note, err=True)
            for k, (rpm, tpm) in new.items():
                click.echo(f"throttled {k}: rpm={rpm} tpm={tpm}, log-probs withdrawn (text only)")

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
        from potstill.guard.db import existing_db
        from potstill.guard.logchain import load_log_key, verify
        from potstill.utils import write_json

        log_db = existing_db(log_db)
        report = verify(log_db, load_log_key(key_file=log_key_file, create=False))
        if out:
            write_json(out, report.to_dict())
        click.echo(report.summary())
        sys.exit(0 if report.ok else 1)
