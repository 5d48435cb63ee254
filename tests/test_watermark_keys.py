"""The watermark key: never in a repr, never weak, and a fingerprint only its holder can check."""

from __future__ import annotations

import hashlib
import os
import secrets
import subprocess
import sys

import pytest

from potstill.errors import PotstillError
from potstill.guard.keymat import check_fingerprint, estimated_bits, fingerprint
from potstill.guard.watermark import WatermarkConfig

STRONG = "wm-test-key-" + hashlib.sha256(b"test_watermark_keys").hexdigest()


def test_key_not_in_repr():
    cfg = WatermarkConfig(key=STRONG, vocab_size=100)
    assert STRONG not in repr(cfg) and STRONG not in str(cfg) and STRONG[-16:] not in repr(cfg)


@pytest.mark.parametrize("weak", ["k", "hunter2", "hunter2-but-longer", "potstill-bench-key", "a" * 64,
                                  "abcabcabcabcabcabcabcabc", "1234567890123456", "correcthorse"])
def test_weak_keys_are_refused(weak):
    with pytest.raises(PotstillError, match="too weak") as err:
        WatermarkConfig(key=weak)
    assert "\n" not in str(err.value) and (len(weak) < 4 or weak not in str(err.value))


def test_random_keys_pass():
    for _ in range(200):
        for key in (secrets.token_hex(16), secrets.token_urlsafe(16), secrets.token_bytes(16)):
            assert estimated_bits(key) >= 128, key
            if isinstance(key, str):
                WatermarkConfig(key=key)


def test_fingerprint_is_keyed_unlinkable_and_checkable():
    cfg = WatermarkConfig(key=STRONG)
    a, b = cfg.key_fingerprint(), WatermarkConfig(key=STRONG).key_fingerprint()
    assert a == cfg.key_fingerprint()  # stable within one run (results compare equal)
    assert a != b  # a fresh nonce per run: two reports cannot be linked without the key
    assert cfg.check_fingerprint(a) and cfg.check_fingerprint(b)
    assert not WatermarkConfig(key=STRONG[::-1]).check_fingerprint(a)
    assert hashlib.sha256(STRONG.encode()).hexdigest()[:8] not in a  # not the old unsalted hash
    version, nonce, mac = a.split(":")
    assert version == "v1" and len(mac) == 16  # 64 bits: collisions between keys are negligible
    assert not check_fingerprint(STRONG, "log", fingerprint(STRONG, "watermark"))  # domain-separated
    assert cfg.public_dict()["key_fingerprint"].startswith("v1:")


def test_cli_refuses_a_weak_key_in_one_line(tmp_path):
    (tmp_path / "t.txt").write_text("hello")
    env = {**os.environ, "POTSTILL_WATERMARK_KEY": "hunter2"}
    out = subprocess.run([sys.executable, "-m", "potstill.cli", "watermark", "detect", str(tmp_path / "t.txt")],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 2 and "too weak" in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert "hunter2" not in out.stderr
