"""X25519 (RFC 7748) of the firmware, on MicroPython: Wycheproof, RFC vectors, differential tests."""

from __future__ import annotations

import os
import random

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from tests import wycheproof
from tests.harness.mp import MicroPythonError, run_script

SHARED = "paytoken.crypto.x25519.shared"
PUBLIC = "paytoken.crypto.x25519.public_key"
P = 2**255 - 19

# Points of order 1, 2, 4 and 8 (u < 2^255, canonical or not): any clamped scalar maps them to 0.
LOW_ORDER_U = [
    0,
    1,
    325606250916557431795983626356110631294008115727848805560023387167927233504,
    39382357235489614581723060781553021112529911719440698176882885853963445705823,
    P - 1,
    P,
    P + 1,
]


def le(n: int) -> bytes:
    return n.to_bytes(32, "little")


def ref_shared(priv: bytes, pub: bytes) -> bytes | None:
    """cryptography's answer, or None where it refuses an all-zero secret."""
    try:
        return X25519PrivateKey.from_private_bytes(priv).exchange(X25519PublicKey.from_public_bytes(pub))
    except ValueError:
        return None


def ref_public(priv: bytes) -> bytes:
    return X25519PrivateKey.from_private_bytes(priv).public_key().public_bytes_raw()


def assert_value_error(outcome: tuple[bool, object], what: object) -> None:
    ok, value = outcome
    assert not ok and str(value).startswith("ValueError:"), (what, value)


def test_wycheproof(mp):
    name = "x25519_test"
    todo = [(t, (bytes.fromhex(t["private"]), bytes.fromhex(t["public"]))) for _, t in wycheproof.cases(name)]
    results = mp.map(SHARED, [args for _, args in todo])
    for (t, _), outcome in zip(todo, results, strict=True):
        ok, value = outcome
        expected = bytes.fromhex(t["shared"])
        if t["result"] == "invalid":
            assert not (ok and value == expected), t["tcId"]
        elif expected == bytes(32):
            assert "ZeroSharedSecret" in t["flags"], t["tcId"]
            assert_value_error(outcome, t["tcId"])
        else:
            assert ok and value == expected, (t["tcId"], t["comment"], value)
        wycheproof.record(name, t["result"])


def test_rfc7748_section5_vectors(mp):
    vectors = [
        (
            "a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4",
            "e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c",
            "c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552",
        ),
        (
            # The u-coordinate has its top bit set: it must be masked, not rejected.
            "4b66e9d4d1b4673c5ad22691957d6af5c11b6421e0ea01d42ca4169e7918ba0d",
            "e5210f12786811d3f4b7959d0538ae2c31dbe7106fc03c3efc4cd549c715a493",
            "95cbde9476e8907d7aade45cb4b873f88b595a68799fa152e6f8f7647aac7957",
        ),
    ]
    for k, u, out in vectors:
        assert mp.call(SHARED, bytes.fromhex(k), bytes.fromhex(u)) == bytes.fromhex(out)


def test_rfc7748_iterated(mp):
    # The 1,000,000-iteration result (7c3911e0...) would take about 40 minutes here; not run.
    mp.exec(
        "from paytoken.crypto import x25519\n"
        "def x25519_iterate(n):\n"
        "    k = u = b'\\x09' + bytes(31)\n"
        "    for _ in range(n):\n"
        "        k, u = x25519.shared(k, u), k\n"
        "    return k\n"
    )
    assert mp.eval("x25519_iterate(1)") == bytes.fromhex(
        "422c8e7a6227d7bca1350b3e2bb7279f7897b87bb6854b783c60e80311ae3079"
    )
    assert mp.eval("x25519_iterate(1000)") == bytes.fromhex(
        "684cf59ba83309552800ef566f2f4d3c1c3887c49360e3875f2eb94d99532c51"
    )


def test_rfc7748_diffie_hellman(mp):
    alice = bytes.fromhex("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a")
    alice_pub = bytes.fromhex("8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a")
    bob = bytes.fromhex("5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb")
    bob_pub = bytes.fromhex("de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f")
    secret = bytes.fromhex("4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742")
    assert mp.call(PUBLIC, alice) == alice_pub
    assert mp.call(PUBLIC, bob) == bob_pub
    assert mp.call(SHARED, alice, bob_pub) == secret
    assert mp.call(SHARED, bob, alice_pub) == secret


