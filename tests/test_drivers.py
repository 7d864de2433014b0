"""The hardware-edge drivers (firmware/lib/paytoken/drivers/) and the boards (boards/<name>/) on the
MicroPython unix port, against fake UART / SPI / Pin objects: button debouncing, the GM65 scanner
protocol, the ST7789 byte stream, the SSD1306 wrapper, the unix_sim board's display/buttons/scanner,
the ESP32 boards' wiring (with a fake `machine` module) and a firmware build for every board.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from paytoken_host import fwbuild
from tests.harness.mp import MicroPython, MicroPythonError
from tests.test_esp32_api import external_uses, stub_file, stub_names

ROOT = Path(__file__).resolve().parents[1]
BOARDS = sorted(p.name for p in (ROOT / "boards").iterdir() if p.is_dir() and (p / "board.json").exists())
ESP32_BOARDS = [b for b in BOARDS if b != "unix_sim"]

PRELUDE = r"""
import gc, time
from paytoken.drivers import buttons as B
from paytoken.drivers import scanner as S
from paytoken.drivers.st7789 import ST7789

def debounce(steps, settle_ms=20, long_ms=800, pressed=False):
    # steps: ("f", level, t) feeds an edge or sample, ("p", t) polls; -> [(event, step index)]
    out = []
    k = [0]
    d = B.Debouncer(lambda e: out.append((e, k[0])), settle_ms, long_ms, pressed)
    for i, s in enumerate(steps):
        k[0] = i
        if s[0] == "f":
            d.feed(s[1], s[2])
        else:
            d.poll(s[1])
    return out

class FakeUART:
    # rx: bytes the module sends; replies: what the module answers to each write, in turn
    def __init__(self, rx=b"", replies=(), chunk=None):
        self.rx = bytearray(rx)
        self.written = []
        self.replies = list(replies)
        self.chunk = chunk  # deliver at most this many bytes per read (slow line)

    def write(self, b):
        self.written.append(bytes(b))
        if self.replies:
            self.rx += self.replies.pop(0)
        return len(b)

    def any(self):
        n = len(self.rx)
        return min(n, self.chunk) if self.chunk else n

    def read(self, n=-1):
        if not self.rx:
            return None
        if n < 0:
            n = len(self.rx)
        out = bytes(self.rx[:n])
        self.rx = self.rx[n:]
        return out

class FloodUART:
    # a module gone mad: `total` bytes of garbage without a terminator (forever if None), then `tail`
    def __init__(self, total, tail=b""):
        self.left = total
        self.tail = bytearray(tail)
        self.sent = 0

    def write(self, b):
        return len(b)

    def any(self):
        if self.left is None or self.left > 0:
            return 64
        return len(self.tail)

    def read(self, n):
        if self.left is None or self.left > 0:
            if self.left is not None:
                n = min(n, self.left)
                self.left -= n
            self.sent += n
            return b"A" * n
        out = bytes(self.tail[:n])
        self.tail = self.tail[n:]
        return out

def lines(uart, max_len=512, timeout_ms=0):
    s = S.Scanner(uart, max_len)
    out = []
    while True:
        line = s.read(timeout_ms)
        if line is None:
            return out, s.replies, s.dropped
        out.append(line)

LOG = []

class FakePin:
    IRQ_FALLING = 2
    IRQ_RISING = 1

    def __init__(self, name, level=1):
        self.name = name
        self.level = level
        self.handler = None
        self.trigger = None

    def value(self, v=None):
        if v is None:
            return self.level
        self.level = v
        LOG.append((self.name, v))

    def irq(self, trigger=None, handler=None):
        self.trigger = trigger
        self.handler = handler

    def set(self, v):
        # the line changes: the IRQ fires as the hardware would
        self.level = v
        if self.handler:
            self.handler(self)

class FakeSPI:
    def __init__(self, record=True):
        self.record = record
        self.count = 0
        self.biggest = 0

    def write(self, b):
        self.count += len(b)
        self.biggest = max(self.biggest, len(b))
        if self.record:
            LOG.append(("spi", bytes(b)))

def commands(log):
    # the LOG as (command, data bytes) pairs: a write with DC low is a command, DC high its data
    out = []
    dc = None
    for who, v in log:
        if who == "dc":
            dc = v
        elif who == "spi":
            if dc == 0:
                for c in v:
                    out.append([c, b""])
            else:
                out[-1][1] += v
    return [(c, bytes(d)) for c, d in out]

def lcd(record=True, **kw):
    LOG.clear()
    spi = FakeSPI(record)
    d = ST7789(spi, FakePin("dc"), cs=FakePin("cs"), rst=FakePin("rst"), bl=FakePin("bl", 0), **kw)
    return d, spi
