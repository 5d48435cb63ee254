"""The HTML of `potstill report`: one self-contained page (inline CSS, PNGs as data: URIs, no script).

Every piece of user or artefact text goes through `esc` (html.escape, quotes included). Numeric
cells carry their exact value in `data-value` so tools (and the tests) can read the page back.
"""

from __future__ import annotations

import json
from typing import Any

from potstill.evaluate import COLUMNS, _fmt, notes
from potstill.htmlpage import CSS, esc, img, kv_table, num_cell, page, value_html  # noqa: F401  (page, CSS, img re-exported)


def eval_table(run_name: str, rows: list[dict[str, Any]]) -> str:
    """The eval.md table as HTML: same columns, same formatting, exact values in data-value."""
    cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
    head = "<tr><th>model</th>" + "".join(f"<th>{esc(label)}</th>" for _, label, _ in cols) + "</tr>"
    body = []
    for r in rows:
        cells = "".join(num_cell(k, r.get(k), _fmt(k, f, r.get(k))) for k, _, f in cols)
        cls = ' class="teacher"' if r.get("model") == "teacher" else ""
        body.append(f'<tr{cls} data-model="{esc(r.get("model"))}"><td>{esc(r.get("model"))}</td>{cells}</tr>')
    note = "".join(f'<p class="small">{esc(line.removeprefix("- "))}</p>' for line in notes(rows).splitlines())
    return f'<table class="eval" data-run="{esc(run_name)}">{head}{"".join(body)}</table>{note}'


def pareto_table(points: list[dict[str, Any]], quality_label: str) -> str:
    head = (f"<tr><th>run</th><th>student</th><th>{esc(quality_label)}</th><th>gen tok/s</th><th>size MB</th>"
            "<th>front: speed</th><th>front: size</th></tr>")
    body = []
    for p in points:
        size = None if p.get("size_bytes") is None else p["size_bytes"] / 1e6
        speed = p.get("speed")
        cells = (num_cell("quality", p["quality"], f"{p['quality']:.4g}")
                 + num_cell("speed", speed, "–" if speed is None else f"{speed:.1f}")
                 + num_cell("size", size, "–" if size is None else f"{size:.1f}"))
        for k in ("pareto_speed", "pareto_size"):
            cells += f'<td class="{"front" if p.get(k) else ""}" data-key="{k}">{"yes" if p.get(k) else ""}</td>'
        body.append(f'<tr data-run="{esc(p["run"])}" data-model="{esc(p["model"])}"><td>{esc(p["run"])}</td>'
                    f'<td>{esc(p["model"])}</td>{cells}</tr>')
    return f'<table class="pareto">{head}{"".join(body)}</table>'


def training_table(series: list[tuple[str, list[dict[str, Any]]]]) -> str:
    keys = ["loss", "kd", "ce", "lr", "grad_norm", "tokens_per_s"]
    head = "<tr><th>student</th><th>steps</th>" + "".join(f"<th>first {k}</th><th>last {k}</th>" for k in keys[:3])
    head += "<th>last lr</th><th>last grad norm</th><th>train tok/s</th></tr>"
    body = []
    for label, recs in series:
        if not recs:
            continue
        first, last = recs[0], recs[-1]
        cells = "".join(num_cell(f"{w}_{k}", r.get(k), _g(r.get(k))) for k in keys[:3] for w, r in
                        (("first", first), ("last", last)))
        cells += "".join(num_cell(f"last_{k}", last.get(k), _g(last.get(k))) for k in keys[3:])
        body.append(f'<tr><td>{esc(label)}</td>{num_cell("steps", last["step"], str(last["step"]))}{cells}</tr>')
    return f'<table class="training">{head}{"".join(body)}</table>'


def _g(v: Any) -> str:
    return "–" if v is None else f"{v:.4g}"


