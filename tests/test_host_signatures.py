"""The host's and backend's signature check (raw r || s, as devices sign): its DER conversion against
cryptography's, and the whole check against Wycheproof's P-256 vectors in that layout."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

from paytoken_host import protocol
from paytoken_host.backend import verify
from tests import wycheproof

N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
EDGE = [0, 1, 0x7F, 0x80, 0xFF, 0x100, 2**248 - 1, 2**248, 2**255 - 1, 2**255, N - 1, N, 2**256 - 1]


def test_der_signature_is_cryptographys_encoding():
    values = EDGE + [int.from_bytes(os.urandom(32), "big") >> (8 * (i % 4)) for i in range(400)]
    for i, r in enumerate(values):
        s = values[(i * 7 + 3) % len(values)]
        sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        assert protocol.der_signature(sig) == encode_dss_signature(r, s), (hex(r), hex(s))


@pytest.mark.parametrize("check", [protocol.signed_by, verify.signed_by], ids=["protocol", "backend"])
def test_signed_by_agrees_with_wycheproof_p1363(check):
    name = "ecdsa_secp256r1_sha256_p1363_test"
    seen = {"valid": 0, "invalid": 0}
    for group, t in wycheproof.cases(name):
        pub = bytes.fromhex(group["publicKey"]["uncompressed"])
        raw = bytes.fromhex(t["msg"]) + bytes.fromhex(t["sig"])
        verdict = check(pub, raw)  # never raises
        if not t["msg"]:  # a record always has a body before its signature: one without is refused
            assert verdict is False, t["tcId"]
            continue
        if len(t["sig"]) != 128:  # not 64 bytes: the record's layout cuts it elsewhere, so it cannot verify
            assert t["result"] != "valid" and verdict is False, t["tcId"]
            continue
        if t["result"] in seen:
            assert verdict is (t["result"] == "valid"), (t["tcId"], t["comment"])
            seen[t["result"]] += 1
    assert seen["valid"] > 100 and seen["invalid"] > 50, seen
