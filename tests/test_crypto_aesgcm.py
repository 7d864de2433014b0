"""AES-GCM of the firmware on MicroPython: Wycheproof, differential vs `cryptography`, tampering, RAM."""

from __future__ import annotations

import os
import random

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests import wycheproof
from tests.harness.mp import run_script

ENC = "paytoken.crypto.aesgcm.encrypt"
DEC = "paytoken.crypto.aesgcm.decrypt"

PT_LENGTHS = [0, 1, 15, 16, 17, 255, 256, 257, 1024]


def mp_bytes(b: bytes) -> str:
    """A MicroPython expression for b."""
    return f"bytes.fromhex('{b.hex()}')"


def rejected(outcome: tuple[bool, object]) -> bool:
    ok, res = outcome
    return not ok and str(res).startswith("ValueError")


def test_aesgcm_wycheproof(mp):
    name = "aes_gcm_test"
    todo = []
    refused = []  # cases the firmware must refuse by design: 192-bit keys, IVs other than 96 bits
    for group, t in wycheproof.cases(name):
        key, iv, aad = bytes.fromhex(t["key"]), bytes.fromhex(t["iv"]), bytes.fromhex(t["aad"])
        msg, ct, tag = bytes.fromhex(t["msg"]), bytes.fromhex(t["ct"]), bytes.fromhex(t["tag"])
        if group["tagSize"] != 128:
            wycheproof.skip(name, "tag not 128 bits: the firmware uses 128-bit tags only")
        elif group["keySize"] not in (128, 256):
            refused.append((key, iv, ct + tag, aad))
            wycheproof.skip(name, "192-bit key: refused by design, ValueError checked")
        elif group["ivSize"] != 96:
            refused.append((key, iv, ct + tag, aad))
            wycheproof.skip(name, "IV not 96 bits: refused by design, ValueError checked")
        else:
            assert t["result"] in ("valid", "invalid"), t["tcId"]
            todo.append((t, key, iv, aad, msg, ct + tag))
    assert len(todo) > 100

    decs = mp.map(DEC, [(key, iv, data, aad) for _, key, iv, aad, _, data in todo])
    valid = [c for c in todo if c[0]["result"] == "valid"]
    encs = iter(mp.map(ENC, [(key, iv, msg, aad) for _, key, iv, aad, msg, _ in valid]))
    for (t, *_, msg, data), dec in zip(todo, decs, strict=True):
        if t["result"] == "valid":
            assert dec == (True, msg), t["tcId"]
            assert next(encs) == (True, data), t["tcId"]
        else:
            assert rejected(dec), (t["tcId"], t["comment"], dec)
        wycheproof.record(name, t["result"])

    for args, outcome in zip(refused, mp.map(DEC, refused), strict=True):
        assert rejected(outcome), (len(args[0]), len(args[1]), outcome)


def random_cases(rng: random.Random) -> list[tuple[bytes, bytes, bytes, bytes]]:
    """(key, nonce, plaintext, aad): every boundary length with both key sizes, then random ones."""
    cases = []
    for klen in (16, 32):
        for plen in PT_LENGTHS:
            for alen in (0, 32, rng.randrange(1, 100)):
                cases.append((os.urandom(klen), os.urandom(12), os.urandom(plen), os.urandom(alen)))
        # A large AAD, alone and with a message.
        cases.append((os.urandom(klen), os.urandom(12), b"", os.urandom(8192)))
        cases.append((os.urandom(klen), os.urandom(12), os.urandom(100), os.urandom(8192 + 5)))
    while len(cases) < 240:
        plen = rng.choice([rng.randrange(0, 70), rng.randrange(0, 600)])
        alen = rng.choice([0, rng.randrange(0, 70)])
        cases.append((os.urandom(rng.choice([16, 32])), os.urandom(12), os.urandom(plen), os.urandom(alen)))
    return cases


def test_aesgcm_firmware_encrypts_cryptography_decrypts(mp):
    cases = random_cases(random.Random(os.urandom(8)))
    for (key, nonce, pt, aad), (ok, sealed) in zip(cases, mp.map(ENC, cases), strict=True):
        assert ok, sealed
        assert sealed == AESGCM(key).encrypt(nonce, pt, aad), (len(key), len(pt), len(aad))
        assert AESGCM(key).decrypt(nonce, sealed, aad) == pt


def test_aesgcm_cryptography_encrypts_firmware_decrypts(mp):
    cases = random_cases(random.Random(os.urandom(8)))
    args = [(key, nonce, AESGCM(key).encrypt(nonce, pt, aad), aad) for key, nonce, pt, aad in cases]
    for (key, _, pt, aad), outcome in zip(cases, mp.map(DEC, args), strict=True):
        assert outcome == (True, pt), (len(key), len(pt), len(aad))


