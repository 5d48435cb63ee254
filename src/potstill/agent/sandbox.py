"""Run model-written Python in a real sandbox; every failure becomes an observation, never a crash.

Isolation (checked once by `detect_isolation`, reported in manifests and logs):

- "unshare" (util-linux, needs CAP_SYS_ADMIN, e.g. root): new network, mount and PID namespaces. A
  tiny shell bootstrap mounts a tmpfs as the new root, bind-mounts read-only only what the Python
  interpreter needs (/lib, /lib64, /usr/lib, /usr/lib64 and the interpreter's own prefix), an
  empty size-limited tmpfs at /work (many files under the file-size limit cannot fill the disk)
  and /dev/{null,zero,urandom}, then `chroot --userspec`
  drops to uid/gid 65534 (nobody) and runs `python -I -S`. No /proc, no /etc, no home, no network
  (only a down loopback), and RLIMIT_NPROC counts against nobody (root would be exempt).
- "bwrap" (bubblewrap, for a non-root user): the same layout with --unshare-all, --uid 65534,
  --clearenv; RLIMIT_NPROC then counts the caller's own processes. Not offered to root (its user
  namespace maps the sandbox to root, which RLIMIT_NPROC exempts).
- "unsafe": no namespaces, only limits, an empty cwd and a minimal env. Refused unless asked for.

Always: own session/process group (killed with SIGKILL at the end; the PID namespace takes every
descendant with its init), an environment built from a small allowlist (no inherited secrets),
RLIMIT_CPU / AS / FSIZE / NPROC / NOFILE / CORE set in the child before exec, a wall-clock timeout
and an output cap (the run is killed once the cap is passed).
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from potstill.errors import PotstillError

NOBODY = 65534
SETUP_FAILED = 97  # the bootstrap's exit code when a mount fails
ENV_ALLOW = {"LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/work", "TMPDIR": "/work",
             "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8"}
# chdir into the work dir, then run the code read from stdin as __main__ (tracebacks say "<tool>")
PRELUDE = "import os,sys;os.chdir(sys.argv[1]);exec(compile(sys.stdin.read(),'<tool>','exec'))"

_BOOTSTRAP = r"""
R="$1"; W="$2"; shift 2
fail() { echo "sandbox setup failed: $*" >&2; exit 97; }
mount -t tmpfs -o size=8m,mode=755 none "$R" || fail tmpfs
for d in /lib /lib64 /usr/lib /usr/lib64 "$PY_PREFIX"; do
  if [ -e "$d" ]; then
    src=$(readlink -f "$d"); mkdir -p "$R$d" && mount --bind -o ro "$src" "$R$d" || fail "$d"
  fi