"""


@pytest.fixture(scope="module")
def upy(firmware_build):
    with MicroPython(heapsize="2M") as proc:
        proc.exec(PRELUDE)
        yield proc


# Debouncer -------------------------------------------------------------------------------------------


def test_bounces_within_the_settle_time_make_one_press_and_one_release(upy):
    steps = [
        ("f", True, 0),
        ("f", False, 3),
        ("f", True, 5),
        ("f", False, 8),
        ("f", True, 10),  # chatter
        ("p", 29),  # the last edge was 19 ms ago: not settled yet
        ("p", 30),  # settled: PRESS
        ("p", 400),
        ("f", False, 500),
        ("f", True, 502),
        ("f", False, 506),  # release chatter
        ("p", 525),
        ("p", 526),
        ("p", 2000),
    ]
    assert upy.eval(f"debounce({steps!r})") == [["press", 6], ["short", 12]]


def test_a_glitch_shorter_than_the_settle_time_is_no_press(upy):
    steps = [("f", True, 0), ("f", False, 15), ("p", 100), ("f", True, 200), ("f", False, 219), ("p", 1000)]
    assert upy.eval(f"debounce({steps!r})") == []
    # sampled (feed every few ms) rather than edge-driven: the same
    samples = [("f", t in (10, 15), t) for t in range(0, 200, 5)]
    assert upy.eval(f"debounce({samples!r})") == []


def test_long_press_fires_once_while_held_then_release(upy):
    steps = [
        ("f", True, 0),
        ("p", 20),
        ("p", 799),
        ("p", 800),
        ("p", 801),
        ("p", 5000),
        ("f", False, 6000),
        ("p", 6020),
    ]
    assert upy.eval(f"debounce({steps!r})") == [["press", 1], ["long", 3], ["release", 7]]


def test_events_due_while_nobody_polled_come_out_in_order(upy):
    assert upy.eval("debounce([('f', True, 0), ('p', 2000)])") == [["press", 1], ["long", 1]]
    # a whole short press seen only at the next edge: the edge's own time decides
    assert upy.eval("debounce([('f', True, 0), ('f', False, 300), ('p', 320)])") == [["press", 1], ["short", 2]]
    # a long press whose release was only seen late: LONG still comes before the release
    assert upy.eval("debounce([('f', True, 0), ('f', False, 1000), ('p', 5000)])") == [
        ["press", 1],
        ["long", 1],  # due at 800: out as soon as a later time is seen
        ["release", 2],
    ]


def test_long_is_measured_to_the_release_not_to_the_poll(upy):
    # released at 790 (held 790 ms < 800): polled late at 805, still unsettled -> no LONG; then SHORT
    steps = [("f", True, 0), ("p", 20), ("f", False, 790), ("p", 805), ("p", 810)]
    assert upy.eval(f"debounce({steps!r})") == [["press", 1], ["short", 4]]
    # a bounce during the hold is not a release: held on, LONG fires
    steps = [
        ("f", True, 0),
        ("p", 20),
        ("f", False, 700),
        ("f", True, 705),
        ("p", 900),
        ("f", False, 1000),
        ("p", 1020),
    ]
    assert upy.eval(f"debounce({steps!r})") == [["press", 1], ["long", 4], ["release", 6]]


def test_settle_and_long_times_are_configurable_and_ticks_wrap(upy):
    steps = [("f", True, 0), ("p", 49), ("p", 50), ("p", 299), ("p", 300), ("f", False, 400), ("p", 450)]
    assert upy.eval(f"debounce({steps!r}, 50, 300)") == [["press", 2], ["long", 4], ["release", 6]]
    # across the ticks wrap-around
    upy.exec(
        "t0 = time.ticks_add(0, -10)\n"
        "wrap = debounce([('f', True, t0), ('p', time.ticks_add(t0, 19)), ('p', time.ticks_add(t0, 20)),"
        " ('f', False, time.ticks_add(t0, 100)), ('p', time.ticks_add(t0, 120))])"
    )
    assert upy.eval("wrap") == [["press", 2], ["short", 4]]
    # starting pressed (a button held at boot): no LONG, no SHORT, only the RELEASE
    assert upy.eval("debounce([('p', 5000), ('f', False, 6000), ('p', 6020)], pressed=True)") == [["release", 2]]


def test_buttons_irq_handler_hands_off_and_poll_debounces(upy):
    upy.exec(
        "ev = []\n"
        "pa, pb = FakePin('a'), FakePin('b')\n"
        "bt = B.Buttons([('ok', pa), ('next', pb)], lambda n, e: ev.append((n, e)), settle_ms=20, long_ms=300)\n"
        "irq = (pa.trigger, pb.trigger)\n"
        "pa.set(0); pa.set(1); pa.set(0)\n"  # active low, with a bounce
        "bt.poll()\n"
        "early = list(ev)\n"
        "time.sleep_ms(30)\n"
        "bt.poll()\n"
        "held = bt.pressed('ok')\n"
        "pa.set(1)\n"
        "time.sleep_ms(30)\n"
        "bt.poll()\n"
    )
    assert upy.eval("irq") == [3, 3]  # IRQ_FALLING | IRQ_RISING on every pin
    assert upy.eval("early") == []
    assert upy.eval("held") is True
    assert upy.eval("ev") == [["ok", "press"], ["ok", "short"]]
    # a missed edge: the line went low without an IRQ; sampling in poll() still sees it
    upy.exec(
        "ev.clear()\npb.level = 0\nbt.poll()\ntime.sleep_ms(320)\nbt.poll()\npb.level = 1\nbt.poll()\n"
        "time.sleep_ms(25)\nbt.poll()\nbt.close()"
    )
    assert upy.eval("ev") == [["next", "press"], ["next", "long"], ["next", "release"]]
    assert upy.eval("pa.handler is None and pb.handler is None")


# Scanner ---------------------------------------------------------------------------------------------


def test_trigger_command_is_the_documented_bytes(upy):
    # GM65 manual, command-triggered mode: write 1 to zone bit 0x0002, CRC field AB CD = not checked
    assert upy.eval("S.TRIGGER") == bytes.fromhex("7E 00 08 01 00 02 01 AB CD")
    assert upy.eval("S.ACK") == bytes.fromhex("02 00 00 01 00 33 31")
    upy.exec("u = FakeUART()\ns = S.Scanner(u)\ns.trigger()")
    assert upy.eval("u.written") == [bytes.fromhex("7E 00 08 01 00 02 01 AB CD")]
    # the CRC the module uses, checked against the manual's own examples
    assert upy.eval("S.command(0x07, 0x000A, b'\\x01')") == bytes.fromhex("7E 00 07 01 00 0A 01 EE 8A")
    assert upy.eval("S.command(0x09, 0x0000, b'\\x00')") == bytes.fromhex("7E 00 09 01 00 00 00 DE C8")
    assert upy.eval("S.crc16(b'\\x00\\x01\\x00')") == 0x3331  # the ACK's CRC
    assert upy.eval("S.crc16(b'\\x00\\x01\\x3e')") == 0xE4AC  # a read reply in the manual


def test_scan_returns_the_decoded_line_and_skips_the_ack(upy):
    upy.exec("u = FakeUART(replies=[S.ACK + b'PAY:1234ABCD\\r'])\ns = S.Scanner(u)\nr = s.scan(200)")
    assert upy.eval("r") == "PAY:1234ABCD"
    assert upy.eval("u.written") == [bytes.fromhex("7E 00 08 01 00 02 01 AB CD")]
    assert upy.eval("s.replies") == 1


@pytest.mark.parametrize(
    "wire,expected",
    [
        (b"ONE\r", ["ONE"]),
        (b"ONE\n", ["ONE"]),
        (b"ONE\r\n", ["ONE"]),
        (b"ONE\r\nTWO\r\nTHREE\r\n", ["ONE", "TWO", "THREE"]),
        (b"ONE\rTWO\nTHREE\r\n\r\n\n", ["ONE", "TWO", "THREE"]),  # mixed; empty lines ignored
        (b"\x02\x00\x00\x01\x00\x33\x31ONE\r\n", ["ONE"]),  # ACK, then the code
        (b"ONE\r\n\x02\x00\x00\x01\x00\x33\x31TWO\r", ["ONE", "TWO"]),
        (b"\x02\x00\x00\x01\x3e\xe4\xacONE\r", ["ONE"]),  # a zone-bit read reply
        (b"\x02\x00\x00\x03\x0d\x0a\x02\xaa\xbbONE\r", ["ONE"]),  # frame data with CR/LF/STX bytes
        (b"\x02HELLO\r", ["HELLO"]),  # a stray STX is not a frame
        (b"A\x01B\x1bC\tD\r", ["ABC\tD"]),  # control characters dropped (tab kept)
        ("PÄY €\r\n".encode(), ["PÄY €"]),  # UTF-8
        (b"\xff\xfe\r\nOK\r\n", ["OK"]),  # undecodable: dropped
        (b"NO TERMINATOR", []),
    ],
)
def test_line_framing(upy, wire, expected):
    for chunk in (None, 1, 3):  # all at once, byte by byte, in threes
        got, _, _ = upy.eval(f"lines(FakeUART({wire!r}, chunk={chunk!r}), 512, {20 if chunk else 0})")
        assert got == expected, (wire, chunk)


def test_a_line_split_across_reads_is_joined(upy):
    upy.exec("u = FakeUART(b'AB')\ns = S.Scanner(u)\nfirst = s.read(0)\nu.rx += b'C\\r\\nD'\nsecond = s.read(0)")
    assert upy.eval("[first, second, s.read(0)]") == [None, "ABC", None]
    upy.exec("u.rx += b'E\\r'")
    assert upy.eval("s.read(0)") == "DE"


def test_a_garbage_flood_never_grows_memory(upy):
    upy.exec(
        "u = FloodUART(200000, b'\\r\\nOK\\r\\n')\n"
        "s = S.Scanner(u, max_len=128)\n"
        "gc.collect()\n"
        "before = gc.mem_alloc()\n"
        "r = s.read(5000)\n"
        "gc.collect()\n"
        "grew = gc.mem_alloc() - before\n"
    )
    assert upy.eval("r") == "OK"
    assert upy.eval("u.sent") == 200000
    assert upy.eval("[len(s._buf), s.dropped]") == [128, 1]
    assert upy.eval("grew") < 1024  # chunks come and go; nothing accumulates
    # exactly max_len bytes still fit; one more is an overlong line
    got = upy.eval("lines(FakeUART(b'x' * 128 + b'\\r' + b'y' * 129 + b'\\rEND\\r'), 128)")
    assert got == [["x" * 128, "END"], 0, 1]


def test_timeout_returns_none_even_during_a_flood(upy):
    upy.exec("s = S.Scanner(FakeUART())\nt = time.ticks_ms()\nr = s.read(40)\ndt = time.ticks_diff(time.ticks_ms(), t)")
    assert upy.eval("r") is None
    assert 40 <= upy.eval("dt") < 1000
    upy.exec(
        "s = S.Scanner(FloodUART(None))\nt = time.ticks_ms()\nr = s.read(60)\ndt = time.ticks_diff(time.ticks_ms(), t)"
    )
    assert upy.eval("r") is None
    assert 60 <= upy.eval("dt") < 2000
    # timeout 0 is a poll: what is waiting is looked at, nothing is waited for
    upy.exec(
        "s = S.Scanner(FakeUART(b'NOW\\r'))\nt = time.ticks_ms()\nr = [s.read(0), s.read(0)]\n"
        "dt = time.ticks_diff(time.ticks_ms(), t)"
    )
    assert upy.eval("r") == ["NOW", None]
    assert upy.eval("dt") < 20


def test_scan_drops_a_stale_code_read_before_the_trigger(upy):
    upy.exec("u = FakeUART(b'OLD\\r', replies=[S.ACK + b'NEW\\r'])\ns = S.Scanner(u)\nr = s.scan(100)")
    assert upy.eval("r") == "NEW"


def test_set_command_mode_changes_only_the_mode_bits(upy):
    read_reply = bytes.fromhex("02 00 00 01 E2") + upy.eval("S.crc16(b'\\x00\\x01\\xe2').to_bytes(2, 'big')")
    upy.exec(
        f"u = FakeUART(replies=[{read_reply!r}, S.ACK, S.ACK])\ns = S.Scanner(u)\nok = s.set_command_mode(save=True)"
    )
    assert upy.eval("ok") is True
    assert upy.eval("u.written") == [
        bytes.fromhex("7E 00 07 01 00 00 01") + upy.eval("S.crc16(b'\\x07\\x01\\x00\\x00\\x01').to_bytes(2, 'big')"),
        upy.eval("S.command(0x08, 0x0000, b'\\xe1')"),  # 0xE2: mode bits 10 (continuous) -> 01 (command)
        bytes.fromhex("7E 00 09 01 00 00 00 DE C8"),
    ]
    upy.exec("u = FakeUART()\ns = S.Scanner(u)\nok = s.set_command_mode(timeout_ms=30)")
    assert upy.eval("ok") is False  # no module answering


# ST7789 ----------------------------------------------------------------------------------------------


def test_st7789_init_sequence(upy):
    upy.exec("d, spi = lcd()\ncmds = commands(LOG)")
    cmds = upy.eval("cmds")
    order = [c for c, _ in cmds]
    # SWRESET, SLPOUT, COLMOD, MADCTL, INVON, CASET, RASET, NORON, (the first frame), DISPON
    assert order[:8] == [0x01, 0x11, 0x3A, 0x36, 0x21, 0x2A, 0x2B, 0x13]
    assert order[-1] == 0x29 and order[-2] == 0x2C
    data = dict(cmds[:8])
    assert data[0x3A] == b"\x55" and data[0x36] == b"\x60"
    log = upy.eval("LOG")
    first_spi = next(i for i, e in enumerate(log) if e[0] == "spi")
    assert [e for e in log[:first_spi] if e[0] == "rst"] == [["rst", 1], ["rst", 0], ["rst", 1]]  # reset first
    assert log[-1] == ["bl", 1]  # backlight only once the panel shows the (black) first frame
    assert upy.eval("[d.width, d.height, len(d.buffer)]") == [240, 135, 4050]


def test_st7789_show_windows_with_the_tdisplay_offsets(upy):
    upy.exec("d, spi = lcd()\nLOG.clear()\nd.show()\ncmds = commands(LOG)")
    cmds = upy.eval("cmds")
    assert [c for c, _ in cmds] == [0x2A, 0x2B, 0x2C]
    assert cmds[0][1] == bytes.fromhex("0028 0117")  # columns 40..279
    assert cmds[1][1] == bytes.fromhex("0035 00BB")  # rows 53..187
    assert len(cmds[2][1]) == 240 * 135 * 2
    # portrait on the same panel: 135 wide at column 52, 240 high at row 40
    upy.exec(
        "d, spi = lcd(width=135, height=240, x_off=52, y_off=40, madctl=0)\nLOG.clear()\nd.show()\ncmds = commands(LOG)"
    )
    cmds = upy.eval("cmds")
    assert cmds[0][1] == bytes.fromhex("0034 00BA") and cmds[1][1] == bytes.fromhex("0028 0117")


def test_st7789_rgb565_of_a_known_pattern(upy):
    upy.exec(
        "d, spi = lcd()\n"
        "d.fb.fill(0)\n"
        "d.fb.pixel(0, 0, 1)\n"
        "d.fb.hline(0, 1, 240, 1)\n"
        "d.fb.pixel(239, 134, 1)\n"
        "d.fb.pixel(7, 50, 1)\n"
        "d.fb.pixel(8, 50, 1)\n"
        "LOG.clear()\n"
        "d.show()\n"
        "px = commands(LOG)[-1][1]\n"
    )
    px = upy.eval("px")
    assert len(px) == 240 * 135 * 2

    def at(x, y):
        return px[2 * (240 * y + x) : 2 * (240 * y + x) + 2]

    white = {(0, 0), (239, 134), (7, 50), (8, 50)} | {(x, 1) for x in range(240)}
    for x, y in white:
        assert at(x, y) == b"\xff\xff", (x, y)
    assert at(1, 0) == at(6, 50) == at(9, 50) == at(0, 2) == at(239, 133) == b"\x00\x00"
    assert sum(1 for i in range(0, len(px), 2) if px[i : i + 2] == b"\xff\xff") == len(white)
    assert sum(1 for i in range(0, len(px), 2) if px[i : i + 2] == b"\x00\x00") == 240 * 135 - len(white)
    # other colours go out big-endian, as the panel reads them
    upy.exec("d.colors(fg=0xF800, bg=0x001F)\nLOG.clear()\nd.show()\npx = commands(LOG)[-1][1]")
    assert upy.eval("px[0:4]") == b"\xf8\x00\x00\x1f"


def test_st7789_show_uses_only_the_line_buffer(upy):
    upy.exec(
        "d, spi = lcd(record=False)\n"
        "spi.biggest = 0\n"
        "spi.count = 0\n"
        "gc.collect()\n"
        "before = gc.mem_alloc()\n"
        "d.show()\n"
        "grew = gc.mem_alloc() - before\n"
    )
    assert upy.eval("len(d.line)") == 480
    assert upy.eval("spi.biggest") == 480  # one 240-pixel row per write, never a frame
    assert upy.eval("spi.count") == 240 * 135 * 2 + 3 + 8  # pixels + CASET/RASET/RAMWR + 2 windows
    assert upy.eval("grew") < 1024  # no 64 KB colour frame, nothing per row (135 rows)


def test_st7789_power_and_backlight(upy):
    upy.exec(
        "d, spi = lcd()\nLOG.clear()\nd.power(False)\noff = commands(LOG)\nbl_off = ('bl', 0) in LOG\n"
        "LOG.clear()\nd.power(True)\non = commands(LOG)"
    )
    assert [c for c, _ in upy.eval("off")] == [0x28, 0x10]
    assert upy.eval("bl_off")
    assert [c for c, _ in upy.eval("on")] == [0x11, 0x29]


# SSD1306 wrapper -------------------------------------------------------------------------------------

FAKE_SSD1306 = """
import framebuf

