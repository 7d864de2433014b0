"""P-256 ECDSA and ECDH of the firmware, on MicroPython: Wycheproof, differential and edge-case tests."""

from __future__ import annotations

import os
import random

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature

from paytoken_host.devtools import p256_tables
from tests import wycheproof
from tests.harness.mp import MicroPythonError, run_script

N = p256_tables.N
PUB = "paytoken.crypto.p256.public_key"
SIGN = "paytoken.crypto.p256.sign"
VERIFY = "paytoken.crypto.p256.verify"
ECDH = "paytoken.crypto.p256.ecdh"
SPKI_UNCOMPRESSED = bytes.fromhex("3059301306072a8648ce3d020106082a8648ce3d030107034200")
SPKI_COMPRESSED = bytes.fromhex("3039301306072a8648ce3d020106082a8648ce3d030107032200")
EDGE_SCALARS = [1, 2, 3, N - 1, N - 2, N - 3, 2**128, 2**255, N // 2, N // 2 + 1, 2**43 - 1, 2**215]


def key_bytes(d: int) -> bytes:
    return d.to_bytes(32, "big")


def sec1(pub: ec.EllipticCurvePublicKey, compressed: bool = False) -> bytes:
    fmt = serialization.PublicFormat.CompressedPoint if compressed else serialization.PublicFormat.UncompressedPoint
    return pub.public_bytes(serialization.Encoding.X962, fmt)


def compress(uncompressed: bytes) -> bytes:
    return bytes([2 | (uncompressed[64] & 1)]) + uncompressed[1:33]


def p1363(der: bytes) -> bytes:
    r, s = decode_dss_signature(der)
    return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def strict_der_signature(der: bytes) -> bytes | None:
    """r || s from a strictly DER-encoded ECDSA signature, or None if it is not strict DER of two
    non-negative integers that fit 32 bytes (such a signature never reaches the firmware's verify)."""

    def read_len(buf: bytes, i: int) -> tuple[int, int] | None:
        if i >= len(buf):
            return None
        first = buf[i]
        if first < 0x80:
            return first, i + 1
        if first != 0x81 or i + 1 >= len(buf) or buf[i + 1] < 0x80:
            return None  # DER: lengths under 128 use the short form; signatures never need two bytes
        return buf[i + 1], i + 2

    def read_int(buf: bytes, i: int) -> tuple[int, int] | None:
        if i >= len(buf) or buf[i] != 0x02:
            return None
        got = read_len(buf, i + 1)
        if got is None:
            return None
        n, j = got
        body = buf[j : j + n]
        if n == 0 or len(body) != n or body[0] & 0x80:
            return None
        if n > 1 and body[0] == 0 and not body[1] & 0x80:
            return None  # non-minimal
        value = int.from_bytes(body, "big")
        return (value, j + n) if value < 2**256 else None

    if len(der) < 2 or der[0] != 0x30:
        return None
    got = read_len(der, 1)
    if got is None or got[0] != len(der) - got[1]:
        return None
    r = read_int(der, got[1])
    if r is None:
        return None
    s = read_int(der, r[1])
    if s is None or s[1] != len(der):
        return None
    return r[0].to_bytes(32, "big") + s[0].to_bytes(32, "big")


@pytest.mark.parametrize("name", ["ecdsa_secp256r1_sha256_test", "ecdsa_secp256r1_sha256_p1363_test"])
def test_ecdsa_wycheproof(mp, name):
    todo = []
    for group, t in wycheproof.cases(name):
        pub = bytes.fromhex(group["publicKey"]["uncompressed"])
        raw = bytes.fromhex(t["sig"])
        sig = raw if "p1363" in name else strict_der_signature(raw)
        if sig is None:
            assert t["result"] != "valid", t["tcId"]
            wycheproof.skip(name, "not strict DER: rejected before the firmware")
            continue
        todo.append((t, (pub, bytes.fromhex(t["msg"]), sig)))
        if t["result"] == "valid":
            todo.append((t, (compress(pub), bytes.fromhex(t["msg"]), sig)))
    results = mp.map(VERIFY, [args for _, args in todo])
    counted = set()
    for (t, _), (ok, verdict) in zip(todo, results, strict=True):
        assert ok, verdict  # verify never raises
        if t["result"] == "valid":
            assert verdict is True, t["tcId"]
        elif t["result"] == "invalid":
            assert verdict is False, (t["tcId"], t["comment"])
        if t["tcId"] not in counted:
            counted.add(t["tcId"])
            wycheproof.record(name, t["result"])


def ecdh_cases(name: str):
    for _group, t in wycheproof.cases(name):
        d = int(t["private"], 16)
        public = bytes.fromhex(t["public"])
        if "ecpoint" not in name:
            if public.startswith(SPKI_UNCOMPRESSED) and len(public) == len(SPKI_UNCOMPRESSED) + 65:
                public = public[len(SPKI_UNCOMPRESSED) :]
            elif public.startswith(SPKI_COMPRESSED) and len(public) == len(SPKI_COMPRESSED) + 33:
                public = public[len(SPKI_COMPRESSED) :]
            else:
                assert t["result"] != "valid" or "UnnamedCurve" in t["flags"], t["tcId"]
                wycheproof.skip(name, "not a named-curve P-256 key: the firmware takes raw SEC1 points")
                continue
        if not 0 < d < N:
            assert t["result"] != "valid", t["tcId"]
            wycheproof.skip(name, "private key out of range")
            continue
        yield t, (key_bytes(d), public)


@pytest.mark.parametrize("name", ["ecdh_secp256r1_test", "ecdh_secp256r1_ecpoint_test"])
def test_ecdh_wycheproof(mp, name):
    todo = list(ecdh_cases(name))
    results = mp.map(ECDH, [args for _, args in todo])
    for (t, _), (ok, shared) in zip(todo, results, strict=True):
        if t["result"] == "invalid":
            assert not ok and shared.startswith("ValueError"), (t["tcId"], t["comment"], shared)
        elif t["result"] == "acceptable" and not ok:
            assert shared.startswith("ValueError"), (t["tcId"], shared)  # a lenient-DER case: refusing is fine
        else:
            assert ok and shared == bytes.fromhex(t["shared"]), (t["tcId"], t["comment"], shared)
        wycheproof.record(name, t["result"])


def test_sign_and_public_key_match_cryptography(mp):
    """Deterministic ECDSA (RFC 6979) byte for byte, 200+ fresh keys and messages plus edge keys."""
    rng = random.Random(os.urandom(8))
    cases = []
    for i in range(220):
        d = EDGE_SCALARS[i] if i < len(EDGE_SCALARS) else rng.randrange(1, N)
        msg = [b"", b"\x00", os.urandom(4096)][i % 3] if i < 30 else os.urandom(rng.randrange(0, 200))
        cases.append((d, msg))
    pubs = mp.map(PUB, [(key_bytes(d),) for d, _ in cases])
    sigs = mp.map(SIGN, [(key_bytes(d), m) for d, m in cases])
    for (d, msg), (ok_pub, pub), (ok_sig, sig) in zip(cases, pubs, sigs, strict=True):
        key = ec.derive_private_key(d, ec.SECP256R1())
        assert ok_pub and pub == sec1(key.public_key()), hex(d)
        ref = key.sign(msg, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
        assert ok_sig and sig == p1363(ref), hex(d)
        r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
        key.public_key().verify(encode_dss_signature(r, s), msg, ec.ECDSA(hashes.SHA256()))


def test_verify_matches_cryptography(mp):
    """Signatures made by cryptography (random k) verify on the firmware; altered ones do not."""
    rng = random.Random(os.urandom(8))
    cases, expect = [], []
    for i in range(220):
        key = ec.derive_private_key(EDGE_SCALARS[i] if i < len(EDGE_SCALARS) else rng.randrange(1, N), ec.SECP256R1())
        msg = os.urandom(rng.randrange(0, 300))
        sig = p1363(key.sign(msg, ec.ECDSA(hashes.SHA256())))
        pub = sec1(key.public_key(), compressed=i % 2 == 1)
        cases.append((pub, msg, sig))
        expect.append(True)
        bad = bytearray(sig)
        bad[rng.randrange(64)] ^= 1 << rng.randrange(8)
        variants = [(pub, msg, bytes(bad)), (pub, msg + b"!", sig)]
        other = sec1(ec.generate_private_key(ec.SECP256R1()).public_key())
        variants.append((other, msg, sig))
        cases += variants
        expect += [False] * len(variants)
    for args, want, (ok, got) in zip(cases, expect, mp.map(VERIFY, cases), strict=True):
        assert ok and got is want, args


def test_ecdh_matches_cryptography(mp):
    rng = random.Random(os.urandom(8))
    cases, keys = [], []
    for i in range(220):
        d = EDGE_SCALARS[i] if i < len(EDGE_SCALARS) else rng.randrange(1, N)
        mine = ec.derive_private_key(d, ec.SECP256R1())
        peer = ec.generate_private_key(ec.SECP256R1())
        cases.append((key_bytes(d), sec1(peer.public_key(), compressed=i % 3 == 0)))
        keys.append((mine, peer))
    for (mine, peer), (ok, shared) in zip(keys, mp.map(ECDH, cases), strict=True):
        assert ok and shared == mine.exchange(ec.ECDH(), peer.public_key())


def test_bad_inputs_are_refused_cleanly(mp):
    key = ec.generate_private_key(ec.SECP256R1())
    pub = sec1(key.public_key())
    msg = b"payment"
    sig = p1363(key.sign(msg, ec.ECDSA(hashes.SHA256())))
    n32 = N.to_bytes(32, "big")
    zero = bytes(32)
    not_on_curve = pub[:64] + bytes([pub[64] ^ 1])
    bad_verify = [
        (pub, msg, sig[:63]),
        (pub, msg, sig + b"\x00"),
        (pub, msg, b""),
        (pub[:64], msg, sig),
        (b"\x00", msg, sig),  # point at infinity
        (b"", msg, sig),
        (not_on_curve, msg, sig),
        (b"\x05" + pub[1:], msg, sig),
        (pub, msg, zero + sig[32:]),
        (pub, msg, sig[:32] + zero),
        (pub, msg, n32 + sig[32:]),
        (pub, msg, sig[:32] + n32),
        (pub, msg, b"\xff" * 64),
    ]
    for args, (ok, got) in zip(bad_verify, mp.map(VERIFY, bad_verify), strict=True):
        assert ok and got is False, args
    for priv in (zero, n32, b"\xff" * 32, b"\x01" * 31, b"\x01" * 33):
        for fn, args in ((PUB, (priv,)), (SIGN, (priv, msg)), (ECDH, (priv, pub))):
            with pytest.raises(MicroPythonError) as exc:
                mp.call(fn, *args)
            assert exc.value.kind == "ValueError"
    for point in (not_on_curve, b"\x00", pub[:33], b"\x04" + b"\xff" * 64):
        with pytest.raises(MicroPythonError) as exc:
            mp.call(ECDH, key_bytes(5), point)
        assert exc.value.kind == "ValueError"


def test_tables_are_generated_from_the_curve():
    """The committed fixed-base tables equal a fresh generation from the curve parameters."""
    assert p256_tables.OUT.read_text() == p256_tables.render()


def test_runs_inside_32k_heap():
    key = ec.generate_private_key(ec.SECP256R1())
    d = key_bytes(key.private_numbers().private_value)
    peer = ec.generate_private_key(ec.SECP256R1())
    msg = os.urandom(100)
    script = f"""
from paytoken.crypto import p256
d = bytes.fromhex('{d.hex()}')
pub = p256.public_key(d)
sig = p256.sign(d, bytes.fromhex('{msg.hex()}'))
print(pub.hex(), sig.hex(), p256.verify(pub, bytes.fromhex('{msg.hex()}'), sig),
      p256.ecdh(d, bytes.fromhex('{sec1(peer.public_key()).hex()}')).hex())
"""
    proc = run_script(script, heapsize="32K")
    assert proc.returncode == 0, proc.stderr + proc.stdout
    pub, sig, verified, shared = proc.stdout.split()
    assert bytes.fromhex(pub) == sec1(key.public_key())
    ref = key.sign(msg, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))
    assert bytes.fromhex(sig) == p1363(ref)
    assert verified == "True"
    assert bytes.fromhex(shared) == key.exchange(ec.ECDH(), peer.public_key())


def test_firmware_signature_rejected_by_cryptography_when_altered(mp):
    key = ec.generate_private_key(ec.SECP256R1())
    d = key_bytes(key.private_numbers().private_value)
    sig = mp.call(SIGN, d, b"amount=10000")
    r, s = int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")
    with pytest.raises(InvalidSignature):
        key.public_key().verify(encode_dss_signature(r, s), b"amount=10001", ec.ECDSA(hashes.SHA256()))