done
mkdir -p "$R/work" "$R/dev" || fail mkdir
mount -t tmpfs -o "size=$WORK_BYTES,nr_inodes=4096,mode=700,uid=65534,gid=65534" none "$R/work" || fail work
for n in null zero urandom; do touch "$R/dev/$n" && mount --bind "/dev/$n" "$R/dev/$n" || fail "/dev/$n"; done
mount -o remount,ro "$R" || fail remount
unset PY_PREFIX WORK_BYTES
chroot --userspec=65534:65534 --groups= "$R" "$@"
exit $?
"""


@dataclass(frozen=True)
class Limits:
    """Resource limits for one run."""

    cpu_seconds: int = 5
    memory_bytes: int = 512 * 2**20
    file_bytes: int = 16 * 2**20
    processes: int = 16
    open_files: int = 64
    wall_seconds: float = 10.0
    output_bytes: int = 8192
    work_bytes: int = 64 * 2**20  # the work dir is a tmpfs of this size (isolated runs): no disk filling


@dataclass
class RunResult:
    """What happened to one piece of code. `status`: ok | error | timeout | cpu_limit | killed |
    output_cap | setup_failed."""

    status: str
    exit_code: int | None
    output: str
    truncated: bool
    wall_seconds: float
    isolation: str
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def observation(self, max_chars: int = 2000) -> str:
        """The text a model sees as the tool's answer: output (cut), then what went wrong, if anything."""
        text = self.output if len(self.output) <= max_chars else self.output[:max_chars] + "\n...[cut]"
        tail = {
            "ok": "",
            "error": f"[exit code {self.exit_code}]",
            "timeout": "[killed: wall-clock timeout]",
            "cpu_limit": "[killed: CPU time limit]",
            "killed": f"[killed by signal {-(self.exit_code or 0)}]",
            "output_cap": "[killed: output limit]",
            "setup_failed": "[sandbox setup failed]",
        }[self.status]
        if self.truncated and self.status != "output_cap":
            tail = (tail + " [output truncated]").strip()
        return (text.rstrip("\n") + ("\n" + tail if tail else "")).strip() or "[no output]"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _runs(cmd: list[str]) -> bool:
    try:
        return subprocess.run(cmd, capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@lru_cache(maxsize=1)
def available_isolations() -> tuple[str, ...]:
    """The isolations whose probe (a real sandboxed run) works here, best first."""
    found = []
    probe = Sandbox.__new__(Sandbox)
    # bwrap started by root maps the sandbox's uid to root, which RLIMIT_NPROC exempts: a fork bomb
    # would be bounded only by time, so root uses unshare (which drops to a real uid 65534)
    kinds = ("unshare",) if os.getuid() == 0 else ("unshare", "bwrap")
    for kind in kinds:
        if shutil.which(kind):
            probe.isolation, probe.limits, probe.python = kind, Limits(wall_seconds=20), _base_python()
            try:
                if probe.run("print(6*7)").output.strip() == "42":
                    found.append(kind)
            except OSError:
                pass
    return tuple(found)


def detect_isolation() -> str:
    """'unshare' or 'bwrap' when a probe of the real sandbox works here, else 'none'."""
    found = available_isolations()
    return found[0] if found else "none"


def _base_python() -> str:
    """The real interpreter (not a venv's symlink), so its prefix is all the sandbox must expose."""
    exe = Path(sys.executable).resolve()
    return str(exe)


class Sandbox:
    """Runs code strings with `Limits`; `isolation` is checked at construction.

    `allow_unsafe=True` accepts running without namespaces (only limits, env and an empty cwd).
    """

    def __init__(self, limits: Limits | None = None, allow_unsafe: bool = False, isolation: str | None = None):
        self.limits = limits or Limits()
        self.python = _base_python()
        found = isolation or detect_isolation()
        if found == "none":
            if not allow_unsafe:
                raise PotstillError(
                    "no sandbox isolation here (need `unshare` with CAP_SYS_ADMIN or `bwrap`); "
                    "install bubblewrap or pass --unsafe-sandbox to run model code without namespaces")
            found = "unsafe"
        self.isolation = found

    @property
    def nproc_enforced(self) -> bool:
        """RLIMIT_NPROC binds only a non-root real uid (unshare drops to nobody; bwrap is not used by root)."""
        return self.isolation == "unshare" or os.getuid() != 0

    def describe(self) -> dict[str, Any]:
        return {"isolation": self.isolation, "limits": asdict(self.limits), "python": self.python,
                "nproc_enforced": self.nproc_enforced}

    # -- running ---------------------------------------------------------------------------------

    def run(self, code: str) -> RunResult:
        """Run `code` in a fresh empty directory; returns what happened (never raises for the code's sake)."""
        base = Path(tempfile.mkdtemp(prefix="potstill-sbx-"))
        work, root = base / "work", base / "root"
        work.mkdir()
        root.mkdir()
        try:
            if self.isolation == "unshare":  # bwrap's user namespace maps the caller to uid 65534
                os.chown(work, NOBODY, NOBODY)
            os.chmod(base, 0o755)
            cmd, cwd = self._command(work, root)
            env = {**ENV_ALLOW, "PY_PREFIX": str(Path(self.python).parents[1]), "WORK_BYTES": str(self.limits.work_bytes)}
            if self.isolation == "unsafe":
                env.update(HOME=str(work), TMPDIR=str(work))
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    cwd=cwd, env=env, start_new_session=True, preexec_fn=self._limit_child)
            return self._collect(proc, code, t0)
        finally:
            shutil.rmtree(base, ignore_errors=True)

    def _command(self, work: Path, root: Path) -> tuple[list[str], str]:
        py = [self.python, "-I", "-S", "-c", PRELUDE]
        if self.isolation == "unshare":
            return (["unshare", "--net", "--mount", "--pid", "--ipc", "--uts", "--fork", "--kill-child",
                     "--propagation", "private", "sh", "-c", _BOOTSTRAP, "sandbox", str(root), str(work),
                     *py, "/work"], "/")
        if self.isolation == "bwrap":
            prefix = str(Path(self.python).parents[1])
            binds = []
            for d in ("/lib", "/lib64", "/usr/lib", "/usr/lib64", prefix):
                binds += ["--ro-bind-try", str(Path(d).resolve()), d]
            return (["bwrap", "--unshare-all", "--die-with-parent", "--new-session", "--clearenv",
                     *sum((["--setenv", k, v] for k, v in ENV_ALLOW.items()), []),
                     "--uid", str(NOBODY), "--gid", str(NOBODY), *binds, "--bind", str(work), "/work",
                     "--dev", "/dev", "--chdir", "/work", *py, "/work"], "/")
        return py + [str(work)], str(work)

    def _limit_child(self) -> None:
        """In the child before exec: the limits (inherited by the bootstrap and by the code)."""
        lim = self.limits
        for res, value in ((resource.RLIMIT_CPU, lim.cpu_seconds), (resource.RLIMIT_AS, lim.memory_bytes),
                           (resource.RLIMIT_FSIZE, lim.file_bytes), (resource.RLIMIT_NPROC, lim.processes),
                           (resource.RLIMIT_NOFILE, lim.open_files), (resource.RLIMIT_CORE, 0)):
            # CPU: SIGXCPU at the soft limit, SIGKILL a second later (equal limits send SIGKILL first)
            resource.setrlimit(res, (value, value + 1 if res == resource.RLIMIT_CPU else value))

    def _collect(self, proc: subprocess.Popen, code: str, t0: float) -> RunResult:
        lim = self.limits
        chunks: list[bytes] = []
        size = 0
        over = threading.Event()

        def read() -> None:
            nonlocal size
            while True:
                block = proc.stdout.read1(65536) if hasattr(proc.stdout, "read1") else proc.stdout.read(65536)
                if not block:
                    return
                if size < lim.output_bytes:
                    chunks.append(block[: lim.output_bytes - size])
                size += len(block)
                if size > lim.output_bytes:
                    over.set()
                    _kill_group(proc)
                    return

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        try:
            proc.stdin.write(code.encode("utf-8", "replace"))
            proc.stdin.close()
        except (BrokenPipeError, OSError):
            pass
        timed_out = False
        try:
            proc.wait(timeout=lim.wall_seconds)
        except subprocess.TimeoutExpired:
            timed_out = True
        _kill_group(proc)  # whatever is left of the group (the PID namespace takes the rest)
        proc.wait()
        reader.join(timeout=2)
        wall = time.perf_counter() - t0
        output = b"".join(chunks).decode("utf-8", "replace")
        rc = proc.returncode
        sig = -rc if rc is not None and rc < 0 else None
        if sig is None and self.isolation != "unsafe" and rc is not None and rc > 128:
            sig = rc - 128  # the bootstrap shell reports a signalled child as 128 + signal
        if over.is_set():
            status = "output_cap"
        elif timed_out:
            status = "timeout"
        elif rc == 0:
            status = "ok"
        elif rc == SETUP_FAILED and self.isolation != "unsafe":
            status = "setup_failed"
        elif sig == signal.SIGXCPU:
            status = "cpu_limit"
        elif sig is not None:
            status = "killed"
        else:
            status = "error"
        if sig is not None:
            rc = -sig
        return RunResult(status, rc, output, size > lim.output_bytes, round(wall, 3), self.isolation)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
