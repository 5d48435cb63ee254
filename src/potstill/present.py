"""Tables for people: rows of cells rendered once, as a rich console table, plain text or markdown.

    headers = ["model", "KL"]; rows = [["teacher", "0.000"], ["student", "0.120"]]
    console.print(rich_table(headers, rows, title="potstill eval"))   # a terminal
    text_table(headers, rows)                                         # a log line, click.echo
    markdown_table(headers, rows, align="lr")                         # eval.md, the README

`align` gives each column's justification, one letter per column ('l' or 'r'); by default the first
column is left-aligned and the rest (numbers) right-aligned. Cells are shown as given (`str(cell)`),
never read as rich markup.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

Rows = Sequence[Sequence[Any]]


def _align(headers: Sequence[str], align: str | None) -> str:
    align = align or "l" + "r" * (len(headers) - 1)
    if len(align) != len(headers) or set(align) - {"l", "r"}:
        raise ValueError(f"align {align!r}: one 'l' or 'r' per column ({len(headers)})")
    return align


def rich_table(headers: Sequence[str], rows: Rows, title: str = "", caption: str | None = None,
               align: str | None = None, plain: bool = False):
    """A `rich.table.Table`; `plain`: no outer edges, one rule under the header (for plain-text output)."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    kwargs: dict[str, Any] = {"box": box.SIMPLE_HEAD, "show_edge": False, "pad_edge": False} if plain else {}
    table = Table(title=title or None, caption=caption, **kwargs)
    for h, a in zip(headers, _align(headers, align), strict=True):
        table.add_column(Text(str(h)), justify="left" if a == "l" else "right", no_wrap=plain)
    for row in rows:
        table.add_row(*(Text(str(c)) for c in row))
    return table


def text_table(headers: Sequence[str], rows: Rows, align: str | None = None, width: int = 240) -> str:
    """The table as plain text: a header, a rule, one line per row (no colour, no trailing spaces)."""
    from rich.console import Console

    buf = io.StringIO()
    Console(file=buf, width=width, color_system=None, highlight=False, emoji=False).print(
        rich_table(headers, rows, align=align, plain=True))
    return "\n".join(line.rstrip() for line in buf.getvalue().splitlines())


def markdown_table(headers: Sequence[str], rows: Rows, align: str | None = None) -> str:
    """A GitHub-markdown table; with `align`, right-aligned columns are marked `---:` (else every column `---`)."""
    marks = ["---:" if a == "r" else "---" for a in align] if align else ["---"] * len(headers)
    if len(marks) != len(headers):
        raise ValueError(f"align {align!r}: one letter per column ({len(headers)})")
    lines = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "|".join(marks) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
