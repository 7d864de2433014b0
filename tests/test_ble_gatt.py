"""paytoken.ble.gatt: the service UUIDs, the advertising payload and the link control frames.

The module has no `bluetooth` import, so the same file runs under CPython (host tools) and on MicroPython;
both must produce the exact bytes of docs/protocol.md section 9. The advertising data is checked with an
AD-structure parser written here from the Core Specification (Vol 3, Part C, section 11), not the module's.
"""

from __future__ import annotations

import hashlib
import importlib
import sys
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

sys.path.append(str(Path(__file__).resolve().parents[1] / "firmware" / "lib"))
gatt = importlib.import_module("paytoken.ble.gatt")
fr = importlib.import_module("paytoken.framing")

NONCE = bytes.fromhex("0123456789abcdef")


def ad_structures(data: bytes) -> list[tuple[int, bytes]]:
    """(AD type, value) of each AD structure; a zero length ends the data (the rest is padding)."""
    out = []
    i = 0
    while i < len(data) and data[i]:
        n = data[i]
        assert i + 1 + n <= len(data), "AD structure runs past the end"
        out.append((data[i + 1], data[i + 2 : i + 1 + n]))
        i += 1 + n
    return out


def test_uuids_are_distinct_128_bit_and_little_endian_on_air():
    uuids = [gatt.SERVICE_UUID, gatt.WRITE_UUID, gatt.NOTIFY_UUID]
    assert len({uuid.UUID(u) for u in uuids}) == 3
    for u in uuids:
        assert gatt.uuid_le(u) == uuid.UUID(u).bytes[::-1]
    assert gatt.SERVICE_UUID_LE == uuid.UUID(gatt.SERVICE_UUID).bytes[::-1]
    with pytest.raises(ValueError):
        gatt.uuid_le("1234")


def test_adv_payload_exact_bytes():
    adv = gatt.adv_payload(NONCE)
    tag = hashlib.sha256(b"paytoken/adv" + NONCE).digest()[:5]
    assert gatt.nonce_tag(NONCE) == tag
    expected = (
        bytes([2, 0x01, 0x06])
        + bytes([17, 0x07])
        + uuid.UUID(gatt.SERVICE_UUID).bytes[::-1]
        + bytes([9, 0xFF, 0xFF, 0xFF, 0x01])
        + tag
    )
    assert adv == expected
    assert len(adv) == 31  # the legacy advertising limit, exactly
    assert ad_structures(adv) == [
        (0x01, b"\x06"),
        (0x07, uuid.UUID(gatt.SERVICE_UUID).bytes[::-1]),
        (0xFF, b"\xff\xff\x01" + tag),
    ]


def test_scan_response_name():
    assert gatt.scan_response("paytoken-1234") == bytes([14, 0x09]) + b"paytoken-1234"
    long = "x" * 40
    resp = gatt.scan_response(long)
    assert len(resp) == 31 and ad_structures(resp) == [(0x08, b"x" * 29)]  # shortened name


def test_match_and_parse():
    adv = gatt.adv_payload(NONCE)
    assert gatt.adv_matches(adv, gatt.nonce_tag(NONCE))
    assert gatt.adv_matches(memoryview(adv), gatt.nonce_tag(NONCE))
    assert not gatt.adv_matches(adv, gatt.nonce_tag(bytes(8)))
    assert gatt.parse_adv(adv) == (True, gatt.nonce_tag(NONCE), None)
    assert gatt.parse_adv(gatt.scan_response("till 3")) == (False, None, "till 3")
    # The tag alone is not enough: the service must be announced too.
    without_service = adv[:3] + adv[21:]
    assert not gatt.adv_matches(without_service, gatt.nonce_tag(NONCE))
    # The service in an incomplete list, among others, and the fields in another order still match.
    other = bytes(range(16))
    reordered = adv[21:] + bytes([33, 0x06]) + other + gatt.SERVICE_UUID_LE
    assert gatt.adv_matches(reordered, gatt.nonce_tag(NONCE))
    # Manufacturer data of another company or format is not ours.
    for pos, value in ((23, 0x59), (25, 0x02)):
        changed = bytearray(adv)
        changed[pos] = value
        assert not gatt.adv_matches(bytes(changed), gatt.nonce_tag(NONCE))


def test_nonce_length_checked():
    with pytest.raises(ValueError):
        gatt.nonce_tag(b"short")


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=40))
def test_malformed_adv_never_raises(data):
    # Whatever a scan hands us: a bool, never an exception (an IRQ handler calls this).
    assert gatt.adv_matches(data, gatt.nonce_tag(NONCE)) in (True, False)
    has, tag, name = gatt.parse_adv(data)  # a name that is not UTF-8 is None
    assert has in (True, False) and (tag is None or len(tag) == 5) and (name is None or isinstance(name, str))


