"""HMAC-SHA256 and HKDF-SHA256 of the firmware, on MicroPython: Wycheproof and differential tests."""

from __future__ import annotations

import os
import random

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tests import wycheproof
from tests.harness.mp import MicroPythonError

HMAC = "paytoken.crypto.kdf.hmac_sha256"
HKDF_FN = "paytoken.crypto.kdf.hkdf_sha256"


def ref_hmac(key: bytes, msg: bytes) -> bytes:
    h = hmac.HMAC(key, hashes.SHA256())
    h.update(msg)
    return h.finalize()


def ref_hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt or None, info).derive(ikm)


def test_hmac_wycheproof(mp):
    name = "hmac_sha256_test"
    todo = []
    for group, t in wycheproof.cases(name):
        todo.append((group, t, (bytes.fromhex(t["key"]), bytes.fromhex(t["msg"]))))
    results = mp.map(HMAC, [args for _, _, args in todo])
    for (group, t, _), (ok, mac) in zip(todo, results, strict=True):
        assert ok, mac
        tag = bytes.fromhex(t["tag"])
        # Truncated-tag groups compare the prefix, as a verifier with that tag size would.
        matches = mac[: group["tagSize"] // 8] == tag
        assert matches == (t["result"] == "valid"), t["tcId"]
        wycheproof.record(name, t["result"])


def test_hkdf_wycheproof(mp):
    name = "hkdf_sha256_test"
    for _group, t in wycheproof.cases(name):
        args = (bytes.fromhex(t["salt"]), bytes.fromhex(t["ikm"]), bytes.fromhex(t["info"]), t["size"])
        if t["result"] == "valid":
            assert mp.call(HKDF_FN, *args) == bytes.fromhex(t["okm"]), t["tcId"]
        else:
            try:
                mp.call(HKDF_FN, *args)
            except MicroPythonError as exc:
                assert exc.kind == "ValueError", t["tcId"]
            else:
                raise AssertionError(f"tcId {t['tcId']}: invalid size accepted")
        wycheproof.record(name, t["result"])


def test_hmac_differential(mp):
    rng = random.Random(os.urandom(8))
    cases = []
    for i in range(250):
        klen = [0, 1, 32, 63, 64, 65, 200][i % 7] if i < 14 else rng.randrange(0, 150)
        mlen = [0, 1, 55, 56, 64, 1000][i % 6] if i < 12 else rng.randrange(0, 300)
        cases.append((os.urandom(klen), os.urandom(mlen)))
    for (key, msg), (ok, mac) in zip(cases, mp.map(HMAC, cases), strict=True):
        assert ok and mac == ref_hmac(key, msg), (key.hex(), msg.hex())


def test_hkdf_differential(mp):
    rng = random.Random(os.urandom(8))
    cases = []
    for i in range(220):
        length = [1, 31, 32, 33, 255 * 32][i % 5] if i < 10 else rng.randrange(1, 200)
        salt = os.urandom(rng.choice([0, 16, 32, 64, 100]))
        cases.append((salt, os.urandom(rng.randrange(0, 80)), os.urandom(rng.randrange(0, 40)), length))
    for args, (ok, okm) in zip(cases, mp.map(HKDF_FN, cases), strict=True):
        assert ok and okm == ref_hkdf(*args)
