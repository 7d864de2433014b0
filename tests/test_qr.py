"""The firmware's QR encoder (paytoken.qr) on MicroPython: its symbols are decoded by zxing-cpp, compared module for
module with the qrcode package, their masks checked against the penalty rules, and the payee's payload is encoded
inside a 32K heap."""

from __future__ import annotations

import os
import random
from itertools import groupby

import qrcode
import zxingcpp
from PIL import Image, ImageOps
from qrcode.util import MODE_8BIT_BYTE, MODE_ALPHA_NUM, MODE_NUMBER, QRData

from paytoken import base45, wire
from tests.harness.mp import run_script

DUMP = "paytoken.qr.dump"  # (data, ecc, version, mask) -> (version, mask, modules packed 8 to a byte, 1 = dark)
PENALTY = "paytoken.qr.penalty"
ALNUM = "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ $%*+-./:"
UNICODE = "aé€ü中 x\u00a0Ωz"  # byte mode through UTF-8, 1 to 3 bytes a character
MODES = ("numeric", "alphanumeric", "byte")
QRCODE_MODE = {"numeric": MODE_NUMBER, "alphanumeric": MODE_ALPHA_NUM, "byte": MODE_8BIT_BYTE}
QRCODE_EC = {
    "L": qrcode.constants.ERROR_CORRECT_L,
    "M": qrcode.constants.ERROR_CORRECT_M,
    "Q": qrcode.constants.ERROR_CORRECT_Q,
    "H": qrcode.constants.ERROR_CORRECT_H,
}

# ISO/IEC 18004 Table 7, versions 1-10: characters per level L, M, Q, H as (numeric, alphanumeric, byte).
CAPACITY = {
    1: ((41, 25, 17), (34, 20, 14), (27, 16, 11), (17, 10, 7)),
    2: ((77, 47, 32), (63, 38, 26), (48, 29, 20), (34, 20, 14)),
    3: ((127, 77, 53), (101, 61, 42), (77, 47, 32), (58, 35, 24)),
    4: ((187, 114, 78), (149, 90, 62), (111, 67, 46), (82, 50, 34)),
    5: ((255, 154, 106), (202, 122, 84), (144, 87, 60), (106, 64, 44)),
    6: ((322, 195, 134), (255, 154, 106), (178, 108, 74), (139, 84, 58)),
    7: ((370, 224, 154), (293, 178, 122), (207, 125, 86), (154, 93, 64)),
    8: ((461, 279, 192), (365, 221, 152), (259, 157, 108), (202, 122, 84)),
    9: ((552, 335, 230), (432, 262, 180), (312, 189, 130), (235, 143, 98)),
    10: ((652, 395, 271), (513, 311, 213), (364, 221, 151), (288, 174, 119)),
}


def capacity(version: int, ecc: str, mode: str) -> int:
    return CAPACITY[version]["LMQH".index(ecc)][MODES.index(mode)]


def smallest_version(n: int, ecc: str, mode: str) -> int:
    return next(v for v in range(1, 11) if capacity(v, ecc, mode) >= n)


def seeded() -> tuple[random.Random, int]:
    seed = int.from_bytes(os.urandom(4), "big")
    return random.Random(seed), seed


def payload(rng: random.Random, mode: str, n: int) -> bytes:
    """n characters (bytes) of data that the encoder must put in `mode`."""
    if mode == "numeric":
        return bytes(rng.choice(b"0123456789") for _ in range(n))
    if mode == "alphanumeric":
        return bytes(rng.choice(ALNUM.encode()) for _ in range(n))
    data = bytearray(rng.randbytes(n))
    data[rng.randrange(n)] = rng.choice(b"abcxyz\x00\xff")  # at least one byte outside the alphanumeric set
    return bytes(data)


def dumps(mp, argsets: list[tuple]) -> list[tuple[bool, object]]:
    """paytoken.qr.dump for each argument list; modules unpacked to one byte each (1 = dark)."""
    return [(ok, (res[0], res[1], unpack(res[0], res[2])) if ok else res) for ok, res in mp.map(DUMP, argsets)]


def dump(mp, *args: object) -> tuple[int, int, bytes]:
    version, mask, packed = mp.call(DUMP, *args)
    return version, mask, unpack(version, packed)


