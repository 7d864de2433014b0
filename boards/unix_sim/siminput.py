# The unix_sim board's simulated buttons and scanner (docs/simulator.md), loaded by board.buttons() and
# board.scanner() when first called; the harness drives them through files.

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
        # only the line ending goes: a space is one of base45's characters, so a QR text may start or end with one
        return [p.decode().rstrip("\r") for p in parts if p.strip()]


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

