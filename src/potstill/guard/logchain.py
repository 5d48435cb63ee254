"""Tamper evidence for the query log: a keyed hash chain over the rows and signed checkpoints.

Every row gets a sequence number `seq` (1, 2, 3, ... over the whole log, all writers together)
and `mac = HMAC-SHA256(log key, "potstill-log-v1" | seq | mac of row seq-1 | the row's fields)`.
Whoever can write the database but does not hold the log key cannot edit, delete, insert or
reorder rows without breaking the chain, and `verify` names the first row that breaks it.
Every `checkpoint_every` rows or `checkpoint_seconds` (and at close) the writer also stores a
checkpoint: `(seq, head mac, ts)` signed with the key. A checkpoint catches rows deleted from
the end of the log (which a chain alone cannot see), as long as the checkpoint survives; each one
is also written to the server's log (logger `potstill.guard.querylog`) so a copy lives outside
the database. The writers' head row (unsigned) catches a careless cut too. Rows written after the
last surviving checkpoint can be cut off unseen by someone who also rewinds the head; so can the
whole log, emptied with its checkpoints: keep the checkpoint lines of the server log elsewhere.
Legacy rows (from before the chain, seq NULL) are allowed only before the first chained row.

The log key: `$POTSTILL_LOG_KEY` (>= 128 bits, e.g. 64 hex digits), else the file named by
`$POTSTILL_LOG_KEY_FILE`, else `$POTSTILL_HOME/guard/log.key` (created on first use, mode 0600).
Keep it off the database host where you can: it protects the log against whoever can write the
database but cannot read the key. It never appears in a repr or a log line.

    report = verify("queries.db", load_log_key(create=False))
    print(report.summary()); sys.exit(0 if report.ok else 1)
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select

from potstill.errors import PotstillError
from potstill.guard.keymat import Secret, check_key_strength, read_secret

GENESIS = "0" * 64
LOG_KEY_ENV = "POTSTILL_LOG_KEY"
LOG_KEY_FILE_ENV = "POTSTILL_LOG_KEY_FILE"


def load_log_key(key: str | bytes | None = None, key_file: str | os.PathLike | None = None,
                 create: bool = True) -> Secret:
    """The log key: `key`, `key_file`, $POTSTILL_LOG_KEY, $POTSTILL_LOG_KEY_FILE, or the home key file."""
    from potstill.utils import potstill_home

    if key is None:
        key = read_secret(LOG_KEY_ENV, LOG_KEY_FILE_ENV, key_file)
    if key is None:
        path = potstill_home() / "guard" / "log.key"
        if not path.exists():
            if not create:
                raise PotstillError(f"no log key: set ${LOG_KEY_ENV} or ${LOG_KEY_FILE_ENV}", where=str(path))
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as fh:
                fh.write(secrets.token_hex(32) + "\n")
        key = Path(path).read_text().strip()
    check_key_strength(key, "the query-log key")
    return Secret(key if isinstance(key, bytes) else key.encode("utf-8"))


def _canon(value: Any) -> Any:
    return bool(value) if isinstance(value, bool) else value


ADDED_FIELDS = ("client",)
"""Columns added after the chain's format was fixed: covered as [name, value] after the others when set, so
rows written before they existed (NULL there) keep their MACs."""


def row_mac(key: Secret, seq: int, prev: str, row: dict[str, Any], fields: list[str]) -> str:
    """The chain MAC of one row (its `fields` as stored, after the previous row's MAC)."""
    values = [_canon(row.get(f)) for f in fields if f not in ADDED_FIELDS]
    values += [[f, _canon(row.get(f))] for f in fields if f in ADDED_FIELDS and row.get(f) is not None]
    body = json.dumps([seq, prev] + values, ensure_ascii=True, separators=(",", ":"))
    return hmac.new(key.reveal(), b"potstill-log-v1|" + body.encode("ascii"), hashlib.sha256).hexdigest()


def checkpoint_mac(key: Secret, seq: int, head: str, ts: float) -> str:
    body = json.dumps([seq, head, ts], separators=(",", ":"))
    return hmac.new(key.reveal(), b"potstill-checkpoint-v1|" + body.encode("ascii"), hashlib.sha256).hexdigest()


@dataclass
class VerifyReport:
    """The outcome of `verify`: ok, counts, and the first problem found (None when ok)."""

    ok: bool
    rows: int
    chained_rows: int
    legacy_rows: int
    """Rows written before the log was chained (an older potstill): reported, not verifiable."""
    checkpoints: int
    last_seq: int
    problem: str | None = None
    kind: str | None = None
    """edited | deleted | inserted | reordered | checkpoint"""
    row_id: int | None = None

    def summary(self) -> str:
        if self.ok:
            extra = f"; {self.legacy_rows} legacy rows before the chain (unverifiable)" if self.legacy_rows else ""
            return (f"log OK: {self.chained_rows} chained rows (seq 1..{self.last_seq}), "
                    f"{self.checkpoints} checkpoints verified{extra}")
        return f"log TAMPERED: {self.problem}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def verify(url: str | Path, key: Secret) -> VerifyReport:
    """Walk the rows in id order and the checkpoints; report the first edit, deletion, insertion or reorder."""
    from potstill.guard.querylog import CHAINED, checkpoints, ensure_schema, log_head, make_engine, queries

    engine = make_engine(url)
    try:
        ensure_schema(engine)
        with engine.connect() as conn:
            seqs = {s for (s,) in conn.execute(select(queries.c.seq)) if s is not None}
            head = conn.execute(select(log_head.c.seq).where(log_head.c.id == 1)).scalar()
            cps = list(conn.execute(select(checkpoints).order_by(checkpoints.c.id)))
            rows = conn.execution_options(stream_results=True).execute(select(queries).order_by(queries.c.id))
            report = _walk(key, rows, seqs, cps, CHAINED)
    finally:
        engine.dispose()
    if report.ok and head is not None and int(head) > report.last_seq:
        report.ok, report.kind = False, "deleted"
        report.problem = (f"rows were deleted from the end: the writers' head is at seq {head}, "
                          f"the log ends at seq {report.last_seq}")
    return report


def _walk(key: Secret, rows, seqs: set[int], cps: list, fields: list[str]) -> VerifyReport:
    want = {c.seq: c for c in cps}
    state = {"rows": 0, "chained": 0, "legacy": 0, "last": 0}

    def bad(kind: str, row_id: int | None, msg: str) -> VerifyReport:
        return VerifyReport(False, state["rows"], state["chained"], state["legacy"], len(cps), state["last"],
                            msg, kind, row_id)

    expected, prev, seen = 1, GENESIS, set()
    for r in rows:
        state["rows"] += 1
        m = r._mapping
        if m["seq"] is None:
            if expected == 1:
                state["legacy"] += 1
                continue
            return bad("inserted", r.id, f"row id {r.id} was inserted: it has no place in the chain (no seq)")
        seq = int(m["seq"])
        if seq != expected:
            if seq in seen:
                return bad("inserted", r.id, f"row id {r.id} was inserted: a second copy of seq {seq}")
            if seq < expected or expected in seqs:
                return bad("reordered", r.id, f"row id {r.id} was reordered: it holds seq {seq} where seq "
                           f"{expected} belongs")
            gap_end = seq - 1
            return bad("deleted", r.id, f"rows were deleted before row id {r.id}: seq {expected}"
                       + (f"..{gap_end}" if gap_end > expected else "") + " missing")
        if not hmac.compare_digest(row_mac(key, seq, prev, dict(m), fields), m["mac"] or ""):
            return bad("edited", r.id, f"row id {r.id} (seq {seq}) was edited or forged: its MAC does not match")
        if seq in want and not hmac.compare_digest(want[seq].head, m["mac"]):
            return bad("checkpoint", r.id, f"row id {r.id} (seq {seq}) differs from checkpoint id {want[seq].id}")
        seen.add(seq)
        prev, expected = m["mac"], expected + 1
        state["chained"] += 1
        state["last"] = seq
    for c in cps:
        if not hmac.compare_digest(checkpoint_mac(key, c.seq, c.head, c.ts), c.mac or ""):
            return bad("checkpoint", None, f"checkpoint id {c.id} was edited or forged")
        if c.seq > state["last"]:
            return bad("deleted", None, f"rows were deleted from the end: checkpoint id {c.id} vouches for seq "
                       f"{c.seq}, the log ends at seq {state['last']}")
    return VerifyReport(True, state["rows"], state["chained"], state["legacy"], len(cps), state["last"])
