"""The screens (paytoken.ui.screens) rendered on MicroPython into real framebuf.FrameBuffers at the two display
sizes, 128x64 (SSD1306 OLED) and 240x135 (ST7789 T-Display): every screen is saved as a PNG under build/screens/
for review, the payee's QR screen is decoded by zxing-cpp from the display's own pixels, text is found on the
screens, and every drawing call is checked to stay on the display."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import zxingcpp
from PIL import Image, ImageOps

from paytoken import base45, reasons, wire
from tests.harness.mp import ROOT, MicroPythonError, run_script

OUT = ROOT / "build" / "screens"
SIZES = ((128, 64), (240, 135))
# Every board's display, from its board.json: each screen is also saved under the board's name.
BOARDS = {
    f.parent.name: (d["width"], d["height"])
    for f in sorted((ROOT / "boards").glob("*/board.json"))
    if (d := json.loads(f.read_text()).get("display"))
}
USD, EUR = 840, 978

# On MicroPython: render into a fresh buffer (pre-filled with `fill`, to show a screen redraws every pixel) in
# MONO_HLSB or MONO_VLSB (the SSD1306 driver's format); the glyphs of a string at scale 1; a recording frame
# buffer that lists every drawing call that reaches outside the display.
SETUP = """
import framebuf, time
from paytoken.ui import screens