def unpack(version: int, packed: bytes) -> bytes:
    n = (version * 4 + 17) ** 2
    assert len(packed) == (n + 7) // 8
    return bytes(packed[i >> 3] >> (7 - (i & 7)) & 1 for i in range(n))


def mode_of(data: bytes) -> str:
    if data.isdigit():
        return "numeric"
    return "alphanumeric" if all(chr(c) in ALNUM for c in data) else "byte"


def rows(version: int, modules: bytes) -> list[list[int]]:
    s = version * 4 + 17
    assert len(modules) == s * s and set(modules) <= {0, 1}
    return [list(modules[y * s : (y + 1) * s]) for y in range(s)]


def read(version: int, modules: bytes) -> zxingcpp.Barcode:
    """Render with a 4-module quiet zone at 3 px a module and decode with zxing-cpp; exactly one QR code."""
    s = version * 4 + 17
    img = Image.frombytes("L", (s, s), bytes(0 if m else 255 for m in modules))
    img = ImageOps.expand(img, border=4, fill=255)
    img = img.resize((img.width * 3, img.height * 3), Image.NEAREST)
    found = zxingcpp.read_barcodes(img, formats=zxingcpp.BarcodeFormat.QRCode)
    assert len(found) == 1, "zxing-cpp did not decode the symbol"
    return found[0]


def assert_decodes(data: bytes, ecc: str, version: int, mask: int, modules: bytes, why: object) -> None:
    got = read(version, modules)
    assert got.bytes == data, why
    # The decoder read our format and version information, and needed no error correction at all
    # (UEC = share of the EC capacity left unused): every data and EC codeword is right.
    assert got.extra["Version"] == str(version) and got.extra["ECLevel"] == ecc, why
    assert got.extra["DataMask"] == mask, why
    assert got.extra["UEC"] == 1.0, why


def qrcode_modules(data: bytes, mode: str, ecc: str, version: int | None, mask: int) -> tuple[int, list[list[int]]]:
    q = qrcode.QRCode(version=version, error_correction=QRCODE_EC[ecc], mask_pattern=mask, border=0)
    q.add_data(QRData(data, mode=QRCODE_MODE[mode]))
    q.make(fit=version is None)
    return q.version, [[int(bool(m)) for m in row] for row in q.modules]


def test_capacity_boundaries_and_full_symbols(mp):
    # Every version, level and mode filled to exactly its capacity fits that version (also when the version is
    # chosen automatically) and decodes; one character more does not fit it.
    rng, seed = seeded()
    cases, over = [], []
    for v in range(1, 11):
        for ecc in "LMQH":
            for mode in MODES:
                data = payload(rng, mode, capacity(v, ecc, mode))
                cases += [(data, ecc, v, None), (data, ecc, None, None)]
                over.append((data + data[:1], ecc, v, None))
    for (data, ecc, v, _), (ok, res) in zip(cases, dumps(mp, cases), strict=True):
        why = (seed, len(data), ecc, v)
        assert ok, (why, res)
        version, mask, modules = res
        assert version == v or (v is None and version == smallest_version(len(data), ecc, mode_of(data))), why
        assert_decodes(data, ecc, version, mask, modules, why)
    for (data, ecc, v, _), (ok, res) in zip(over, dumps(mp, over), strict=True):
        assert not ok and res.startswith("ValueError: qr:"), (seed, len(data), ecc, v, res)


