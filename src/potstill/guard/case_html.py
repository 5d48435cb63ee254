"""The case file as one self-contained page (`case.html`) and its traffic plot (`traffic.png`).

Prompts and completions in a query log are written by whoever holds a key — the person the case
is about: every logged string goes through `esc`, the page has no script, and nothing in it
is fetched from elsewhere.
"""

from __future__ import annotations

import io
import json
from typing import Any

from potstill.htmlpage import esc, img, kv_table, page


def traffic_png(tl: dict[str, Any]) -> bytes | None:
    """Requests (bars) and tokens served (line) per interval."""
    points = tl.get("points") or []
    if not points:
        return None
    from potstill.utils import pyplot

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 3.2), dpi=100)
    xs = range(len(points))
    ax.bar(xs, [p["requests"] for p in points], color="#8fb3de", label="requests")
    ax.bar(xs, [p["errors"] for p in points], color="#d9534f", label="4xx/5xx")
    ax.set_ylabel("requests")
    ax.set_xlabel(f"interval ({tl['seconds']:.0f} s each) from {tl['start']}")
    ax2 = ax.twinx()
    ax2.plot(list(xs), [p["tokens_out"] for p in points], color="#1b1f24", marker=".", label="tokens served")
    ax2.set_ylabel("tokens served")
    fig.legend(loc="upper left", fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _rows_table(cls: str, cols: list[str], rows: list[dict[str, Any]]) -> str:
    head = "".join(f"<th>{esc(c)}</th>" for c in cols)
    body = "".join("<tr>" + "".join(f'<td data-key="{esc(c)}">{esc(_cell(r.get(c)))}</td>' for c in cols) + "</tr>"
                   for r in rows)
    return f'<table class="{esc(cls)}"><tr>{head}</tr>{body}</table>'


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict | list):
        return json.dumps(v, default=str)
    return "" if v is None else str(v)


def _verdict(ok: bool | None, yes: str, no: str) -> str:
    if ok is None:
        return ""
    return f'<p class="{"good" if ok else "bad"}">{esc(yes if ok else no)}</p>'


def case_page(case: dict[str, Any], png: bytes | None) -> str:
    what, ev, integ = case["what"], case["evidence"], case["integrity"]
    mon = ev["monitor"]
    pooled = mon["pooled"]
    per_key = [{"key_id": k, "risk": v["risk"], "flagged": v["flagged"], "requests": v["n_requests"]}
               for k, v in mon["per_key"].items()]
    sections = [
        ("who", "Who", _rows_table("who", ["key_id", "name", "created_at", "revoked_at", "rpm", "tpm",
                                           "max_top_logprobs"], case["who"])),
        ("what", "What", img(png, "traffic", "traffic over time")
         + kv_table([("requests", what["requests"]), ("status codes", what["status"]), ("tokens in", what["tokens_in"]),
                     ("tokens served", what["tokens_out"]), ("requests asking for log-probs", what["logprob_requests"])])
         + "<h3>recurring prompt templates (word 3-grams)</h3>" + _rows_table("templates", ["words", "requests"], what["templates"])
         + "<h3>sampling parameters</h3>" + _rows_table("params", ["params", "requests"], what["params"])
         + "<h3>sample requests</h3>" + "".join(
             f'<div class="card sample"><p class="small">{esc(s["ts"])} · {esc(s["key_id"])} · {esc(s["endpoint"])} · '
             f'{esc(s["status"])}</p><pre class="prompt">{esc(s["prompt"])}</pre><pre class="completion">'
             f'{esc(s["completion"])}</pre></div>' for s in what["samples"])),
        ("evidence", "Evidence", _evidence(mon, pooled, per_key, ev)),
        ("integrity", "Integrity", _verdict(integ["log"].get("verified"), "query log chain verified",
                                            "query log chain NOT verified")
         + kv_table([("log", integ["log"].get("summary") or integ["log"].get("note")), ("inputs", integ["inputs"]),
                     ("versions", integ["versions"]), ("watermark", integ.get("watermark"))])),
        ("reproduce", "Reproduce", "<pre>" + esc("\n".join(case["reproduce"])) + "</pre>"),
    ]
    return page(f"potstill case: {case['case']}", f"created {esc(case['created'])}", sections)


def _evidence(mon: dict, pooled: dict, per_key: list[dict], ev: dict) -> str:
    out = [_verdict(not pooled["flagged"], "monitor: below the extraction threshold",
                    f"monitor: flagged (risk {pooled['risk']:.2f} >= {mon['threshold']:.2f})"),
           kv_table([("pooled risk", pooled["risk"]), ("threshold", mon["threshold"]), ("campaign", mon.get("campaign"))]),
           "<h3>component scores</h3>", _rows_table("scores", list(pooled["scores"]), [pooled["scores"]]),
           "<h3>features</h3>", _rows_table("features", list(pooled["features"]), [pooled["features"]]),
           "<h3>per key</h3>", _rows_table("per-key", ["key_id", "risk", "flagged", "requests"], per_key)]
    wm = ev.get("served_watermark")
    if wm:
        out.append("<h3>watermark in the served text</h3>")
        out.append(kv_table([(k, wm.get(k)) for k in ("answers", "tokens_scored", "green", "green_fraction", "z",
                                                      "p_value", "log10_p", "note")]))
    sus = ev.get("suspect")
    if sus:
        out.append("<h3>suspect model: radioactivity test</h3>")
        out.append(kv_table([("suspect", sus.get("suspect")), ("sha256", sus.get("suspect_sha256")),
                             ("p-value", sus.get("p_value")), ("correction", sus.get("correction")),
                             ("note", sus.get("note"))]))
        if sus.get("per_key"):
            out.append(_rows_table("suspect-keys", ["mode", "tokens_scored", "green", "z", "p_value"], sus["per_key"]))
        if sus.get("controls"):
            out.append("<p class=\"small\">controls: the same suspect under random wrong keys</p>")
            out.append(_rows_table("controls", ["control", "tokens_scored", "p_value"], sus["controls"]))
    return "".join(out)