class SSD1306_I2C(framebuf.FrameBuffer):
    def __init__(self, width, height, i2c, addr=0x3C, external_vcc=False):
        self.args = (width, height, i2c, addr, external_vcc)
        self.buffer = bytearray(width * height // 8)
        super().__init__(self.buffer, width, height, framebuf.MONO_VLSB)
        self.shown = 0
        self.on = True

    def show(self):
        self.shown += 1

    def poweroff(self):
        self.on = False

    def poweron(self):
        self.on = True

    def contrast(self, c):
        self.level = c
"""


def test_oled_wrapper_imports_ssd1306_only_when_a_display_is_made(upy, tmp_path):
    # without ssd1306 on the path: the module imports, make() says what is missing
    upy.exec("from paytoken.drivers import oled")
    with pytest.raises(MicroPythonError) as exc:
        upy.exec("oled.make('i2c')")
    assert exc.value.kind == "ImportError"
    (tmp_path / "ssd1306.py").write_text(FAKE_SSD1306)
    with MicroPython(heapsize="256K", extra_path=[tmp_path]) as proc:
        proc.exec(
            "import framebuf\nfrom paytoken.drivers import oled\n"
            "d = oled.make('i2c0', 128, 64, 0x3C)\n"
            "d.fb.fill(0)\nd.fb.text('OK', 0, 0, 1)\nd.show()\nd.power(False)\n"
        )
        assert proc.eval("[d.width, d.height, isinstance(d.fb, framebuf.FrameBuffer), d.dev.shown, d.dev.on]") == [
            128,
            64,
            True,
            1,
            False,
        ]
        assert proc.eval("d.dev.args") == [128, 64, "i2c0", 0x3C, False]
        assert proc.eval("d.fb.pixel(1, 1)") == 1  # drawing lands in the driver's own buffer


# unix_sim board --------------------------------------------------------------------------------------


def read_pbm(path: Path) -> tuple[int, int, list[list[int]]]:
    """A raw PBM (P4) as rows of 0/1, 1 = lit on the display (PBM's 0, white)."""
    data = path.read_bytes()
    magic, dims, rest = data.split(b"\n", 2)
    assert magic == b"P4"
    w, h = map(int, dims.split())
    stride = (w + 7) // 8
    assert len(rest) == stride * h
    return w, h, [[0 if rest[y * stride + x // 8] & (0x80 >> (x % 8)) else 1 for x in range(w)] for y in range(h)]


def test_sim_display_writes_a_pbm_the_harness_can_read(upy, tmp_path):
    out = tmp_path / "screen.pbm"
    upy.exec(
        "import board\n"
        f"sd = board.display(path={str(out)!r})\n"
        "sd.fb.fill(0)\n"
        "sd.fb.rect(0, 0, 128, 64, 1)\n"
        "sd.fb.fill_rect(10, 20, 3, 2, 1)\n"
        "sd.show()\n"
    )
    assert upy.eval("[sd.width, sd.height, sd.frames]") == [128, 64, 1]
    w, h, rows = read_pbm(out)
    assert (w, h) == (128, 64)
    lit = {(x, y) for y in range(h) for x in range(w) if rows[y][x]}
    border = {(x, 0) for x in range(128)} | {(x, 63) for x in range(128)} | {(0, y) for y in range(64)}
    border |= {(127, y) for y in range(64)}
    assert lit == border | {(x, y) for x in range(10, 13) for y in range(20, 22)}
    assert not (tmp_path / "screen.pbm.tmp").exists()
    # every show() replaces the file
    upy.exec("sd.fb.fill(1)\nsd.show()")
    assert all(all(r) for r in read_pbm(out)[2])
    assert upy.eval("sd.frames") == 2


def test_sim_display_terminal_picture(upy):
    upy.exec(
        "import board, io\n"
        "term = io.StringIO()\n"
        "sd = board.display(stream=term, width=8, height=4)\n"
        "sd.fb.fill(0)\n"
        "sd.fb.pixel(0, 0, 1)\nsd.fb.pixel(1, 1, 1)\nsd.fb.pixel(2, 0, 1)\nsd.fb.pixel(2, 1, 1)\n"
        "sd.fb.hline(0, 3, 8, 1)\n"
        "sd.show()\n"
    )
    assert upy.eval("term.getvalue()") == "FRAME 1 8x4\n▀▄█\n▄▄▄▄▄▄▄▄\n"


def test_sim_display_path_from_the_environment(tmp_path, monkeypatch, firmware_build):
    out = tmp_path / "env.pbm"
    monkeypatch.setenv("PAYTOKEN_SIM_DISPLAY", str(out))
    with MicroPython(heapsize="256K") as proc:
        proc.exec("import board\nd = board.display()\nd.fb.pixel(5, 6, 1)\nd.show()")
    w, h, rows = read_pbm(out)
    assert (w, h) == (128, 64) and rows[6][5] == 1 and sum(map(sum, rows)) == 1


def test_sim_buttons_press_and_command_file(upy, tmp_path):
    cmd = tmp_path / "buttons.txt"
    upy.exec(
        "import board\n"
        "bev = []\n"
        f"sb = board.buttons(lambda n, e: bev.append((n, e)), path={str(cmd)!r})\n"
        "sb.press('confirm')\n"
        "sb.press('down', 'long')\n"
        "sb.press('up', 100, bounces=7)\n"
    )
    assert upy.eval("sb.names") == ["confirm", "up", "down"]
    assert upy.eval("bev") == [
        ["confirm", "press"],
        ["confirm", "short"],
        ["down", "press"],
        ["down", "long"],
        ["down", "release"],
        ["up", "press"],
        ["up", "short"],
    ]
    with pytest.raises(MicroPythonError) as exc:
        upy.exec("sb.press('nope')")
    assert exc.value.kind == "ValueError"
    # the harness appends commands to a file; poll() runs the new ones once
    upy.exec("bev.clear()\nsb.poll()")
    assert upy.eval("bev") == []
    cmd.write_text("up\nconfirm long\n")
    upy.exec("sb.poll()")
    with cmd.open("a") as f:
        f.write("down 50\ncon")  # a half-written line waits for its end
    upy.exec("sb.poll()\nsb.poll()")
    assert upy.eval("bev") == [
        ["up", "press"],
        ["up", "short"],
        ["confirm", "press"],
        ["confirm", "long"],
        ["confirm", "release"],
        ["down", "press"],
        ["down", "short"],
    ]


def test_sim_scanner_round_trip(upy, tmp_path):
    codes = tmp_path / "codes.txt"
    upy.exec(
        "import board\n"
        f"sc = board.scanner(path={str(codes)!r})\n"
        "sc.feed('PAY:ONE')\n"
        "sc.feed('PAY:TWO')\n"
        "r = [sc.scan(100), sc.scan(100), sc.scan(30)]\n"
    )
    assert upy.eval("r") == ["PAY:ONE", "PAY:TWO", None]  # one code per trigger, then nothing in view
    assert upy.eval("[sc.uart.triggers, sc.replies]") == [3, 3]
    assert upy.eval("bytes(sc.uart.written[:9])") == bytes.fromhex("7E 00 08 01 00 02 01 AB CD")
    codes.write_text("FROM:FILE\n")
    assert upy.eval("sc.scan(100)") == "FROM:FILE"
    # a base45 text may start or end with a space (one of its characters): the file's line is shown as it is
    with open(codes, "a") as f:
        f.write(" 72%:Q:SQL \r\n")
    assert upy.eval("sc.scan(100)") == " 72%:Q:SQL "
    # raw bytes on the wire go through the real driver's parsing
    upy.exec("sc.feed_raw(b'\\x02\\x00\\x00\\x01\\x00\\x33\\x31RAW\\r\\n')")
    assert upy.eval("sc.read(0)") == "RAW"


# ESP32 boards (fake machine module) -------------------------------------------------------------------

FAKE_MACHINE = r"""
import sys
CALLS = []

class Pin:
    IN = 1
    OUT = 3
    PULL_UP = 2
    IRQ_FALLING = 2
    IRQ_RISING = 1

    def __init__(self, n, mode=-1, pull=-1, value=None):
        self.n = n
        self.level = 1 if value is None else value
        CALLS.append(("Pin", n, mode, pull, value))

    def value(self, v=None):
        if v is None:
            return self.level
        self.level = v

    def irq(self, trigger=None, handler=None):
        CALLS.append(("irq", self.n, trigger))

class I2C:
    def __init__(self, bus, sda=None, scl=None, freq=None):
        CALLS.append(("I2C", bus, sda.n, scl.n, freq))

class SPI:
    def __init__(self, bus, baudrate=0, polarity=0, phase=0, sck=None, mosi=None):
        CALLS.append(("SPI", bus, baudrate, polarity, phase, sck.n, mosi.n))
        self.bytes = 0

    def write(self, b):
        self.bytes += len(b)

class UART:
    def __init__(self, bus, baudrate=0, tx=None, rx=None, rxbuf=None):
        CALLS.append(("UART", bus, baudrate, tx, rx, rxbuf))

    def any(self):
        return 0

    def read(self, n=-1):
        return None

    def write(self, b):
        return len(b)

class _Machine:
    pass

m = _Machine()
for _k in ("Pin", "I2C", "SPI", "UART", "CALLS"):
    setattr(m, _k, globals()[_k])
sys.modules["machine"] = m
"""


@pytest.mark.parametrize("board", ESP32_BOARDS)
def test_esp32_board_wires_the_drivers_from_board_json(board, tmp_path, firmware_build):
    out = tmp_path / "fw"
    fwbuild.build(out, board)
    pkgs = tmp_path / "pkgs"
    shutil.copytree(out / "board", pkgs / board)  # importable beside the unix_sim `board`
    (pkgs / "fakemachine.py").write_text(FAKE_MACHINE)
    (pkgs / "ssd1306.py").write_text(FAKE_SSD1306)
    info = json.loads((ROOT / "boards" / board / "board.json").read_text())
    with MicroPython(heapsize="512K", extra_path=[pkgs]) as proc:
        proc.exec(f"import framebuf, fakemachine\nimport {board} as bd\nev = []")
        assert proc.eval("bd.INFO") == info
        proc.exec("d = bd.display()\nb = bd.buttons(lambda n, e: ev.append((n, e)))\ns = bd.scanner()")
        assert proc.eval("[d.width, d.height]") == [info["display"]["width"], info["display"]["height"]]
        assert proc.eval("isinstance(d.fb, framebuf.FrameBuffer)")
        proc.exec("d.fb.fill(1)\nd.show()")
        calls = [tuple(c) for c in proc.eval("fakemachine.CALLS")]
        assert proc.eval("b.names") == [x["name"] for x in info["buttons"]]
        assert proc.eval("type(s).__name__") == "Scanner"
        # the USB service's needs: the chip, and the first button read at power-on (not held: the app runs)
        proc.exec("u = bd.usb()")
        assert proc.eval("[u.chip, u.service_requested()]") == [info["chip"], False]
    sc = info["scanner"]
    assert ("UART", sc["uart"], sc["baud"], sc["tx"], sc["rx"], sc["rxbuf"]) in calls
    for btn in info["buttons"]:
        assert ("Pin", btn["pin"], 1, 2 if btn["pull_up"] else None, None) in calls
        assert ("irq", btn["pin"], 3) in calls
    d = info["display"]
    if d["driver"] == "ssd1306":
        assert ("I2C", d["i2c"], d["sda"], d["scl"], d["freq"]) in calls
    else:
        assert ("SPI", d["spi"], d["baud"], 0, 0, d["sclk"], d["mosi"]) in calls
        for sig in ("dc", "cs", "rst", "bl"):
            assert any(c[0] == "Pin" and c[1] == d[sig] and c[2] == 3 for c in calls), sig


# Board folders ---------------------------------------------------------------------------------------

REQUIRED = {"name", "description", "chip", "display", "buttons", "scanner", "ble", "wifi", "mip"}
ESP32_REQUIRED = {"flash_offset"}


@pytest.mark.parametrize("board", BOARDS)
def test_board_json_parses_and_has_the_required_keys(board):
    info = json.loads((ROOT / "boards" / board / "board.json").read_text())
    assert REQUIRED <= set(info), REQUIRED - set(info)
    assert info["name"] == board
    assert {"driver", "width", "height"} <= set(info["display"])
    names = [b["name"] for b in info["buttons"]]
    assert names and len(set(names)) == len(names) and "confirm" in names
    assert isinstance(info["ble"], bool) and isinstance(info["wifi"], bool) and isinstance(info["mip"], list)
    if info["chip"] == "none":
        return
    assert ESP32_REQUIRED <= set(info)
    assert int(info["flash_offset"], 16) == 0x1000
    if info["display"]["driver"] == "ssd1306":
        assert "ssd1306" in info["mip"]
    # no GPIO wired twice
    pins = [b["pin"] for b in info["buttons"]]
    pins += [info["scanner"][k] for k in ("tx", "rx")]
    d = info["display"]
    pins += [d[k] for k in ("sda", "scl", "mosi", "sclk", "cs", "dc", "rst", "bl") if k in d]
    assert len(pins) == len(set(pins)), pins
    assert all(isinstance(p, int) and 0 <= p <= 39 for p in pins)
    # GPIO 34-39 are inputs only on the ESP32
    outputs = [info["scanner"]["tx"]] + [
        d[k] for k in ("sda", "scl", "mosi", "sclk", "cs", "dc", "rst", "bl") if k in d
    ]
    assert all(p < 34 for p in outputs)


@pytest.mark.parametrize("board", BOARDS)
def test_every_board_compiles(board, tmp_path):
    out = tmp_path / "fw"
    files = fwbuild.build(out, board)
    assert out / "board" / "__init__.mpy" in files
    assert (out / "board" / "board.json").exists()
    for name in ("buttons", "scanner", "st7789", "oled"):
        assert (out / "lib" / "paytoken" / "drivers" / f"{name}.mpy").exists()


@pytest.mark.parametrize("board", ESP32_BOARDS)
def test_esp32_board_modules_use_only_esp32_api(board):
    missing = []
    for path in sorted((ROOT / "boards" / board).rglob("*.py")):
        for line, module, name in external_uses(path):
            if stub_file(module) is None:
                missing.append(f"{path.name} line {line}: module {module!r}")
            elif name is not None and name not in stub_names(module):
                missing.append(f"{path.name} line {line}: {module}.{name}")
    assert not missing, "\n".join(missing)
