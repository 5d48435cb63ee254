"""potstill.present: one table helper for the console (rich), plain text and markdown."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from potstill.present import markdown_table, rich_table, text_table

HEADERS = ["model", "KL", "tok/s"]
ROWS = [["teacher", "0.000", 120], ["[bold]student[/bold]", "0.125", 3400]]


def test_markdown_table():
    assert markdown_table(HEADERS, ROWS) == (
        "| model | KL | tok/s |\n|---|---|---|\n| teacher | 0.000 | 120 |\n| [bold]student[/bold] | 0.125 | 3400 |")
    assert markdown_table(HEADERS, ROWS, align="lrr").splitlines()[1] == "|---|---:|---:|"
    with pytest.raises(ValueError):
        markdown_table(HEADERS, ROWS, align="lr")


def test_text_table_is_header_rule_rows_with_numbers_right_aligned():
    lines = text_table(HEADERS, ROWS).splitlines()
    assert len(lines) == 2 + len(ROWS) and set(lines[1]) == {"─"}
    assert lines[0].split() == HEADERS
    assert lines[3].startswith("[bold]student[/bold]")  # a cell is text, never rich markup
    assert lines[2].endswith(" 120") and lines[3].endswith("3400") and len(lines[2]) == len(lines[3])
    assert all(line == line.rstrip() for line in lines)
    with pytest.raises(ValueError):
        text_table(HEADERS, ROWS, align="lxr")


def test_rich_table_renders_every_cell():
    buf = io.StringIO()
    Console(file=buf, width=120, color_system=None).print(rich_table(HEADERS, ROWS, title="potstill eval"))
    out = buf.getvalue()
    assert "potstill eval" in out and "[bold]student[/bold]" in out and "3400" in out and "0.125" in out