def shade(pieces: list[str], probs: list[float] | None, top1: list[bool] | None = None) -> str:
    """Tokens as spans coloured red (p=0) -> yellow -> green (p=1); the model's top-1 underlined."""
    if not pieces:
        return ""
    out = []
    for i, piece in enumerate(pieces):
        if probs is None:
            out.append(esc(piece))
            continue
        p = min(max(float(probs[i]), 0.0), 1.0)
        is_top = bool(top1[i]) if top1 is not None else False
        title = f"p={p:.3f}" + (" · top-1" if is_top else "")
        cls = ' class="top1"' if is_top else ""
        out.append(f'<span{cls} style="background:hsl({120 * p:.0f},75%,82%)" title="{esc(title)}" '
                   f'data-p="{p:.4f}">{esc(piece)}</span>')
    return f'<div class="tokens">{"".join(out)}</div>'


def prompt_text(messages: Any) -> str:
    if isinstance(messages, list):
        return "\n".join(f"{m.get('role', '?')}: {m.get('content', '')}" for m in messages if isinstance(m, dict))
    return str(messages)


def examples_section(run_name: str, ex: dict[str, Any]) -> str:
    parts = [f'<p class="small">{esc(n)}</p>' for n in ex.get("notes", [])]
    for i, row in enumerate(ex.get("rows", [])):
        teacher = shade(row["pieces"], row["teacher_prob"]) or "<pre>" + esc(row["teacher_text"]) + "</pre>"
        cells = [
            f'<div class="cell teacher"><h4>teacher (captured, {esc(row["finish_reason"])}) '
            f'<span class="small">shaded by its own probability</span></h4>{teacher}</div>'
        ]
        for st in ex.get("students", []):
            r = st["rows"][i]
            n = max(len(r["prob"]), 1)
            stats = f"mean p {sum(r['prob']) / n:.3f}; teacher token is its top-1 on {sum(r['top1']) / n:.0%}"
            if r["agree_teacher_top1"] is not None:
                stats += f"; top-1 agrees with the teacher's top-1 on {sum(r['agree_teacher_top1']) / n:.0%}"
            cells.append(
                f'<div class="cell student" data-student="{esc(st["label"])}"><h4>{esc(st["label"])}: its own answer '
                f'<span class="small">(greedy)</span></h4><pre>{esc(r["answer"])}</pre>'
                f'<h4>the teacher\'s answer as {esc(st["label"])} sees it</h4>'
                f'{shade(row["pieces"], r["prob"], r["top1"])}<p class="small">{esc(stats)}</p></div>'
            )
        ref = row.get("reference") or ""
        if len(ref) > 240:  # long references fold away; the answers are what the card is about
            ref = (f'<details class="small"><summary>reference answer: {esc(ref[:160])}…</summary>'
                   f"<pre>{esc(ref)}</pre></details>")
        elif ref:
            ref = f'<p class="small">reference answer: {esc(ref)}</p>'

        parts.append(
            f'<div class="card example" data-run="{esc(run_name)}" data-id="{esc(row["id"])}">'
            f'<h4>prompt <span class="small">({esc(row["split"])} row {esc(row["id"])})</span></h4>'
            f'<pre>{esc(prompt_text(row["prompt"]))}</pre>{ref}<div class="grid">{"".join(cells)}</div></div>'
        )
    return "".join(parts) or '<p class="small">(no capture rows or students to show)</p>'


