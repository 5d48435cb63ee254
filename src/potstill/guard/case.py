"""A case file: the evidence about one key or one campaign, gathered from the guard's own records.

    potstill case --key-id k1 --log-db queries.db --keys-db keys.db [--suspect runs/their-model] --out case-k1

writes `case.json` (everything, machine-readable) and `case.html` (one self-contained page, every
logged string escaped) in `--out`:

- **who**: the keys (name, created, revoked, limits) — one key, or every key of a campaign;
- **what**: traffic over time (requests and tokens served per interval, PNG), the recurring prompt
  templates, the sampling parameters and log-prob use, sample requests with what was served;
- **evidence**: the monitor's features, component scores and risk for the case's pooled traffic and
  per key; the watermark test on the text served to these keys (a binomial p-value over de-duplicated
  (context, token) pairs); with `--suspect`, the radioactivity test of the suspect model on the answers
  these keys received, beside the same test under `controls` random wrong keys (what p-values look
  like when there is nothing to find);
- **integrity**: the query log's hash chain and signed checkpoints verified (`potstill log verify`),
  sha256 of every input (the case's rows as canonical JSON; files where inputs are files), versions;
- **reproduce**: the commands that recompute each part.

Nothing here changes the log or the keys.
"""

from __future__ import annotations

import hashlib
import json
import platform
import secrets
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from potstill.config import derive, opt
from potstill.errors import PotstillError
from potstill.guard.suspect import DetectConfig


@dataclass
class CaseConfig:
    log_db: str = opt(None, "Query log (SQLite path or SQLAlchemy URL; default: $POTSTILL_HOME/guard/queries.db).")
    keys_db: str | None = opt(None, "Key store, for the keys' names, creation dates and limits.")
    key_id: str | None = opt(None, "The key the case is about.")
    campaign: str | None = opt(None, "A campaign id from `potstill monitor --campaigns` (campaign:K+N), or key ids "
                                     "separated by commas.")
    suspect: str | None = opt(None, "A suspect model directory (open weights): test it for our watermark on the "
                                    "answers these keys received.")
    controls: int = opt(5, "Wrong-key controls run beside the suspect's test (same suspect, random keys).")
    max_tokens: int = derive(DetectConfig, "max_tokens", note="Per detection test.")
    samples: int = opt(8, "Sample requests shown.")
    since_hours: float | None = opt(None, "Only the last N hours of traffic.")
    out: str = opt("case", "Output directory (case.json, case.html, traffic.png).")

    def __post_init__(self) -> None:
        if bool(self.key_id) == bool(self.campaign):
            raise PotstillError("case: give exactly one of --key-id or --campaign")
        if self.controls < 0 or self.samples < 0 or self.max_tokens < 1:
            raise PotstillError("case: controls >= 0, samples >= 0, max_tokens >= 1")


def case_keys(cfg: CaseConfig, since: float | None) -> tuple[str, list[str], Any]:
    """(case id, its key ids, the campaign record or None)."""
    if cfg.key_id:
        return cfg.key_id, [cfg.key_id], None
    if cfg.campaign.startswith("campaign:"):
        from potstill.guard.campaigns import score_campaigns

        found = [c for c in score_campaigns(cfg.log_db, since=since) if c.campaign_id == cfg.campaign]
        if not found:
            raise PotstillError(f"no campaign {cfg.campaign!r} in this log (ids come from `potstill monitor "
                                "--campaigns`)", where=cfg.log_db)
        return cfg.campaign, list(found[0].keys), found[0]
    keys = [k.strip() for k in cfg.campaign.split(",") if k.strip()]
    return f"keys:{'+'.join(keys)}", keys, None


def who(keys: list[str], keys_db: str | None) -> list[dict[str, Any]]:
    if not keys_db:
        return [{"key_id": k} for k in keys]
    from potstill.guard.keys import KeyStore

    store = KeyStore(keys_db)
    out = []
    for k in keys:
        rec = store.get(k)
        out.append({"key_id": k, "known": False} if rec is None else {
            "key_id": k, "known": True, "name": rec.name, "created_at": _iso(rec.created_at),
            "revoked_at": _iso(rec.revoked_at), "rpm": rec.rpm, "tpm": rec.tpm,
            "max_top_logprobs": "server" if rec.max_top_logprobs is None else rec.max_top_logprobs})
    return out


def timeline(rows: list[dict[str, Any]], buckets: int = 24) -> dict[str, Any]:
    """Requests, errors and tokens served per interval, over the case's time span."""
    if not rows:
        return {"start": None, "seconds": 0, "points": []}
    t0, t1 = rows[0]["ts"], rows[-1]["ts"]
    width = max((t1 - t0) / buckets, 1.0)
    points = [{"t": _iso(t0 + i * width), "requests": 0, "errors": 0, "tokens_out": 0} for i in range(buckets)]
    for r in rows:
        p = points[min(int((r["ts"] - t0) / width), buckets - 1)]
        p["requests"] += 1
        p["errors"] += int((r.get("status") or 0) >= 400)
        p["tokens_out"] += int(r.get("tokens_out") or 0)
    return {"start": _iso(t0), "end": _iso(t1), "seconds": width, "points": points}


