# The unix_sim board's simulated display (docs/simulator.md), loaded by board.display() when first called.
# Apart from the buttons and the scanner (board.siminput): a payee terminal, which has neither, does not
# carry their code in its heap.
import os
import struct
from binascii import crc32

import framebuf


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