def _render(w, h, state, fmt='hlsb', fill=0):
    if fmt == 'vlsb':
        buf = bytearray(w * ((h + 7) // 8))
        fb = framebuf.FrameBuffer(buf, w, h, framebuf.MONO_VLSB)
    else:
        buf = bytearray((w + 7) // 8 * h)
        fb = framebuf.FrameBuffer(buf, w, h, framebuf.MONO_HLSB)
    for i in range(len(buf)):
        buf[i] = fill
    t = time.ticks_us()
    screens.render(fb, w, h, state)
    return bytes(buf), time.ticks_diff(time.ticks_us(), t)

def _glyphs(s):
    buf = bytearray(len(s) * 8)
    fb = framebuf.FrameBuffer(buf, len(s) * 8, 8, framebuf.MONO_HLSB)
    fb.text(s, 0, 0, 1)
    return bytes(buf)

class _Rec:
    # Only the drawing calls the display contract allows; anything reaching off the display is recorded.
    def __init__(self, w, h):
        self.w, self.h, self.bad, self.calls = w, h, [], 0
    def _box(self, name, x, y, w, h):
        self.calls += 1
        if w > 0 and h > 0 and (x < 0 or y < 0 or x + w > self.w or y + h > self.h):
            self.bad.append((name, x, y, w, h))
    def fill(self, c):
        self.calls += 1
    def fill_rect(self, x, y, w, h, c):
        self._box('fill_rect', x, y, w, h)
    def rect(self, x, y, w, h, c, f=False):
        self._box('rect', x, y, w, h)
    def hline(self, x, y, w, c):
        self._box('hline', x, y, w, 1)
    def vline(self, x, y, h, c):
        self._box('vline', x, y, 1, h)
    def pixel(self, x, y, c=None):
        self._box('pixel', x, y, 1, 1)
    def text(self, s, x, y, c=1):
        self._box('text ' + s, x, y, 8 * len(s), 8)

def _offscreen(w, h, state):
    rec = _Rec(w, h)
    screens.render(rec, w, h, state)
    return rec.calls, rec.bad
"""


def qr_text(amount: int | None = None) -> str:
    """A real payee QR payload, base45: 77 characters without an amount, 86 with one."""
    payload = wire.qr_payload(os.urandom(4), os.urandom(6), True, os.urandom(32), os.urandom(8), amount,
                              None if amount is None else USD)
    return base45.encode(payload)


PAYMENTS = [(wire.ROLE_PAYER, 1250, "done"), (wire.ROLE_PAYEE, 99, "settled"), (wire.ROLE_PAYER, 700, "sent")]

# file label -> state: every screen at least once
SAMPLES = {
    "payee_qr": ("payee_qr", qr_text()),
    "payee_qr_amount": ("payee_qr", qr_text(12345), 12345, USD),
    "payee_waiting": ("payee_waiting", 12345, USD),
    "payee_waiting_open": ("payee_waiting", None, EUR),
    "payee_paid": ("payee_paid", 12345, USD),
    "payee_error": ("payee_error", reasons.LIMIT_HOLDING),
    "payer_ready": ("payer_ready",),
    "payer_amount": ("payer_amount", "1250", EUR),
    "payer_confirm": ("payer_confirm", 12345, USD, "1a2b3c4d"),
    "payer_paid": ("payer_paid", 12345, USD, 87655),
    "payer_declined": ("payer_declined", reasons.FUNDS),
    "payer_balance": ("payer_balance", 87655, USD, PAYMENTS),
    "payer_working": ("payer_working", "Connecting..."),
    "payer_unconfirmed": ("payer_unconfirmed", 10000, USD),
    "unprovisioned": ("unprovisioned", "store: cert.bin missing"),
    "sync_usb": ("sync", "USB", "synced", "pending 2, settled 1"),
    "sync_ble_waiting": ("sync", "BLE", "waiting", "payer"),
    "sync_ble": ("sync", "BLE", "synced", "settled 1"),
    "sync_statuses": ("sync_statuses", "SYNCED", [(wire.ROLE_PAYER, 10000, "settled"),
                                                  (wire.ROLE_PAYEE, 250, "pending")]),
    "sync_statuses_failed": ("sync_statuses", "NOT SYNCED", "[Errno 111] ECONNREFUSED"),
}

# Worst cases for fitting: the largest amounts, the longest reason names, an unknown code, long lists.
MAX = 2**32 - 1
STRESS = [
    ("payee_qr", qr_text(MAX), MAX, EUR),
    ("payee_waiting", MAX, 36),
    ("payee_paid", MAX, EUR),
    ("payee_error", reasons.CERT_EXPIRED),
    ("payee_error", 250),
    ("payer_amount", "4294967295", 36),
    ("payer_amount", "", USD),
    ("payer_confirm", MAX, EUR, "0123456789abcdef0123"),
    ("payer_paid", MAX, EUR, -MAX),
    ("payer_declined", reasons.CERT_INVALID),
    ("payer_declined", reasons.LIMIT_OFFLINE),
    ("payer_balance", -MAX, 36, [(wire.ROLE_PAYEE, MAX, "refunded")] * 20),
    ("payer_balance", 0, USD, []),
    ("payer_unconfirmed", MAX, EUR),
    ("payer_working", "Waiting for the payee's answer..."),
    ("unprovisioned", "store: identity.key mismatch: not the key the certificate names"),
    ("payer_declined", reasons.UNREACHABLE),
    ("sync", "BLE", "syncing", "0123456789abcdef"),
    ("sync", "USB", "synced", "pending 2, refunded 1, settled 3, unconfirmed 2"),
    ("sync", "BLE", "not synced", "backend refused (401): device request: unknown device"),
    ("sync_statuses", "SYNCED", [(wire.ROLE_PAYEE, MAX, "unconfirmed")] * 20, 36),
    ("sync_statuses", "SYNCED", []),
    ("sync_statuses", "NOT SYNCED", "backend refused message 1 (400): not a handshake to this backend's key " * 3),
]


@pytest.fixture(scope="module")
def ui(mp):
    mp.exec(SETUP)
    return mp


# ---- images on the host: a list of rows, each a str of '1' (lit, light) and '0' (dark) ----


def hlsb_rows(data: bytes, w: int, h: int) -> list[str]:
    stride = (w + 7) // 8
    assert len(data) == stride * h
    return ["".join(f"{b:08b}" for b in data[y * stride : (y + 1) * stride])[:w] for y in range(h)]


def vlsb_rows(data: bytes, w: int, h: int) -> list[str]:
    assert len(data) == w * ((h + 7) // 8)
    return ["".join(str(data[(y >> 3) * w + x] >> (y & 7) & 1) for x in range(w)) for y in range(h)]


def image(rows: list[str]) -> Image.Image:
    img = Image.new("L", (len(rows[0]), len(rows)))
    img.putdata([255 if p == "1" else 0 for row in rows for p in row])
    return img


def render(ui, w: int, h: int, state: tuple, fmt: str = "hlsb", fill: int = 0) -> tuple[list[str], int]:
    data, us = ui.eval(f"_render({w}, {h}, {state!r}, {fmt!r}, {fill})")
    return (hlsb_rows if fmt == "hlsb" else vlsb_rows)(data, w, h), us


def save(rows: list[str], w: int, h: int, label: str) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    img = image(rows)
    path = OUT / f"{w}x{h}_{label}.png"
    img.save(path)
    img.resize((w * 4, h * 4), Image.NEAREST).save(OUT / f"{w}x{h}_{label}_x4.png")
    for board, size in BOARDS.items():
        if size == (w, h):
            img.save(OUT / f"{board}_{label}.png")
    return path


def glyph_rows(ui, s: str, k: int) -> list[str]:
    out = []
    for row in hlsb_rows(ui.eval(f"_glyphs({s!r})"), 8 * len(s), 8):
        out += ["".join(p * k for p in row)] * k
    return out


def find_text(ui, rows: list[str], s: str, lit: bool = True) -> int | None:
    """The scale (1-3) at which `s` appears on the screen, cell for cell as the 8x8 font draws it, else None."""
    if not lit:
        rows = [r.translate(str.maketrans("01", "10")) for r in rows]
    for k in (1, 2, 3):
        pat = glyph_rows(ui, s, k)
        for y in range(len(rows) - len(pat) + 1):
            x = rows[y].find(pat[0])
            while x >= 0:
                if all(rows[y + i][x : x + len(p)] == p for i, p in enumerate(pat)):
                    return k
                x = rows[y].find(pat[0], x + 1)
    return None


def assert_shows(ui, rows: list[str], *texts: str, lit: bool = True) -> None:
    for s in texts:
        assert find_text(ui, rows, s, lit) is not None, f"{s!r} not on the screen"


# ---- pure helpers, on MicroPython ----


def test_money(ui):
    cases = [
        ((10000, USD), "$100.00"),
        ((0, USD), "$0.00"),
        ((5, USD), "$0.05"),
        ((1250, EUR), "EUR 12.50"),
        ((1234, 826), "826 12.34"),
        ((1234, 36), "036 12.34"),
        ((MAX, USD), "$42949672.95"),
        ((-1999, USD), "-$19.99"),
        ((-1, EUR), "-EUR 0.01"),
    ]
    got = ui.map("paytoken.ui.screens.money", [args for args, _ in cases])
    assert got == [(True, want) for _, want in cases]


def test_wrap_and_fit(ui):
    wrap = "paytoken.ui.screens.wrap"
    assert ui.call(wrap, "insufficient funds", 16) == ["insufficient", "funds"]
    assert ui.call(wrap, "Scan the payee's QR code", 16) == ["Scan the payee's", "QR code"]
    assert ui.call(wrap, "a  b   c", 16) == ["a b c"]
    assert ui.call(wrap, "0123456789abcdef0123 x", 8) == ["01234567", "89abcdef", "0123 x"]
    assert ui.call(wrap, "anything", 0) == []
    text = "certificate expired over the offline limit  abcdefghijklmnopqrstuvwxyz"
    for cols in range(1, 31):
        lines = ui.call(wrap, text, cols)
        assert all(1 <= len(line) <= cols for line in lines), cols
        assert "".join(lines).replace(" ", "") == text.replace(" ", ""), cols
    assert ui.call("paytoken.ui.screens.fit", "settled", 16) == "settled"
    assert ui.call("paytoken.ui.screens.fit", "settled", 4) == "set~"


# ---- every screen, both displays ----


def test_every_board_has_a_display_size_that_is_rendered():
    assert set(BOARDS) == {"unix_sim", "esp32_devkitc_ssd1306", "lilygo_tdisplay"}
    assert set(BOARDS.values()) <= set(SIZES)


@pytest.mark.parametrize(("w", "h"), SIZES, ids=lambda v: str(v))
def test_every_screen_renders_and_is_saved(ui, w, h):
    # Every screen name has a sample; each renders, is saved (1:1 and x4), is neither blank nor all lit, redraws
    # the whole display whatever was on it, and comes out the same in MONO_VLSB (the SSD1306 driver's layout).
    names = ui.eval("screens.NAMES")
    assert sorted({state[0] for state in SAMPLES.values()}) == sorted(names)
    for label, state in SAMPLES.items():
        rows, _ = render(ui, w, h, state)
        path = save(rows, w, h, label)
        assert path.exists() and (OUT / f"{w}x{h}_{label}_x4.png").exists()
        assert all((OUT / f"{b}_{label}.png").exists() for b, size in BOARDS.items() if size == (w, h))
        lit = sum(r.count("1") for r in rows)
        assert 0 < lit < w * h, label
        assert render(ui, w, h, state, fill=0xA5)[0] == rows, f"{label}: not every pixel redrawn"
        assert render(ui, w, h, state, fmt="vlsb", fill=0xFF)[0] == rows, f"{label}: MONO_VLSB differs"


@pytest.mark.parametrize(("w", "h"), SIZES, ids=lambda v: str(v))
def test_drawing_stays_on_the_display(ui, w, h):
    # Through a recording frame buffer with only the contract's methods: every call lies inside the display,
    # for the samples and for the worst cases (largest amounts, longest reasons, 20 payments to list).
    for state in [*SAMPLES.values(), *STRESS]:
        calls, off = ui.eval(f"_offscreen({w}, {h}, {state!r})")
        assert calls > 1 and off == [], (state[0], off)
        render(ui, w, h, state)


def test_unknown_screen_and_bad_states(ui):
    for state in [("payee_nothing",), ("",), (), (42,), ("payer_ready", 1), ("payer_paid", 1, USD),
                  ("payee_qr",), ("payee_qr", "X", 1, USD, 4)]:
        with pytest.raises(MicroPythonError) as exc:
            ui.eval(f"_render(128, 64, {state!r})")
        assert exc.value.kind == "ValueError", state


# ---- the payee's QR code ----


def dump_modules(ui, text: str) -> tuple[int, list[str]]:
    version, _, packed = ui.call("paytoken.qr.dump", text, "L", None, None)
    size = version * 4 + 17
    bits = "".join(f"{b:08b}" for b in packed)
    return version, [bits[y * size : (y + 1) * size] for y in range(size)]


@pytest.mark.parametrize(
    ("w", "h", "chars", "version", "scale"),
    [
        (128, 64, 77, 3, 2),  # version 3, 58 px: 3 px light above and below
        (128, 64, 86, 4, 1),  # version 4 (33 modules) is 66 px at 2 px: only 1 px a module fits, and it decodes
        (240, 135, 77, 3, 4),
        (240, 135, 86, 4, 3),
    ],
)
def test_payee_qr_decodes_from_the_display(ui, w, h, chars, version, scale):
    amount = None if chars == 77 else 4200
    text = qr_text(amount)
    assert len(text) == chars
    state = ("payee_qr", text) if amount is None else ("payee_qr", text, amount, USD)
    rows, _ = render(ui, w, h, state)
    save(rows, w, h, f"payee_qr_{chars}chars_decode")

    # zxing-cpp reads the display's pixels 1:1, as they are and inside a dark border standing for an OLED's black
    # surround (then the 3-px margin on the panel is all the quiet zone there is above and below).
    for img in (image(rows), ImageOps.expand(image(rows), border=8, fill=0)):
        found = zxingcpp.read_barcodes(img, formats=zxingcpp.BarcodeFormat.QRCode)
        assert [b.text for b in found] == [text]
        assert found[0].extra["Version"] == str(version) and found[0].extra["ECLevel"] == "L"

    # Geometry: the symbol is the leftmost dark thing; its top-left finder corner gives origin and module size.
    size = version * 4 + 17
    x0 = min(r.find("0") for r in rows if "0" in r)
    y0 = next(y for y, r in enumerate(rows) if r[x0] == "0")
    s = (rows[y0][x0:] + "1").index("1") // 7
    assert s == scale
    side = size * s
    margin = (h - side) // 2
    assert y0 == margin and h - (y0 + side) >= margin  # centred: the most light the panel allows above and below
    assert 2 * margin >= 3 * s  # at least 1.5 modules
    quiet = min(margin, 4 * s)  # at the sides as much, up to ISO's 4 modules, then the caption
    assert x0 == quiet
    # every module is s x s pixels of the encoder's symbol, dark modules dark (0) on light (1)
    _, modules = dump_modules(ui, text)
    for my in range(size):
        for mx in range(size):
            want = "0" if modules[my][mx] == "1" else "1"
            for py in range(y0 + my * s, y0 + (my + 1) * s):
                assert rows[py][x0 + mx * s : x0 + (mx + 1) * s] == want * s, (mx, my)
    # the quiet zone: light all round (the full height above and below), the caption only beyond it
    right = x0 + side + quiet
    for y in range(h):
        if not y0 <= y < y0 + side:
            assert rows[y][:right] == "1" * right, y
        else:
            assert rows[y][:x0] == "1" * x0 and rows[y][x0 + side : right] == "1" * quiet, y
    assert_shows(ui, rows, "SCAN", "PAY", lit=False)
    if amount is not None:
        assert_shows(ui, rows, "$42.00", lit=False)


def test_payee_qr_render_time(ui):
    # Encoding (all eight masks scored) and drawing, on the unix port; the report reads these files.
    for w, h in SIZES:
        times = [render(ui, w, h, ("payee_qr", qr_text()))[1] for _ in range(5)]
        best = min(times) / 1000
        (OUT / f"{w}x{h}_payee_qr_render_ms.txt").write_text(f"{best:.1f}\n")
        assert 0 < best < 2000


def test_every_screen_in_a_48k_heap(ui):
    # On a device: the 240x135 frame buffer (4 KB), and every screen drawn into it, the 86-character QR included,
    # in a 48K heap that on the unix port also holds the screens' and the QR encoder's code (a frozen build keeps
    # code in flash). The pixels match the roomy process's.
    states = [("payee_qr", qr_text(4200), 4200, USD), *[v for k, v in SAMPLES.items() if not k.startswith("payee_qr")]]
    # The pixels go out in 256-byte pieces: one 8 KB hex string would measure the test, not the screens.
    script = f"""
import sys
import framebuf
from binascii import hexlify
buf = bytearray(240 * 135 // 8)
mv = memoryview(buf)
fb = framebuf.FrameBuffer(buf, 240, 135, framebuf.MONO_HLSB)
from paytoken.ui import screens
for state in {states!r}:
    screens.render(fb, 240, 135, state)
    for i in range(0, len(buf), 256):
        sys.stdout.write(hexlify(mv[i:i + 256]))
    sys.stdout.write("\\n")
"""
    proc = run_script(script, heapsize="48K")
    assert proc.returncode == 0, proc.stderr
    got = proc.stdout.split()
    assert len(got) == len(states)
    for state, data in zip(states, got, strict=True):
        assert hlsb_rows(bytes.fromhex(data), 240, 135) == render(ui, 240, 135, state)[0], state[0]


# ---- text on the screens ----


@pytest.mark.parametrize(("w", "h"), SIZES, ids=lambda v: str(v))
def test_screens_show_their_text(ui, w, h):
    def shown(state: tuple, *texts: str) -> list[str]:
        rows, _ = render(ui, w, h, state)
        assert_shows(ui, rows, *texts)
        return rows

    rows = shown(("payer_confirm", 1250, USD, "1a2b3c4d"), "$12.50", "to 1a2b3c4d", "CONFIRM: pay", "DOWN: cancel")
    assert_shows(ui, rows, "CONFIRM PAYMENT", lit=False)  # title bar: dark on lit
    assert find_text(ui, rows, "$12.50") > find_text(ui, rows, "to 1a2b3c4d")  # the amount is the big text
    assert render(ui, w, h, ("payer_confirm", 1251, USD, "1a2b3c4d"))[0] != rows
    assert render(ui, w, h, ("payer_confirm", 1250, USD, "1a2b3c4e"))[0] != rows

    shown(("payer_amount", "1234", EUR), "12.34", "EUR", "DOWN: digit +1", "CONFIRM: next", "HOLD CONFIRM: ok")
    shown(("payer_amount", "", USD), "$0.00")
    shown(("payer_paid", 1250, EUR, 98750), "EUR", "12.50", "Balance", "987.50")
    shown(("payer_declined", reasons.FUNDS), "Insufficient", "funds")
    shown(("payer_declined", reasons.REVOKED), "Revoked")
    shown(("payer_declined", 250), "Reason 250")
    shown(("payer_ready",), "READY", "Scan", "QR", "code")
    shown(("payer_balance", 87655, USD, PAYMENTS), "$876.55", "-$12.50", "done", "+$0.99", "settled", "-$7.00", "sent")
    shown(("payer_balance", 0, USD, []), "$0.00", "No payments")
    rows = shown(("sync_statuses", "SYNCED", [(wire.ROLE_PAYER, 10000, "settled"), (wire.ROLE_PAYEE, 99, "pending")]),
                 "-$100.00", "settled", "+$0.99", "pending")
    assert_shows(ui, rows, "SYNCED", lit=False)
    shown(("sync_statuses", "SYNCED", []), "No payments")
    shown(("sync_statuses", "NOT SYNCED", "offline"), "offline")
    shown(("payee_waiting", None, USD), "Payer", "enters", "amount", "Waiting")
    shown(("payee_waiting", 500, USD), "$5.00", "Waiting")
    shown(("payee_paid", MAX, USD), "$42949672.95", "received")  # the largest amount, whole
    shown(("payee_error", reasons.CERT_EXPIRED), "Certificate", "expired", "failed")
    assert_shows(ui, shown(("payer_working", "Connecting..."), "Connecting..."), "PAYING", lit=False)
    rows = shown(("payer_unconfirmed", 1250, USD), "$12.50", "sent", "next", "sync")
    assert_shows(ui, rows, "NO RECEIPT", lit=False)
    shown(("payer_declined", reasons.LINK), "Connection", "lost")
    rows = shown(("unprovisioned", "store: cert.bin missing"), "provisioned", "cert.bin", "missing")
    assert_shows(ui, rows, "NOT SET UP", lit=False)

    # long values: the largest amount whole; a too-long payee id wrapped, and where lines run out the last one
    # shown ends in "~"; a state that does not fit beside the largest amount cut short with "~"
    long_id = "0123456789abcdef0123456789abcdef"
    more = ("0123456789abcdef0123456789abcd", "ef") if w >= 240 else ("0123456789abcde~",)
    shown(("payer_confirm", MAX, EUR, long_id), "EUR", "42949672.95", *more)
    left = "+$42949672.95"
    room = w // 8 - len(left) - 1
    state = "refunded" if room >= len("refunded") else "refunded"[: room - 1] + "~"
    shown(("payer_balance", 0, USD, [(wire.ROLE_PAYEE, MAX, "refunded")]), left, state)