def test_control_frames():
    assert gatt.OPEN_FRAME == b"\x40\x01" and gatt.READY_FRAME == b"\x40\x02" and gatt.BUSY_FRAME == b"\x40\x03"
    assert [gatt.control_code(f) for f in (gatt.OPEN_FRAME, gatt.READY_FRAME, gatt.BUSY_FRAME)] == [1, 2, 3]
    assert gatt.control_code(b"\x40\x01\x00") == 0 and gatt.control_code(b"\xc0\x01") == 0
    assert gatt.control_code(b"\x40") == 0 and gatt.control_code(b"") == -1
    # No data frame has the control bit: every frame of every message is told apart.
    for n in (1, 17, 18, 300):
        for f in fr.split(bytes(n), 20, 5):
            assert gatt.control_code(f) == -1
    # And the Reassembler rejects control frames (bad_header) if one ever reached it.
    r = fr.Reassembler()
    with pytest.raises(fr.FrameError) as e:
        r.feed(gatt.READY_FRAME)
    assert e.value.reason == fr.BAD_HEADER


MP_GATT = """
from paytoken.ble import gatt as _g
def _gatt_all(nonce, name):
    adv = _g.adv_payload(nonce)
    tag = _g.nonce_tag(nonce)
    return [adv, _g.scan_response(name), tag, _g.adv_matches(adv, tag), _g.adv_matches(adv, _g.nonce_tag(bytes(8))),
            list(_g.parse_adv(adv)), list(_g.parse_adv(_g.scan_response(name))), _g.SERVICE_UUID_LE,
            [_g.control_code(f) for f in (_g.OPEN_FRAME, _g.READY_FRAME, _g.BUSY_FRAME, b"\\x00\\x00", b"\\x40")]]
"""


def test_same_bytes_on_micropython(mp):
    mp.exec(MP_GATT)
    got = mp.eval(f"_gatt_all({NONCE!r}, 'paytoken-1234')")
    want = [
        gatt.adv_payload(NONCE),
        gatt.scan_response("paytoken-1234"),
        gatt.nonce_tag(NONCE),
        True,
        False,
        [True, gatt.nonce_tag(NONCE), None],
        [False, None, "paytoken-1234"],
        gatt.SERVICE_UUID_LE,
        [1, 2, 3, -1, 0],
    ]
    assert got == want


def test_matching_allocates_nothing_on_micropython(mp):
    # adv_matches runs in the scan-result IRQ: no heap allocation (the memoryview is only valid there).
    mp.exec(
        "import gc\n"
        "_adv = memoryview(_g.adv_payload(b'01234567'))\n_tag = _g.nonce_tag(b'01234567')\n"
        "def _gatt_alloc():\n"
        "    _g.adv_matches(_adv, _tag)\n"
        "    gc.collect(); gc.disable(); a = gc.mem_alloc()\n"
        "    r = _g.adv_matches(_adv, _tag)\n"
        "    b = gc.mem_alloc(); gc.enable()\n"
        "    return [r, b - a]\n"
    )
    assert mp.eval("_gatt_alloc()") == [True, 0]


def test_random_adv_same_verdict_on_micropython(mp):
    # Random and mutated advertising data: MicroPython gives CPython's answer and never raises.
    import random

    rng = random.Random(6)
    tag = gatt.nonce_tag(NONCE)
    base = gatt.adv_payload(NONCE)
    samples = [bytes(rng.randrange(256) for _ in range(rng.randrange(40))) for _ in range(150)]
    for _ in range(150):
        b = bytearray(base)
        b[rng.randrange(31)] = rng.randrange(256)
        samples.append(bytes(b))
        samples.append(bytes(b[: rng.randrange(20, 31)]))
    # A change anywhere but in the flags structure (type and value, offsets 1-2) loses the match; a cut too.
    for b in samples[150::2]:
        same = all(x == y for i, (x, y) in enumerate(zip(b, base, strict=True)) if i not in (1, 2))
        assert gatt.adv_matches(b, tag) == same
    assert not any(gatt.adv_matches(b, tag) for b in samples[151::2])
    mp.exec(MP_GATT + "def _gatt_verdict(adv, tag):\n    return [_g.adv_matches(adv, tag), list(_g.parse_adv(adv))]\n")
    got = mp.eval(f"[_gatt_verdict(a, {tag!r}) for a in {samples!r}]")
    want = [[gatt.adv_matches(s, tag), list(gatt.parse_adv(s))] for s in samples]
    assert got == want
    assert any(m for m, _p in want)