def boundary_scalars() -> list[bytes]:
    # All-zero and all-one bytes clamp to 2^254 and 2^255 - 8: the smallest and largest scalars.
    return [bytes(32), b"\xff" * 32, b"\x01" + bytes(31), bytes(31) + b"\x80", b"\x07" * 32]


def boundary_us(rng: random.Random) -> list[int]:
    us = list(range(10)) + [P - 2, P - 1, P, P + 1, P + 18, 2**255 - 1, 2**255, 2**256 - 1]
    us += [rng.getrandbits(255) | 2**255 for _ in range(4)]  # top bit set: ignored
    us += [P + rng.randrange(0, 19) for _ in range(2)]  # non-canonical: taken mod p
    return us


def test_shared_differential(mp):
    rng = random.Random(os.urandom(8))
    cases = [(k, le(u)) for k in boundary_scalars() for u in boundary_us(rng)[:10]]
    cases += [(os.urandom(32), le(u)) for u in boundary_us(rng)]
    while len(cases) < 260:
        cases.append((os.urandom(32), ref_public(os.urandom(32)) if rng.random() < 0.5 else os.urandom(32)))
    for (priv, pub), outcome in zip(cases, mp.map(SHARED, cases), strict=True):
        expected = ref_shared(priv, pub)
        if expected is None:
            assert_value_error(outcome, (priv.hex(), pub.hex()))
        else:
            assert outcome == (True, expected), (priv.hex(), pub.hex())


def test_public_key_differential(mp):
    cases = [(k,) for k in boundary_scalars()]
    cases += [(os.urandom(32),) for _ in range(220)]
    for (priv,), outcome in zip(cases, mp.map(PUBLIC, cases), strict=True):
        assert outcome == (True, ref_public(priv)), priv.hex()


def test_key_agreement_between_firmware_and_host(mp):
    a, b = os.urandom(32), os.urandom(32)
    a_pub = mp.call(PUBLIC, a)
    b_pub = ref_public(b)
    assert mp.call(SHARED, a, b_pub) == ref_shared(b, a_pub) == ref_shared(a, b_pub)


def test_buffer_types(mp):
    setup = [
        "from paytoken.crypto import x25519",
        "x25519_k = bytes(range(32))",
        "x25519_u = b'\\x09' + bytes(31)",
    ]
    mp.exec("\n".join(setup))
    expected = ref_shared(bytes(range(32)), le(9))
    for expr in (
        "x25519.shared(bytearray(x25519_k), memoryview(x25519_u))",
        "x25519.shared(memoryview(x25519_k), bytearray(x25519_u))",
        "x25519.shared(memoryview(b'..' + x25519_k)[2:], x25519_u)",
    ):
        assert mp.eval(expr) == expected, expr
    assert mp.eval("x25519.public_key(bytearray(x25519_k))") == ref_public(bytes(range(32)))
    assert mp.eval("x25519.public_key(memoryview(x25519_k))") == ref_public(bytes(range(32)))


def test_wrong_lengths(mp):
    good = os.urandom(32)
    bad = [b"", b"\x09", os.urandom(31), os.urandom(33), os.urandom(64)]
    outcomes = mp.map(SHARED, [(k, good) for k in bad] + [(good, u) for u in bad])
    for outcome in outcomes:
        assert_value_error(outcome, outcome)
    for outcome in mp.map(PUBLIC, [(k,) for k in bad]):
        assert_value_error(outcome, outcome)


def test_low_order_points(mp):
    us = LOW_ORDER_U + [u | 2**255 for u in LOW_ORDER_U if u < 2**255]
    cases = [(k, le(u)) for u in us for k in [os.urandom(32), *boundary_scalars()[:2]]]
    for (priv, pub), outcome in zip(cases, mp.map(SHARED, cases), strict=True):
        assert ref_shared(priv, pub) is None, pub.hex()  # the list itself is right
        assert_value_error(outcome, pub.hex())
    try:
        mp.call(SHARED, os.urandom(32), le(0))
    except MicroPythonError as exc:
        assert exc.kind == "ValueError"
    else:
        raise AssertionError("all-zero shared secret returned")


def test_shared_in_32k_heap(firmware_build):
    priv, pub = os.urandom(32), ref_public(os.urandom(32))
    source = (
        "from binascii import hexlify, unhexlify\n"
        "from paytoken.crypto import x25519\n"
        f"print(hexlify(x25519.shared(unhexlify('{priv.hex()}'), unhexlify('{pub.hex()}'))).decode())\n"
    )
    proc = run_script(source, heapsize="32K")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ref_shared(priv, pub).hex()