def capture_table(stats: list[tuple[str, dict[str, Any]]]) -> str:
    fields = [
        ("rows", "rows", "{:,}"), ("completion_tokens", "completion tokens", "{:,}"),
        ("prompt_tokens", "prompt tokens", "{:,}"), ("shards", "shards", "{}"),
        ("shard_bytes", "shard bytes", "{:,}"), ("bytes_per_completion_token", "bytes / completion token", "{:.2f}"),
        ("topk_bytes_per_completion_token", "top-k bytes / completion token", "{:.2f}"),
        ("mean_teacher_entropy", "mean teacher entropy, nats", "{:.4f}"),
    ]
    head = "<tr><th>capture</th>" + "".join(f"<th>{esc(label)}</th>" for _, label, _ in fields)
    head += "<th>splits</th><th>finish reasons</th><th>codec</th></tr>"
    body = []
    for name, s in stats:
        cells = "".join(num_cell(k, s.get(k), "–" if s.get(k) is None else f.format(s[k])) for k, _, f in fields)
        splits = ", ".join(f"{k}: {v}" for k, v in s["splits"].items())
        finish = ", ".join(f"{k}: {v}" for k, v in s["finish_reasons"].items())
        codec = s.get("codec") or {}
        incomplete = "" if s["complete"] else ' <span class="bad">(incomplete)</span>'
        body.append(f'<tr data-run="{esc(name)}"><td>{esc(name)}{incomplete}</td>{cells}<td>{esc(splits)}</td>'
                    f'<td data-key="finish_reasons">{esc(finish)}</td><td>{value_html(codec)}</td></tr>')
    return f'<table class="capture">{head}{"".join(body)}</table>'


def provenance_section(name: str, prov: dict[str, Any]) -> str:
    out = [f'<h3 id="prov-{esc(name)}">{esc(name)}</h3>']
    m = prov.get("manifest")
    if m:
        t = m.get("teacher") or {}
        out.append("<h4>capture</h4>" + kv_table([
            ("path", prov.get("capture")), ("manifest sha256", prov.get("manifest_sha256")),
            ("teacher", t.get("name")), ("backend", t.get("backend")), ("weights sha256", t.get("weights_sha256")),
            ("tokenizer sha256", t.get("tokenizer_sha256")), ("chat template sha256", t.get("chat_template_sha256")),
            ("vocab size", t.get("vocab_size")), ("sampling", m.get("sampling")), ("codec", m.get("codec")),
            ("prompts", m.get("prompts")), ("split", m.get("split")), ("potstill version", m.get("potstill_version")),
            ("created", m.get("created")),
        ]))
        shards = "".join(f'<tr><td>{esc(s.get("file"))}</td>{num_cell("rows", s.get("rows"), str(s.get("rows")))}'
                         f'{num_cell("bytes", s.get("bytes"), format(s.get("bytes") or 0, ","))}'
                         f'<td class="hash">{esc(s.get("sha256"))}</td></tr>' for s in m.get("shards", []))
        out.append(f'<details><summary>{len(m.get("shards", []))} shards</summary><table class="shards">'
                   f"<tr><th>file</th><th>rows</th><th>bytes</th><th>sha256</th></tr>{shards}</table></details>")
    for s in prov.get("students", []):
        match = s.get("capture_matches")
        flag = None if match is None else ("matches this capture" if match else "DIFFERS from this capture")
        out.append(f"<h4>student: {esc(s['label'])}</h4>" + kv_table([
            ("path", s.get("path")), ("weights sha256", s.get("weights_sha256")),
            ("built as", s.get("student")), ("loss", s.get("loss")),
            ("trained on capture manifest sha256", s.get("capture_manifest_sha256")), ("capture check", flag),
            ("potstill version", s.get("potstill_version")), ("created", s.get("created")),
        ]))
        if s.get("train_config"):
            out.append(f"<details><summary>train config</summary><pre>{esc(json.dumps(s['train_config'], indent=2))}"
                       "</pre></details>")
    if prov.get("eval_config"):
        out.append(f"<h4>eval</h4>{kv_table([('eval.json', prov.get('eval_path'))])}<details><summary>eval config"
                   f"</summary><pre>{esc(json.dumps(prov['eval_config'], indent=2, default=str))}</pre></details>")
    if prov.get("recipe"):
        out.append(f"<h4>recipe (resolved)</h4><details><summary>recipe.resolved.yaml</summary>"
                   f"<pre>{esc(prov['recipe'])}</pre></details>")
    return "".join(out)
