"""Self-contained HTML pages (inline CSS, PNGs as data: URIs, no script): `potstill report` and `potstill case`.

Every piece of user or artefact text goes through `esc` (html.escape, quotes included): prompts in a
query log are written by whoever holds a key, so a page must never run or render them as markup.
"""

from __future__ import annotations

import base64
import json
from html import escape
from typing import Any

CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1240px;padding:16px 24px;color:#1b1f24}
h1{margin:.2em 0}h2{border-bottom:2px solid #d0d7de;padding-bottom:4px;margin-top:2em}h3{margin:1.2em 0 .4em}
.meta{color:#57606a}nav a{margin-right:14px}
table{border-collapse:collapse;margin:.4em 0 1em;font-size:13px}
th,td{border:1px solid #d0d7de;padding:3px 8px;vertical-align:top}th{background:#f3f5f7;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums}tr.teacher td{background:#f7f7f2}
td.front{background:#fde8e8;font-weight:600}
img.plot{max-width:100%;border:1px solid #eaeef2;margin:.5em 0}
code,.hash{font:12px ui-monospace,SFMono-Regular,Menlo,monospace;word-break:break-all}
pre{background:#f6f8fa;padding:8px;overflow-x:auto;white-space:pre-wrap;overflow-wrap:anywhere;font-size:12px;margin:.3em 0}
.card{border:1px solid #d0d7de;border-radius:6px;padding:10px 12px;margin:12px 0}
.grid{display:grid;grid-template-columns:repeat(auto-fit,minmax(300px,1fr));gap:10px}
.cell{background:#fbfcfd;border:1px solid #eaeef2;border-radius:4px;padding:6px 8px}
.cell h4{margin:0 0 4px;font-size:13px}.small{font-size:12px;color:#57606a}
.tokens{white-space:pre-wrap;overflow-wrap:anywhere;font:13px/1.7 ui-monospace,SFMono-Regular,Menlo,monospace}
.tokens span{border-radius:2px}.tokens span.top1{border-bottom:2px solid #1a7f37}
.legend{display:inline-block;width:160px;height:10px;vertical-align:middle;
 background:linear-gradient(to right,hsl(0,75%,82%),hsl(60,75%,82%),hsl(120,75%,82%))}
.bad{color:#cf222e;font-weight:600}.good{color:#1a7f37}
"""


def esc(value: Any) -> str:
    return escape("" if value is None else str(value), quote=True)


def img(png: bytes | None, ident: str, alt: str) -> str:
    if png is None:
        return f'<p class="small">({esc(alt)}: nothing to plot)</p>'
    data = base64.b64encode(png).decode("ascii")
    return f'<img class="plot" id="{esc(ident)}" alt="{esc(alt)}" src="data:image/png;base64,{data}">'


def num_cell(key: str, value: Any, text: str, extra: str = "") -> str:
    data = "" if value is None else f' data-value="{esc(repr(value))}"'
    return f'<td class="num{extra}" data-key="{esc(key)}"{data}>{esc(text)}</td>'


def kv_table(pairs: list[tuple[str, Any]], cls: str = "kv") -> str:
    body = "".join(f"<tr><th>{esc(k)}</th><td>{value_html(v)}</td></tr>" for k, v in pairs if v is not None)
    return f'<table class="{cls}">{body}</table>'


def value_html(v: Any) -> str:
    if isinstance(v, dict | list):
        return f"<code>{esc(json.dumps(v, ensure_ascii=False, default=str))}</code>"
    text = esc(v)
    return f'<span class="hash">{text}</span>' if isinstance(v, str) and len(v) == 64 else text


def page(title: str, meta: str, sections: list[tuple[str, str, str]]) -> str:
    """sections: (anchor id, heading, inner HTML)."""
    nav = "".join(f'<a href="#{esc(i)}">{esc(h)}</a>' for i, h, _ in sections)
    body = "".join(f'<section id="{esc(i)}"><h2>{esc(h)}</h2>{inner}</section>' for i, h, inner in sections)
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)}</title>'
            f'<meta name="viewport" content="width=device-width,initial-scale=1"><style>{CSS}</style></head>'
            f'<body><h1>{esc(title)}</h1><p class="meta">{meta}</p><nav>{nav}</nav>{body}</body></html>\n')
