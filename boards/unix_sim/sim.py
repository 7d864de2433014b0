# The unix_sim board's simulated display, buttons and scanner (docs/simulator.md). Loaded by
# board.display() / buttons() / scanner() when first called, so code that only needs board.flash (the
# ledger bench, the power-cut tests) does not pay for it in the heap.
import os
import struct
from binascii import crc32

import framebuf

from paytoken.drivers.buttons import Debouncer
from paytoken.drivers.scanner import ACK, TRIGGER, Scanner


class _Tail:
    # New lines appended to a file since the last look (the harness appends; a shorter file restarts).
    def __init__(self, path):
        self.path = path
        self.offset = 0
        self.partial = b""

    def lines(self):
        try:
            with open(self.path, "rb") as f:
                f.seek(0, 2)
                size = f.tell()
                if size < self.offset:
                    self.offset = 0
                    self.partial = b""
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return []
        self.offset += len(data)
        data = self.partial + data
        parts = data.split(b"\n")
        self.partial = parts.pop()
        return [p.decode().strip() for p in parts if p.strip()]


# Display ---------------------------------------------------------------------------------------------


def _chunk(kind, data):
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc32(kind + data) & 0xFFFFFFFF)


def _adler32(data):
    a, b = 1, 0
    for x in data:
        a = (a + x) % 65521
        b = (b + a) % 65521
    return b << 16 | a


