"""A real PostgreSQL server for tests: initdb in a temp dir, a random port on 127.0.0.1, stopped after.

Needs Debian's `postgresql` package (initdb/pg_ctl under /usr/lib/postgresql/*/bin) and the
`psycopg` driver (`pip install 'psycopg[binary]'`, in the dev extra). Without them the tests skip
and say which is missing. As root, the server runs as the `postgres` user (PostgreSQL refuses root).
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.guard_fixtures import free_port


def pg_bin() -> Path | None:
    """The newest PostgreSQL bin directory with initdb, or None."""
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(Path(p).parts[-3]))
    if found:
        return Path(found[-1]).parent
    which = shutil.which("initdb")
    return Path(which).parent if which else None


def skip_reason() -> str | None:
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "no PostgreSQL driver: pip install 'psycopg[binary]' (the dev extra has it)"
    if pg_bin() is None:
        return "no PostgreSQL server binaries: apt-get install -y postgresql"
    if os.geteuid() == 0 and shutil.which("runuser") is None:
        return "running as root without runuser: PostgreSQL refuses to run as root"
    return None


def _skip_or_fail(message: str) -> None:
    """A skip on a developer's machine; a failure where CI (or POTSTILL_REQUIRE_POSTGRES=1) asks for it."""
    if os.environ.get("CI") in ("1", "true") or os.environ.get("POTSTILL_REQUIRE_POSTGRES") == "1":
        pytest.fail(message)
    pytest.skip(message)


@contextmanager
def postgres_server(tmp: Path):
    """Yield a SQLAlchemy URL to a fresh PostgreSQL database; stop the server (and delete it) on exit."""
    reason = skip_reason()
    if reason:
        _skip_or_fail(reason)
    binp = pg_bin()
    prefix: list[str] = []
    if os.geteuid() == 0:
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            _skip_or_fail("running as root and no 'postgres' user to run the server as")
        tmp = Path(tempfile.mkdtemp(prefix="potstill-pg-"))  # pytest's tmp dirs are root-only (0700)
        os.chown(tmp, pw.pw_uid, pw.pw_gid)
        prefix = ["runuser", "-u", "postgres", "--"]
    tmp = Path(tmp)
    data, sock = tmp / "pgdata", tmp / "pgsock"
    run_as = prefix + ["mkdir", "-p", str(sock)]
    subprocess.run(run_as, check=True, timeout=30)
    port = free_port()

    def run(*args: str) -> None:
        out = subprocess.run(prefix + list(args), capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{Path(args[0]).name} failed: {out.stderr.strip()[-500:]}")

    run(str(binp / "initdb"), "-D", str(data), "-U", "potstill", "--auth=trust", "-E", "UTF8", "--no-sync")
    run(str(binp / "pg_ctl"), "-D", str(data), "-l", str(tmp / "pg.log"), "-w", "-t", "60", "-o",
        f"-p {port} -k {sock} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200", "start")
    try:
        yield f"postgresql+psycopg://potstill@127.0.0.1:{port}/postgres"
    finally:
        run(str(binp / "pg_ctl"), "-D", str(data), "-m", "immediate", "-w", "stop")
        if prefix:
            shutil.rmtree(tmp, ignore_errors=True)