def test_random_payloads_decode(mp):
    # Random data of every mode (and base45 text, and UTF-8 str) at random lengths, levels and versions up to
    # 10, the version forced or chosen: zxing-cpp reads back the same bytes, version, level and mask.
    rng, seed = seeded()
    cases = []
    for i in range(320):
        kind = ("numeric", "alphanumeric", "byte", "base45", "utf8")[i % 5]
        ecc = "LMQH"[i // 5 % 4]
        v = rng.randint(1, 10)
        mode = {"base45": "alphanumeric", "utf8": "byte"}.get(kind, kind)
        room = capacity(v, ecc, mode)
        n = rng.randint(1, room) if rng.random() < 0.7 else rng.randint(1, min(room, 20))
        if kind == "base45":
            data = base45.encode(rng.randbytes(max(1, n * 2 // 3))).encode()
        elif kind == "utf8":
            text = ""
            while len((text + "€").encode()) <= n:
                text += rng.choice(UNICODE)
            data = (text or "é").encode()
        else:
            data = payload(rng, mode, n)
        # str travels as str (the encoder encodes it as UTF-8), bytes as bytes
        arg = data.decode() if kind in ("base45", "utf8") or (mode != "byte" and i % 2) else data
        forced = v if rng.random() < 0.5 else None
        cases.append((arg, ecc, forced, None))
    for (arg, ecc, forced, _), (ok, res) in zip(cases, dumps(mp, cases), strict=True):
        data = arg.encode() if isinstance(arg, str) else arg
        why = (seed, data, ecc, forced)
        assert ok, (why, res)
        version, mask, modules = res
        assert version == (forced or smallest_version(len(data), ecc, mode_of(data))), why
        assert_decodes(data, ecc, version, mask, modules, why)


def test_same_modules_as_qrcode(mp):
    # Same data, mode, level, version and (forced) mask: the matrix equals the qrcode package's, module for
    # module; with the version left open both pick the same one.
    rng, seed = seeded()
    cases = []
    for i in range(240):
        mode = MODES[i % 3]
        ecc = "LMQH"[i // 3 % 4]
        v = rng.randint(1, 10)
        data = payload(rng, mode, rng.randint(1, capacity(v, ecc, mode)))
        cases.append((data, ecc, v if i % 4 else None, i % 8))
    for (data, ecc, forced, mask), (ok, res) in zip(cases, dumps(mp, cases), strict=True):
        why = (seed, data, ecc, forced, mask)
        assert ok, (why, res)
        version, got_mask, modules = res
        ref_version, ref = qrcode_modules(data, mode_of(data), ecc, forced, mask)
        assert (version, got_mask) == (ref_version, mask), why
        assert rows(version, modules) == ref, why


# ---- mask choice ----
#
# The qrcode package picks masks by rules that differ from ISO/IEC 18004:2015 7.8.3 (as of qrcode 8.2):
# it scores each candidate with the format and version information left blank (its "test" mode), not the symbol it
# then draws; and its finder-like rule (N3) only looks for the 11-module windows 10111010000 / 00001011101 inside
# the symbol, so it ignores the light quiet zone, counts 2:1:3:1:1 runs such as 1 1011101 0000, and misses
# scaled 2:2:6:2:2 patterns. Its choice differs from the standard's in roughly 6 of 10 random symbols, so instead
# of comparing with it: our penalty is checked against hand-counted matrices, its rules N1, N2 and N4 against
# qrcode's own functions for them (which agree with the standard), N3 against an independent run-length
# implementation here, and the mask the firmware picks must be the lowest-scoring of the eight.
#
# N3 as read here (as Nayuki's reference QR library does): five runs dark-light-dark-light-dark of exactly u, u, 3u,
# u, u modules, with a light run of at least 4u on one side (and at least u on the other), 40 per such side;
# outside the symbol is light.


def finder_penalty(lines: list[list[int]], size: int) -> int:
    total = 0
    for line in lines:
        runs = [[colour, len(list(group))] for colour, group in groupby(line)]
        if runs[0][0]:
            runs.insert(0, [0, 0])
        if runs[-1][0]:
            runs.append([0, 0])
        runs[0][1] += size  # the quiet zone
        runs[-1][1] += size
        lengths = [n for _, n in runs]
        for i in range(1, len(lengths) - 5, 2):  # dark runs sit at odd indexes
            u = lengths[i]
            if lengths[i : i + 5] == [u, u, 3 * u, u, u]:
                before, after = lengths[i - 1], lengths[i + 5]
                total += 40 * ((before >= 4 * u and after >= u) + (after >= 4 * u and before >= u))
    return total


def reference_penalty(matrix: list[list[int]]) -> int:
    size = len(matrix)
    modules = [[bool(m) for m in row] for row in matrix]
    columns = [list(col) for col in zip(*matrix, strict=True)]
    return (
        qrcode.util._lost_point_level1(modules, size)
        + qrcode.util._lost_point_level2(modules, size)
        + finder_penalty(matrix + columns, size)
        + qrcode.util._lost_point_level4(modules, size)
    )


def repeat_row(row: str) -> tuple[bytes, int]:
    """A square matrix whose rows are all `row`: every column is one run, easy to count by hand."""
    return bytes(int(c) for c in row) * len(row), len(row)


# (matrix, size): penalty, counted by hand as N1 + N2 + N3 + N4
HAND_COUNTED = {
    # 10 lines of 5 light: 10 * 3; 16 2x2 blocks * 3; 0% dark is 45-50% off: 9 * 10
    "all light 5x5": ((bytes(25), 5), 30 + 48 + 0 + 90),
    "checkerboard 5x5": ((bytes((x + y + 1) % 2 for y in range(5) for x in range(5)), 5), 0),
    # rows 1011101: quiet zone on both sides, 2 * 40 a row; 7 one-colour columns of 7: 7 * (3 + 2);
    # blocks at columns 2-3 and 3-4: 2 * 6 * 3; 35/49 dark = 71%: 4 * 10
    "finder rows, quiet zone both sides": (repeat_row("1011101"), 560 + 35 + 36 + 40),
    # rows 10111010100: the pattern has the quiet zone before it and one light module after: 40 a row;
    # 11 columns of 11: 11 * (3 + 6); 3 blocks a row pair: 3 * 10 * 3; 66/121 dark = 55%: 0
    "finder rows, one side": (repeat_row("10111010100"), 440 + 99 + 90 + 0),
    # rows 110111010000: runs 2:1:3:1:1, not a finder pattern: no N3; 12 columns of 12: 12 * (3 + 7);
    # 6 blocks a row pair: 6 * 11 * 3; exactly 50% dark: 0
    "2:1:3:1:1 rows": (repeat_row("110111010000"), 0 + 120 + 198 + 0),
    # rows 11001111110011: a 2:2:6:2:2 pattern, quiet zone of 14 >= 8 on both sides: 2 * 40 a row; a run of 6
    # in each row: 14 * 4; 14 columns of 14: 14 * 12; 9 blocks a row pair: 9 * 13 * 3; 10/14 dark: 4 * 10
    "scaled finder rows": (repeat_row("11001111110011"), 1120 + 56 + 168 + 351 + 40),
}


def test_penalty_hand_counted(mp):
    for name, ((matrix, size), expected) in HAND_COUNTED.items():
        transposed = bytes(matrix[x * size + y] for y in range(size) for x in range(size))
        assert mp.call(PENALTY, matrix, size) == expected, name
        assert mp.call(PENALTY, transposed, size) == expected, f"{name}, in columns"
        square = [list(matrix[y * size : (y + 1) * size]) for y in range(size)]
        # qrcode's N4 differs from ours only when the dark share is an exact multiple of 5% (all light is 45-50%
        # off: 9 steps for us, 10 for qrcode); a QR symbol, odd-sized and never one colour, can't hit that.
        if sum(matrix) * 20 % (size * size):
            assert reference_penalty(square) == expected, name
    # The contrast with qrcode's N3: it scores the quiet-zone patterns 0, and the 2:1:3:1:1 rows 40 each.
    finder_rows = [[int(c) for c in "1011101"]] * 7
    wide_rows = [[int(c) for c in "110111010000"]] * 12
    assert qrcode.util._lost_point_level3(finder_rows, 7) == 0
    assert qrcode.util._lost_point_level3(wide_rows, 12) == 12 * 40


# Symbols where two masks share the lowest penalty (3 and 7, then 5 and 7): the lower mask number wins.
TIES = [(b"J\x12R\xe4\xdap\xe6", "L", 1), (b"6\x96@iH", "Q", 1)]


def test_penalty_and_mask_choice_on_symbols(mp):
    # For random symbols, each of the eight masks forced: the firmware's penalty equals the reference; the
    # firmware's own choice is the first mask with the lowest penalty, and its symbol is that mask's.
    rng, seed = seeded()
    datas = []
    for i in range(36):
        mode = MODES[i % 3]
        ecc = "LMQH"[i // 3 % 4]
        v = rng.randint(1, 10)
        datas.append((payload(rng, mode, rng.randint(1, capacity(v, ecc, mode))), ecc, v))
    datas += TIES
    forced = [(data, ecc, v, k) for data, ecc, v in datas for k in range(8)]
    results = dumps(mp, forced)
    assert all(ok for ok, _ in results), (seed, results)
    symbols = [res for _, res in results]
    chosen = dumps(mp, [(data, ecc, v, None) for data, ecc, v in datas])
    scores = mp.map(PENALTY, [(modules, version * 4 + 17) for version, _, modules in symbols])
    for i, (data, ecc, v) in enumerate(datas):
        why = (seed, data, ecc, v)
        eight = symbols[8 * i : 8 * i + 8]
        assert [mask for _, mask, _ in eight] == list(range(8)), why
        penalties = [reference_penalty(rows(version, modules)) for version, _, modules in eight]
        assert [score for _, score in scores[8 * i : 8 * i + 8]] == penalties, why
        ok, (version, mask, modules) = chosen[i]
        assert ok and mask == penalties.index(min(penalties)), (why, penalties, mask)  # the first on a tie
        if (data, ecc, v) in TIES:
            assert penalties.count(min(penalties)) == 2, why
        assert modules == eight[mask][2], why


# ---- errors ----


def test_errors(mp):
    rng, seed = seeded()
    bad = []
    for ecc in "LMQH":
        for mode in MODES:
            bad.append((payload(rng, mode, capacity(10, ecc, mode) + 1), ecc, None, None))  # beyond version 10
            v = rng.randint(1, 9)
            bad.append((payload(rng, mode, capacity(v, ecc, mode) + 1), ecc, v, None))  # beyond the asked version
    bad += [(b"123", ecc, None, None) for ecc in ("X", "l", "", "LM", None, 0)]
    bad += [(b"123", "M", v, None) for v in (0, 11, -1)]
    bad += [(b"123", "M", None, k) for k in (-1, 8)]
    for args, (ok, res) in zip(bad, dumps(mp, bad), strict=True):
        assert not ok and res.startswith("ValueError: qr:"), (seed, args, res)


# ---- the payee's payload ----


def payee_texts() -> tuple[str, str]:
    rng = random.Random(7)
    fields = (rng.randbytes(4), rng.randbytes(6), True, rng.randbytes(32), rng.randbytes(8))
    return base45.encode(wire.qr_payload(*fields)), base45.encode(wire.qr_payload(*fields, 1250, 978))


def test_payee_payload(mp):
    plain, with_amount = payee_texts()
    assert (len(plain), len(with_amount)) == (77, 86)
    version, mask, modules = dump(mp, plain, "L")
    assert version == 3 and capacity(3, "L", "alphanumeric") == 77  # exactly full
    assert (version * 4 + 17) * 2 <= 64  # 2 px a module on the 128x64 display
    assert_decodes(plain.encode(), "L", 3, mask, modules, plain)
    assert wire.decode_qr(base45.decode(read(3, modules).text)).amount is None
    # With an amount it needs version 4 at level L (33 modules: 1 px a module on that display).
    version, mask, modules = dump(mp, with_amount, "L")
    assert version == 4
    assert_decodes(with_amount.encode(), "L", 4, mask, modules, with_amount)
    assert wire.decode_qr(base45.decode(read(4, modules).text)).amount == 1250


def test_payee_payload_in_32k_heap(mp):
    # Import, encode the real payload and read every module through get(), all in a 32K heap.
    plain, _ = payee_texts()
    script = f"""
from paytoken import qr
c = qr.encode({plain!r}, 'L')
assert not c.get(-1, 0) and not c.get(0, c.size)
print(c.version, c.ecc, c.mask, c.size)
for y in range(c.size):
    print(''.join('1' if c.get(x, y) else '0' for x in range(c.size)))
"""
    proc = run_script(script, heapsize="32K")
    assert proc.returncode == 0, proc.stderr
    version, mask, modules = dump(mp, plain, "L")
    out = proc.stdout.split()
    assert out[:4] == ["3", "L", str(mask), "29"]
    assert out[4:] == ["".join(str(m) for m in row) for row in rows(version, modules)]