def test_aesgcm_cached_object_many_messages(mp):
    # One AESGCM object (cached key schedule and GHASH powers) for many messages, as the Noise
    # session uses it; every message must still match a fresh computation.
    for klen in (16, 32):
        key = os.urandom(klen)
        mp.exec(f"from paytoken.crypto.aesgcm import AESGCM\n_gcm = AESGCM({mp_bytes(key)})")
        for plen in PT_LENGTHS + [3, 64, 100]:
            nonce, pt, aad = os.urandom(12), os.urandom(plen), os.urandom(plen % 40)
            sealed = mp.eval(f"_gcm.encrypt({mp_bytes(nonce)}, {mp_bytes(pt)}, {mp_bytes(aad)})")
            assert sealed == AESGCM(key).encrypt(nonce, pt, aad), (klen, plen)
            opened = mp.eval(f"_gcm.decrypt({mp_bytes(nonce)}, {mp_bytes(sealed)}, {mp_bytes(aad)})")
            assert opened == pt, (klen, plen)


def test_aesgcm_tampering_is_rejected(mp):
    key, nonce, pt, aad = os.urandom(32), os.urandom(12), os.urandom(37), os.urandom(20)
    sealed = AESGCM(key).encrypt(nonce, pt, aad)
    assert mp.call(DEC, key, nonce, sealed, aad) == pt

    tampered = []
    for bit in range(8 * len(sealed)):  # every single bit of ciphertext and tag
        flipped = bytearray(sealed)
        flipped[bit // 8] ^= 1 << (bit % 8)
        tampered.append((key, nonce, bytes(flipped), aad))
    for bit in range(8 * len(aad)):
        flipped = bytearray(aad)
        flipped[bit // 8] ^= 1 << (bit % 8)
        tampered.append((key, nonce, sealed, bytes(flipped)))
    for bad_aad in (b"", aad[:-1], aad + b"\0", b"\0" + aad[1:]):
        tampered.append((key, nonce, sealed, bad_aad))
    for bit in range(96):
        flipped = bytearray(nonce)
        flipped[bit // 8] ^= 1 << (bit % 8)
        tampered.append((key, bytes(flipped), sealed, aad))
    tampered.append((os.urandom(32), nonce, sealed, aad))  # another key
    tampered.append((key[:16], nonce, sealed, aad))  # the same key's first half, as AES-128
    tampered.append((key, nonce, sealed[:-1], aad))  # truncated tag
    tampered.append((key, nonce, sealed[1:], aad))
    tampered.append((key, nonce, sealed + b"\0", aad))
    for short in (b"", sealed[:1], sealed[-15:]):  # shorter than a tag
        tampered.append((key, nonce, short, aad))
    for args, outcome in zip(tampered, mp.map(DEC, tampered), strict=True):
        assert rejected(outcome), (args, outcome)


def test_aesgcm_tag_of_empty_message_is_checked(mp):
    key, nonce = os.urandom(16), os.urandom(12)
    tag = AESGCM(key).encrypt(nonce, b"", b"")
    assert mp.call(DEC, key, nonce, tag, b"") == b""
    outcomes = mp.map(DEC, [(key, nonce, bytes(16), b""), (key, nonce, tag, b"\0")])
    assert all(rejected(o) for o in outcomes), outcomes


def test_aesgcm_bad_key_and_nonce_lengths(mp):
    good_key, nonce, pt = os.urandom(16), os.urandom(12), b"payload"
    sealed = AESGCM(good_key).encrypt(nonce, pt, b"")
    enc_args, dec_args = [], []
    for klen in (0, 1, 8, 15, 17, 24, 31, 33, 48, 64):  # 24: AES-192 is not offered
        enc_args.append((os.urandom(klen), nonce, pt, b""))
        dec_args.append((os.urandom(klen), nonce, sealed, b""))
    for nlen in (0, 1, 8, 11, 13, 16, 32):
        enc_args.append((good_key, os.urandom(nlen), pt, b""))
        dec_args.append((good_key, os.urandom(nlen), sealed, b""))
    for args, outcome in zip(enc_args, mp.map(ENC, enc_args), strict=True):
        assert rejected(outcome), (len(args[0]), len(args[1]), outcome)
    for args, outcome in zip(dec_args, mp.map(DEC, dec_args), strict=True):
        assert rejected(outcome), (len(args[0]), len(args[1]), outcome)
    ctor = mp.map("paytoken.crypto.aesgcm.AESGCM", [(os.urandom(n),) for n in (0, 15, 24, 33)])
    assert all(rejected(o) for o in ctor), ctor


def test_aesgcm_runs_in_32k_heap():
    key, nonce, aad = os.urandom(32), os.urandom(12), os.urandom(32)
    msgs = [os.urandom(256), os.urandom(1024)]
    script = f"""
from paytoken.crypto import aesgcm
k = {mp_bytes(key)}
n = {mp_bytes(nonce)}
a = {mp_bytes(aad)}
g = aesgcm.AESGCM(k)
for m in ({mp_bytes(msgs[0])}, {mp_bytes(msgs[1])}):
    c = aesgcm.encrypt(k, n, m, a)
    print(c.hex())
    print(aesgcm.decrypt(k, n, c, a) == m, g.encrypt(n, m, a) == c, g.decrypt(n, c, a) == m)
"""
    proc = run_script(script, heapsize="32K")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split()
    assert len(lines) == 8, proc.stdout
    for i, msg in enumerate(msgs):
        expected = AESGCM(key).encrypt(nonce, msg, aad)
        assert bytes.fromhex(lines[4 * i]) == expected
        assert lines[4 * i + 1 : 4 * i + 4] == ["True", "True", "True"]