def what(rows: list[dict[str, Any]], n_samples: int) -> dict[str, Any]:
    """Templates, parameters, status codes and sample requests."""
    from potstill.guard.campaigns import key_signature
    from potstill.guard.monitor import prompt_text, prompt_words

    sig = key_signature(rows) if rows else {"skeletons": frozenset()}
    words = [prompt_words(r.get("prompt")) for r in rows]
    counts = Counter(g for w in words for g in {tuple(w[i:i + 3]) for i in range(len(w) - 2)})
    templates = [{"words": " ".join(s), "requests": counts[s]} for s in sorted(sig["skeletons"], key=lambda s: -counts[s])]
    params = Counter(json.dumps(r.get("params") or {}, sort_keys=True) for r in rows)
    step = max(1, len(rows) // max(n_samples, 1))
    samples = [{"ts": _iso(r["ts"]), "key_id": r.get("key_id"), "status": r.get("status"),
                "endpoint": r.get("endpoint"), "prompt": prompt_text(r.get("prompt"))[:2000],
                "completion": (r.get("completion") or "")[:2000]} for r in rows[::step][:n_samples]]
    return {
        "requests": len(rows),
        "status": dict(Counter(str(r.get("status")) for r in rows).most_common()),
        "tokens_in": sum(int(r.get("tokens_in") or 0) for r in rows),
        "tokens_out": sum(int(r.get("tokens_out") or 0) for r in rows),
        "logprob_requests": sum(bool(r.get("logprobs")) for r in rows),
        "templates": templates[:12],
        "params": [{"params": p, "requests": c} for p, c in params.most_common(8)],
        "samples": samples,
    }


def monitor_evidence(case_id: str, by_key: dict[str, list[dict]], campaign) -> dict[str, Any]:
    from potstill.guard import monitor as mon

    pooled = mon.score_rows(case_id, [r for rows in by_key.values() for r in rows])
    per_key = {k: mon.score_rows(k, rows).to_dict() for k, rows in by_key.items()}
    out = {"pooled": pooled.to_dict(), "per_key": per_key, "threshold": mon.THRESHOLD, "weights": mon.WEIGHTS,
           "intercept": mon.INTERCEPT}
    if campaign is not None:
        out["campaign"] = {"campaign_id": campaign.campaign_id, "risk": campaign.risk, "flagged": campaign.flagged}
    return out


def served_watermark(rows: list[dict[str, Any]], wm) -> dict[str, Any]:
    """The watermark test on the token ids served to the case's keys (first h tokens of each answer
    skipped: their context is in the prompt)."""
    from potstill.guard.watermark import detect_ids

    seqs = [list(r["completion_ids"]) for r in rows if r.get("status") == 200 and isinstance(r.get("completion_ids"), list)
            and len(r["completion_ids"]) > wm.context_width]
    if not seqs:
        return {"answers": 0, "note": "no served token ids for these keys"}
    score = detect_ids(seqs, wm, ignore_first=wm.context_width)
    return {"answers": len(seqs), **score.to_dict(), "watermark": wm.public_dict()}


def suspect_evidence(cfg: CaseConfig, keys: list[str], wm, log=print) -> dict[str, Any]:
    """The suspect's radioactivity p-value on these keys' answers, and the same test under wrong keys."""
    from potstill.guard.greenmass_config import GreenMassConfig
    from potstill.guard.suspect import run_detect

    argmax = GreenMassConfig(statistic="argmax")  # the case file's columns are the count's (green, tokens_scored)
    results = []
    for k in keys:  # one key's traffic at a time: the distiller's own contexts
        try:
            results.append(run_detect(cfg.suspect, wm, max_tokens=cfg.max_tokens, log_db=cfg.log_db, key_id=k,
                                      gm=argmax))
        except PotstillError as e:
            log(f"case: suspect on {k}: {e}")
    if not results:
        return {"note": "no served answers to score the suspect on"}
    best = min(results, key=lambda r: r.p_value)
    controls = []
    for i in range(cfg.controls):
        wrong = replace(wm, key=secrets.token_hex(32))
        r = run_detect(cfg.suspect, wrong, max_tokens=cfg.max_tokens, log_db=cfg.log_db, key_id=keys[0], gm=argmax)
        controls.append({"control": f"random key {i + 1}", "p_value": r.p_value, "tokens_scored": r.tokens_scored})
        log(f"case: control {i + 1}/{cfg.controls}: p={r.p_value:.3g}")
    bonferroni = min(1.0, best.p_value * len(results))
    return {"suspect": cfg.suspect, "suspect_sha256": _dir_hash(Path(cfg.suspect)), "per_key": [r.to_dict() for r in results],
            "p_value": bonferroni, "correction": f"Bonferroni over {len(results)} keys (smallest p x {len(results)})",
            "controls": controls}


def integrity(log_db: str, key_file: str | None) -> dict[str, Any]:
    from potstill.guard.logchain import load_log_key, verify

    try:
        key = load_log_key(key_file=key_file, create=False)
    except PotstillError as e:
        return {"verified": False, "note": f"log key unavailable: {e}"}
    report = verify(log_db, key)
    return {"verified": report.ok, "summary": report.summary(), **report.to_dict()}


def build_case(cfg: CaseConfig, wm=None, log_key_file: str | None = None, log=print) -> dict[str, Any]:
    """Gather the case; `wm` is the WatermarkConfig (None: no watermark evidence)."""
    import potstill
    from potstill.guard.querylog import read_log

    since = time.time() - cfg.since_hours * 3600 if cfg.since_hours else None
    case_id, keys, campaign = case_keys(cfg, since)
    by_key = {k: read_log(cfg.log_db, since=since, key_id=k) for k in keys}
    rows = sorted((r for rs in by_key.values() for r in rs), key=lambda r: (r["ts"], r["id"]))
    if not rows:
        raise PotstillError(f"no logged requests for {case_id}", where=cfg.log_db)
    log(f"case {case_id}: {len(keys)} key(s), {len(rows)} requests")
    evidence: dict[str, Any] = {"monitor": monitor_evidence(case_id, by_key, campaign)}
    if wm is not None:
        evidence["served_watermark"] = served_watermark(rows, wm)
        if cfg.suspect:
            evidence["suspect"] = suspect_evidence(cfg, keys, wm, log)
    canon = json.dumps(rows, sort_keys=True, default=str, ensure_ascii=True).encode()
    inputs = {"log_rows_sha256": hashlib.sha256(canon).hexdigest(), "log_rows": len(rows)}
    if "://" not in cfg.log_db and Path(cfg.log_db).is_file():
        inputs["log_file_sha256"] = _file_hash(Path(cfg.log_db))
    import torch
    import transformers

    return {
        "case": case_id, "created": _iso(time.time()),
        "who": who(keys, cfg.keys_db),
        "what": {**what(rows, cfg.samples), "timeline": timeline(rows)},
        "evidence": evidence,
        "integrity": {"log": integrity(cfg.log_db, log_key_file), "inputs": inputs,
                      "versions": {"potstill": potstill.__version__, "torch": torch.__version__,
                                   "transformers": transformers.__version__, "python": platform.python_version()},
                      "watermark": wm.public_dict() if wm is not None else None},
        "reproduce": reproduce(cfg, case_id, keys),
        "config": {k: v for k, v in vars(cfg).items()},
    }


def reproduce(cfg: CaseConfig, case_id: str, keys: list[str]) -> list[str]:
    sel = f"--key-id {cfg.key_id}" if cfg.key_id else f"--campaign '{cfg.campaign}'"
    cmds = [f"potstill log verify --log-db {cfg.log_db}",
            f"potstill monitor --log-db {cfg.log_db}" + (" --campaigns" if cfg.campaign else ""),
            f"potstill case {sel} --log-db {cfg.log_db}" + (f" --suspect {cfg.suspect}" if cfg.suspect else "")
            + f" --out {cfg.out}"]
    if cfg.suspect:
        cmds += [f"potstill detect --suspect {cfg.suspect} --log-db {cfg.log_db} --key-id {k}" for k in keys]
    return cmds


def write_case(case: dict[str, Any], out: str | Path) -> list[Path]:
    """case.json, traffic.png and case.html, each written to a temp file and renamed."""
    from potstill.guard.case_html import case_page, traffic_png
    from potstill.utils import atomic_path, write_json

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    png = traffic_png(case["what"]["timeline"])
    files = [out / "case.json", out / "case.html"]
    write_json(files[0], case)
    if png is not None:
        with atomic_path(out / "traffic.png") as tmp:
            tmp.write_bytes(png)
        files.append(out / "traffic.png")
    with atomic_path(files[1]) as tmp:
        tmp.write_text(case_page(case, png), encoding="utf-8")
    return files


def _iso(ts: float | None) -> str | None:
    return None if ts is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def _file_hash(path: Path) -> str:
    from potstill.utils import sha256_file

    return sha256_file(path)


def _dir_hash(path: Path) -> str | None:
    """sha256 over the sha256 of every file of a model directory (names included), or of one file."""
    if path.is_file():
        return _file_hash(path)
    if not path.is_dir():
        return None
    parts = [f"{f.relative_to(path)}:{_file_hash(f)}" for f in sorted(path.rglob("*")) if f.is_file()]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()
