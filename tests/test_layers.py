"""The layer rules hold: import-linter's contracts in pyproject.toml, run as `make lint` runs them.

Rules: the library never imports the CLI; train does not import teachers; teachers do not import
capture; guard does not import train. (`potstill --help` staying free of torch/numpy: test_config.py.)
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT = "import sys; from importlinter.cli import lint_imports_command; sys.argv[0] = 'lint-imports'; sys.exit(lint_imports_command())"


def lint_imports(*args: str) -> subprocess.CompletedProcess:
    try:
        import importlinter  # noqa: F401
    except ImportError:  # pragma: no cover
        pytest.fail("import-linter is not installed: pip install -e '.[dev]'")
    return subprocess.run([sys.executable, "-c", LINT, *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_contracts_kept():
    res = lint_imports()
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert "4 kept, 0 broken" in res.stdout


def test_a_broken_rule_is_reported(tmp_path):
    """A contract that the code really breaks must fail: the check looks at real imports (the guard's
    suspect decoding goes through potstill.lm, so 'guard without lm' is broken)."""
    config = tmp_path / "contracts.toml"
    config.write_text(
        '[tool.importlinter]\nroot_package = "potstill"\n\n[[tool.importlinter.contracts]]\n'
        'name = "guard without lm"\ntype = "forbidden"\n'
        'source_modules = ["potstill.guard"]\nforbidden_modules = ["potstill.lm"]\n'
    )
    res = lint_imports("--config", str(config))
    assert res.returncode != 0 and "potstill.guard.suspect -> potstill.lm" in res.stdout, res.stdout[-2000:]


def test_cli_contract_covers_every_module():
    """A new top-level module or package is a source of the 'never imports the CLI' contract."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    contract = next(c for c in data["tool"]["importlinter"]["contracts"] if c["name"].startswith("the library never"))
    pkg = ROOT / "src" / "potstill"
    names = {p.stem for p in pkg.glob("*.py") if p.stem != "__init__"} | {
        p.parent.name for p in pkg.glob("*/__init__.py")
    }
    cli = {n for n in names if n == "cli" or n.startswith("cli_")}
    assert {f"potstill.{n}" for n in cli} == set(contract["forbidden_modules"])
    assert {f"potstill.{n}" for n in names - cli} == set(contract["source_modules"])


def test_test_modules_do_not_import_each_other():
    """Shared test helpers live in tests/*_fixtures.py (and tests/tiny.py), not in another test module."""
    import re

    here = Path(__file__).parent
    found = []
    for path in sorted(here.glob("test_*.py")):
        for m in re.finditer(r"(?:from|import)\s+tests\.(test_\w+)", path.read_text()):
            if m.group(1) != path.stem:  # a module's own subprocess script may import it
                found.append(f"{path.name} imports tests.{m.group(1)}")
    assert not found, found
