"""Headless Chromium for the tests that check a page in a real browser (report, case file)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


def chromium() -> str:
    """The Chromium binary; a failure when CI=1 or POTSTILL_REQUIRE_CHROMIUM=1 asks for it, else a skip."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path:
        return path
    required = os.environ.get("CI") == "1" or os.environ.get("POTSTILL_REQUIRE_CHROMIUM") == "1"
    message = "chromium is not installed (apt-get install chromium; `make test` does it)"
    if required:
        pytest.fail(message)
    pytest.skip(message)


def headless_flags(tmp: Path) -> list[str]:
    """Flags for a headless run with its own profile under `tmp`, nothing fetched in the background."""
    return ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp / 'profile'}"]
