"""The wire formats and base45: strict decoding on MicroPython and under CPython (the host shares the code)."""

from __future__ import annotations

import os
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from paytoken import base45, revocation, wire
from paytoken_host import protocol
from tests.protocol_rig import NOW, World

RFC9285 = [(b"AB", "BB8"), (b"Hello!!", "%69 VD92EX0"), (b"base-45", "UJCLQE7W581"), (b"ietf!", "QED8WEX0")]


def test_base45_rfc9285_examples_on_micropython(mp):
    for raw, text in RFC9285:
        assert mp.call("paytoken.base45.encode", raw) == text
        assert mp.call("paytoken.base45.decode", text) == raw


def test_base45_round_trips_on_micropython(mp):
    rng = random.Random(os.urandom(8))
    data = [os.urandom(rng.randrange(0, 80)) for _ in range(200)] + [b"", b"\x00", b"\xff\xff", b"\xff" * 51]
    texts = mp.map("paytoken.base45.encode", [(d,) for d in data])
    for d, (ok, text) in zip(data, texts, strict=True):
        assert ok and text == base45.encode(d) and len(text) == base45.encoded_length(len(d))
        assert set(text) <= set(base45.ALPHABET)
    back = mp.map("paytoken.base45.decode", [(t,) for _, t in texts])
    assert [b for _, b in back] == data


@pytest.mark.parametrize("text", ["A", "GGW", "ZZZZ", "abc", "AB~", ":::"])
def test_base45_rejects_bad_input(mp, text):
    ok, err = mp.map("paytoken.base45.decode", [(text,)])[0]
    assert not ok and err.startswith("ValueError: base45")


def samples() -> dict[str, bytes]:
    world = World()
    payer, payee = world.device(wire.ROLE_PAYER), world.device(wire.ROLE_PAYEE)
    payment = protocol.sign(payer.identity, wire.payment_body(os.urandom(16), payer.device_id, payee.device_id, 100,
                                                             840, 1, 0, bytes(32), os.urandom(8), os.urandom(32), NOW))
    receipt = protocol.sign(payee.identity, wire.receipt_body(protocol.payment_hash(payment), 0, 1, NOW))
    rl = protocol.revocation_delta(world.backend, 3, 7, NOW, [os.urandom(8), os.urandom(8)])
    qr = wire.qr_payload(payee.device_id[:4], bytes(6), True, payee.static[1], os.urandom(8), 500, 840)
    return {"decode_cert": payer.cert, "decode_cert ": payee.cert, "decode_payment": payment,
            "decode_receipt": receipt, "revocation.decode_delta": rl, "decode_qr": qr}


def test_every_format_decodes_alike_on_both_sides_and_rejects_damage(mp):
    for fn, raw in samples().items():
        module, _, fn = ("wire." + fn.strip()).rpartition(".") if "." not in fn else fn.rpartition(".")
        mod = revocation if module == "revocation" else wire
        name = f"paytoken.{module}.{fn}"
        host = getattr(mod, fn)(raw)
        device = mp.call(name, raw)
        assert device == [list(v) if isinstance(v, list) else v for v in host]
        bad = [raw[:-1], raw + b"\x00", raw[:1], b""]
        if fn != "decode_qr":
            bad += [bytes([raw[0] ^ 0x20]) + raw[1:], raw[:1] + bytes([raw[1] ^ 3]) + raw[2:]]  # type, version
        else:
            bad += [b"\x20" + raw[1:]]
        for args, (ok, err) in zip(bad, mp.map(name, [(b,) for b in bad]), strict=True):
            assert not ok and err.startswith("WireError"), (fn, args.hex(), err)
            with pytest.raises(wire.WireError):
                getattr(mod, fn)(args)


def test_revocation_delta_ids_must_ascend(mp):
    world = World()
    body = bytearray(revocation.delta_body(0, 2, NOW, [b"\x01" * 8, b"\x02" * 8]))
    body[16:32] = b"\x02" * 8 + b"\x01" * 8
    rl = protocol.sign(world.backend, bytes(body))
    ok, err = mp.map("paytoken.revocation.decode_delta", [(rl,)])[0]
    assert not ok and "ascending" in err


def _delta(from_version: int, to_version: int, ids: list[bytes]) -> bytes:
    # Encoded without revocation_body's checks, to see that the decoder makes them.
    return (struct.pack(">BBIIIH", wire.T_REVOCATION, 2, from_version, to_version, NOW, len(ids)) + b"".join(ids)
            + bytes(64))


def test_revocation_delta_decodes_strictly(mp):
    ids = [i.to_bytes(8, "big") for i in range(1, 300)]
    good = _delta(4, 6, ids[:2])
    assert revocation.decode_delta(good)[:4] == (4, 6, NOW, ids[0] + ids[1])
    assert revocation.delta_length(2) == len(good)
    bad = {"versions must ascend": [_delta(5, 5, ids[:1]), _delta(6, 5, ids[:1])],
           "bad count": [_delta(0, 5, []), _delta(4, 5, ids[:2]), _delta(0, 1000, ids[:256])],
           "ascending": [_delta(0, 5, [ids[0], ids[0]])]}
    for what, raws in bad.items():
        for raw, (ok, err) in zip(raws, mp.map("paytoken.revocation.decode_delta", [(r,) for r in raws]), strict=True):
            assert not ok and what in err, (raw[:16].hex(), err)
            with pytest.raises(wire.WireError, match=what):
                revocation.decode_delta(raw)
            if what != "ascending":  # and the backend cannot make one either (it sorts and dedups ids itself)
                frm, to, _, n = struct.unpack_from(">IIIH", raw, 2)
                with pytest.raises(wire.WireError, match=what):
                    revocation.delta_body(frm, to, NOW, [raw[16 + 8 * i:24 + 8 * i] for i in range(n)])
    assert revocation.decode_delta(_delta(0, 1000, ids[:255])).ids == b"".join(ids[:255])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_decoders_never_fail_otherwise(data):
    for fn in (wire.decode_cert, wire.decode_payment, wire.decode_receipt, revocation.decode_delta, wire.decode_qr,
               wire.decode_payee_hello, wire.decode_payer_hello, wire.decode_payer_final, wire.decode_receipt_msg):
        try:
            fn(data)
        except wire.WireError:
            pass
