"""pyproject.toml declares what the code imports, and imports what it declares."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAME = {"yaml": "pyyaml"}  # import name -> distribution name where they differ
RUNTIME_ONLY = {"gguf"}  # never imported by potstill: transformers needs it to read the embedded GGUF


def _dist(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].lower().replace("-", "_")


def _imported() -> set[str]:
    names = set()
    for path in (ROOT / "src" / "potstill").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                mods = [node.module]
            else:
                continue
            for mod in mods:
                top = mod.split(".")[0]
                if top not in sys.stdlib_module_names and top != "potstill":
                    names.add(IMPORT_NAME.get(top, top).lower())
    return names


def test_declared_dependencies_match_imports():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    required = {_dist(r) for r in project["dependencies"]}
    extras = {_dist(r) for reqs in project["optional-dependencies"].values() for r in reqs} - {"potstill"}
    imported = _imported()
    assert imported - required - extras == set(), "imported but not declared"
    assert required - imported - RUNTIME_ONLY == set(), "declared but never imported"