class SimDisplay:
    def __init__(self, width=128, height=64, path=None, stream=None):
        self.width = width
        self.height = height
        self.buffer = bytearray(((width + 7) // 8) * height)
        # MONO_HLSB: rows of whole bytes, most significant bit leftmost, as in a raw PBM (P4)
        self.fb = framebuf.FrameBuffer(self.buffer, width, height, framebuf.MONO_HLSB)
        self.path = path
        self.stream = stream
        self.frames = 0  # show() calls so far
        self.on = True

    def show(self):
        self.frames += 1
        if self.path:
            self.save(self.path)
        if self.stream is not None:
            # A header line, so a reader of the device's output (the demo) can tell frames from the rest
            self.stream.write("FRAME %d %dx%d\n" % (self.frames, self.width, self.height))
            self.stream.write(self.render())
            self.stream.write("\n")

    def power(self, on):
        self.on = bool(on)

    def pbm(self):
        # PBM's 1 is black: lit pixels (fb 1) come out white, as on the device
        head = b"P4\n%d %d\n" % (self.width, self.height)
        return head + bytes(b ^ 0xFF for b in self.buffer)

    def png(self):
        # 1-bit greyscale PNG: its 1 is white, so the MONO_HLSB rows go in as they are (lit = white).
        # The zlib stream uses stored blocks: no compressor needed, and a 128x64 frame is ~1.1 KB.
        row = (self.width + 7) // 8
        raw = bytearray()
        mv = memoryview(self.buffer)
        for y in range(self.height):
            raw.append(0)  # filter: none
            raw.extend(mv[y * row:(y + 1) * row])
        z = bytearray(b"\x78\x01")
        for i in range(0, len(raw), 65535):
            block = raw[i:i + 65535]
            n = len(block)
            z.append(1 if i + 65535 >= len(raw) else 0)
            z.extend(struct.pack("<HH", n, n ^ 0xFFFF))
            z.extend(block)
        z.extend(struct.pack(">I", _adler32(raw)))
        ihdr = struct.pack(">IIBBBBB", self.width, self.height, 1, 0, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", z) + _chunk(b"IEND", b"")

    def save(self, path):
        # PNG, or PBM for a path ending in .pbm; written beside, then renamed: a reader never sees half
        # a frame.
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(self.pbm() if path.endswith(".pbm") else self.png())
        os.rename(tmp, path)

    def render(self):
        # Two pixel rows per text line with Unicode half blocks; lit = block
        px = self.fb.pixel
        out = []
        for y in range(0, self.height, 2):
            row = []
            for x in range(self.width):
                top = px(x, y)
                bottom = px(x, y + 1) if y + 1 < self.height else 0
                row.append("█" if top and bottom else "▀" if top else "▄" if bottom else " ")
            out.append("".join(row).rstrip())
        return "\n".join(out)


# Buttons ---------------------------------------------------------------------------------------------


class SimButtons:
    # Each press runs through the real Debouncer on a virtual millisecond clock, bounces and all, and the
    # callback gets its events before press() returns.
    def __init__(self, callback, names, settle_ms=20, long_ms=800, path=None):
        self.names = tuple(names)
        self.settle_ms = settle_ms
        self.long_ms = long_ms
        self.now = 0  # virtual ms
        self.presses = 0
        self._deb = {}
        for n in self.names:
            self._deb[n] = Debouncer(self._emitter(callback, n), settle_ms, long_ms)
        self._tail = _Tail(path) if path else None

    @staticmethod
    def _emitter(callback, name):
        return lambda event: callback(name, event)

    def press(self, name, hold="short", bounces=3):
        # hold: "short", "long" or milliseconds held; bounces: contact chatter at each edge (1 ms apart)
        if name not in self._deb:
            raise ValueError("no button %r (have %s)" % (name, ", ".join(self.names)))
        if hold == "short":
            hold = max(2 * self.settle_ms, 60)
        elif hold == "long":
            hold = self.long_ms + 200
        deb = self._deb[name]
        self.presses += 1
        for level in (True, False):
            for i in range(bounces):
                deb.feed((i % 2 == 0) == level, self.now)
                self.now += 1
            deb.feed(level, self.now)
            self.now += hold if level else self.settle_ms + 10
            deb.poll(self.now)
        self.now += 10

    def poll(self, now=None):
        # runs the commands appended to the buttons file: "<name>", "<name> long" or "<name> <ms>"
        if self._tail is None:
            return
        for line in self._tail.lines():
            parts = line.split()
            hold = parts[1] if len(parts) > 1 else "short"
            if hold not in ("short", "long"):
                hold = int(hold)
            self.press(parts[0], hold)

    def pressed(self, name):
        return self._deb[name].pressed

    def close(self):
        pass


# Scanner ---------------------------------------------------------------------------------------------


class SimUART:
    # A GM65 in command mode: acknowledges the trigger, then sends the next code held in front of it
    # (if any) with a CR LF. Everything written is kept in `written`.
    def __init__(self, path=None):
        self.rx = bytearray()
        self.written = bytearray()
        self.presented = []  # codes waiting in front of the camera, oldest first
        self.triggers = 0
        self._tail = _Tail(path) if path else None

    def write(self, data):
        self.written += data
        if bytes(data) == TRIGGER:
            self.triggers += 1
            self.rx += ACK
            self._look()
            if self.presented:
                self.rx += self.presented.pop(0)
        return len(data)

    def _look(self):
        if self._tail is not None:
            for line in self._tail.lines():
                self.presented.append(line.encode() + b"\r\n")

    def any(self):
        return len(self.rx)

    def read(self, n=-1):
        if not self.rx:
            return None
        if n < 0:
            n = len(self.rx)
        out = bytes(self.rx[:n])
        self.rx = self.rx[n:]
        return out


class SimScanner(Scanner):
    def feed(self, text):
        # a QR code held in front of the camera: the next trigger reads it
        self.uart.presented.append(text.encode() + b"\r\n")

    def feed_raw(self, data):
        # bytes on the wire right now, as the module would send them unasked
        self.uart.rx += data


# USB serial ----------------------------------------------------------------------------------------------
class SimUsb:
    # board.usb(): what the firmware's USB service needs of a board (the ESP32 boards' is
    # paytoken.drivers.esp32_usb.Usb). service: the button held at power-on (PAYTOKEN_SIM_SERVICE=1).
    chip = "none"

    def __init__(self, address, service=False):
        self.address = address
        self.service = service

    def service_requested(self):
        return self.service

    def port(self):
        return SimUSB(self.address)

    def rng_entropy(self):
        return None  # the host's getrandom needs no radio

    def reset(self):
        pass  # the process ends after main.py; the harness starts it again, as the chip would boot


class SimUSB:
    # The device's side of its USB serial link: a TCP connection to the host's USB-UART bridge
    # (paytoken_host.simusb), which gives the station a pseudo-terminal. Same interface as
    # paytoken.usb.stdio.StdioPort: read(n, ms) -> 1..n bytes, b"" after ms; EOFError when the bridge is gone.
    def __init__(self, address):
        import select
        import socket

        host, _, port = address.rpartition(":")
        self.sock = socket.socket()
        self.sock.connect(socket.getaddrinfo(host or "127.0.0.1", int(port))[0][-1])
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLIN)

    def read(self, n, ms):
        if not self._poll.poll(ms):
            return b""
        data = self.sock.recv(n)
        if not data:
            raise EOFError("usb: the bridge closed the link")
        return data

    def write(self, data):
        mv = memoryview(data)
        while mv:
            k = self.sock.send(mv)
            mv = mv[k:]
