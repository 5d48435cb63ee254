"""Key material for the guard: strength checks, keyed fingerprints, and secrets that never print.

Two secrets live here: the watermark key (guard/watermark.py) and the query-log key that chains
and signs the log rows (guard/logchain.py). Both must carry at least 128 bits of entropy. We
cannot measure a string's entropy; `estimated_bits` gives an upper bound from its length and the
smallest usual alphabet (digits, hex, alphanumerics, base64, printable) holding it, and refuses
keys with few distinct characters, so short or repetitive strings ("hunter2", "k" * 40) are
refused while `secrets.token_hex(16)`, `token_urlsafe(16)` or `token_bytes(16)` pass. Being an
upper bound, it lets a long dictionary passphrase through: use random keys, e.g.
`python -c "import secrets; print(secrets.token_hex(32))"`.

Fingerprints. Any value computed from the key alone lets whoever holds a guessed key confirm the
guess offline; no fingerprint can prevent that, only key strength can (hence the 128-bit floor).
What a fingerprint can do is give nothing else away: ours is `v1:<nonce>:<HMAC-SHA256(key,
"potstill-fingerprint/<purpose>/" + nonce) truncated to 64 bits>` with a fresh random nonce each
time, so it is domain-separated (never equal to a hash of the key used elsewhere), not
precomputable across deployments, and two reports made with the same key cannot be linked by
anyone without the key; the key holder checks one with `check_fingerprint`.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import secrets
import string

from potstill.errors import PotstillError

MIN_KEY_BITS = 128
MIN_DISTINCT_CHARS = 10
_ALPHABETS = [  # smallest first: a key is charged log2(size) bits per character of the first that holds it
    (set("0123456789"), 10),
    (set("0123456789abcdef"), 16),
    (set("0123456789ABCDEF"), 16),
    (set(string.ascii_lowercase + string.digits), 36),
    (set(string.ascii_uppercase + string.digits), 36),
    (set(string.ascii_letters + string.digits), 62),
    (set(string.ascii_letters + string.digits + "-_"), 64),
    (set(string.ascii_letters + string.digits + "+/="), 65),
    (set(string.printable), 100),
]


def estimated_bits(key: str | bytes) -> float:
    """An upper bound on a key's entropy: length x log2(the smallest usual alphabet holding it).

    Keys with fewer than MIN_DISTINCT_CHARS distinct characters (bytes) count as 0 bits.
    """
    if len(set(key)) < MIN_DISTINCT_CHARS:
        return 0.0
    if isinstance(key, bytes):
        try:
            key = key.decode("ascii")
        except UnicodeDecodeError:  # raw random bytes
            return 8.0 * len(key)
    chars = set(key)
    size = next((n for alphabet, n in _ALPHABETS if chars <= alphabet), 256)
    return len(key) * math.log2(size)


def check_key_strength(key: str | bytes, what: str) -> None:
    """Raise PotstillError (one line) unless `key` plausibly holds >= MIN_KEY_BITS bits."""
    bits = estimated_bits(key)
    if bits < MIN_KEY_BITS:
        raise PotstillError(
            f"{what} is too weak (at most ~{bits:.0f} bits; need >= {MIN_KEY_BITS}): use a random key, e.g. "
            "`python -c \"import secrets; print(secrets.token_hex(32))\"`"
        )


def _as_bytes(key: str | bytes) -> bytes:
    return key if isinstance(key, bytes) else key.encode("utf-8", "surrogatepass")


def fingerprint(key: str | bytes, purpose: str, nonce: str | None = None) -> str:
    """`v1:<nonce>:<64-bit HMAC>`: checkable only with the key; a fresh nonce by default."""
    nonce = nonce if nonce is not None else secrets.token_hex(4)
    mac = hmac.new(_as_bytes(key), f"potstill-fingerprint/{purpose}/{nonce}".encode(), hashlib.sha256)
    return f"v1:{nonce}:{mac.hexdigest()[:16]}"


def derive_key(key: str | bytes, purpose: str) -> str:
    """A sub-key for `purpose`: hex HMAC-SHA256(key, "potstill-derive/<purpose>") (256 bits; one-way)."""
    return hmac.new(_as_bytes(key), f"potstill-derive/{purpose}".encode(), hashlib.sha256).hexdigest()


def check_fingerprint(key: str | bytes, purpose: str, fp: str) -> bool:
    """Whether `fp` (from `fingerprint`) was made with this key and purpose (constant-time compare)."""
    parts = fp.split(":") if isinstance(fp, str) else []
    if len(parts) != 3 or parts[0] != "v1":
        return False
    return hmac.compare_digest(fingerprint(key, purpose, parts[1]), fp)


class Secret:
    """Bytes that never appear in a repr, str or log line."""

    __slots__ = ("_value",)

    def __init__(self, value: bytes):
        self._value = value

    def reveal(self) -> bytes:
        return self._value

    def __repr__(self) -> str:
        return "Secret(***)"

    __str__ = __repr__


def read_secret(env: str, file_env: str | None = None, file: str | os.PathLike | None = None) -> str | None:
    """A secret from `file`, else $env, else the file named by $file_env; None when none is set."""
    path = file or (os.environ.get(file_env) if file_env else None)
    if env in os.environ and not file:
        return os.environ[env].strip() or None
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                return fh.read().strip() or None
        except OSError as e:
            raise PotstillError(f"cannot read key file: {e.strerror}", where=str(path)) from None
    return None
