"""What the report tests share: an HTML reader for the page's tables, images and token spans (a plain
module, so test files import from here and never from each other; Chromium is in browser_fixtures)."""

from __future__ import annotations

from html.parser import HTMLParser


class Page(HTMLParser):
    """Tables (rows of (attrs, text) cells), images and token spans of an HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.tables, self.imgs, self.spans, self.links = [], [], [], []
        self._cell = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            self.tables.append({"attrs": a, "rows": []})
        elif tag == "tr" and self.tables:
            self.tables[-1]["rows"].append({"attrs": a, "cells": []})
        elif tag in ("td", "th") and self.tables:
            self._cell = [a, ""]
        elif tag == "img":
            self.imgs.append(a)
        elif tag == "span" and "data-p" in a:
            self.spans.append(a)
        if "href" in a or ("src" in a and tag != "img"):
            self.links.append(a.get("href") or a.get("src"))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1]["rows"][-1]["cells"].append(tuple(self._cell))
            self._cell = None

    def table(self, cls, run=None):
        return [t for t in self.tables if t["attrs"].get("class") == cls
                and (run is None or t["attrs"].get("data-run") == run)]


def cells_by_key(row):
    return {a["data-key"]: (a.get("data-value"), text) for a, text in row["cells"] if "data-key" in a}
