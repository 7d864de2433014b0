# QR scanner module on a UART: Grow GM65 / GM861 style (also sold as DFRobot DFR0660, Waveshare
# "Barcode Scanner Module"), 9600 8N1 by default, 3.3 V logic.
#
#   s = Scanner(uart, max_len=512)   uart: machine.UART or anything with read(n), write(b), any()
#   s.trigger()                      command-triggered scan: the module reads until a code or its timeout
#   s.read(timeout_ms=0)             -> the next decoded text (str), or None if none came in time
#   s.scan(timeout_ms=5000)          trigger() then read()
#   s.set_command_mode(save=False)   one-time set-up: read-modify-write of zone bit 0x0000 (see below)
#
# Serial command format (Grow GM65 user manual, "Serial Port Instruction", "Read Zone Bit", "Write Zone
# Bit", "Save zone bit to EEPROM"; Grow's later modules such as the GM812 and GM861 use the same frames):
#   host -> module  7E 00 | type | len | address (2, big-endian) | data | CRC (2)
#       type 07 read zone bits (data = count), 08 write zone bits (data = the bytes), 09 save to EEPROM
#   module -> host  02 00 | type (00 = success) | len | data | CRC (2)
#   CRC: CRC-CCITT (polynomial 0x1021, initial 0, MSB first, no final XOR) over the bytes between the
#   head and the CRC; a host sending AB CD in its place tells the module not to check.
# Command-triggered scanning: with the module in command mode (zone bit 0x0000, bits 1-0 = 01), writing
# 1 to zone bit 0x0002 starts one read: 7E 00 08 01 00 02 01 AB CD. The module answers
# 02 00 00 01 00 33 31 at once and then, if it decodes a code, sends the text followed by the
# terminator it is set up for: CR, LF and CR LF are all accepted.
#
# Parsing: one fixed buffer of max_len bytes. A longer line is garbage (no payment QR is that long:
# version 10 holds under 400 characters) and is dropped up to its terminator, so a flood without
# terminators never grows memory. Response frames (02 00 ...) are skipped where a line would start;
# control characters other than tab are dropped; a line that is not UTF-8 is dropped.
from time import sleep_ms, ticks_add, ticks_diff, ticks_ms

TRIGGER = b"\x7e\x00\x08\x01\x00\x02\x01\xab\xcd"  # write zone bit 0x0002 = 1, CRC not checked
ACK = b"\x02\x00\x00\x01\x00\x33\x31"  # "write succeeded", CRC 0x3331 (for tests and the simulator)

_CHUNK = 64  # most bytes taken from the UART in one read(): bounds that allocation
_POLL_MS = 5


def crc16(data, crc=0):
    for b in data:
        crc ^= b << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
        crc &= 0xFFFF
    return crc


def command(kind, address, data):
    # A host -> module frame with its CRC: command(0x07, 0x000A, b'\x01') reads zone bit 0x000A.
    body = bytes((kind, len(data), address >> 8, address & 0xFF)) + bytes(data)
    c = crc16(body)
    return b"\x7e\x00" + body + bytes((c >> 8, c & 0xFF))


class Scanner:
    def __init__(self, uart, max_len=512):
        self.uart = uart
        self._buf = bytearray(max_len)
        self._n = 0
        self._drop = False  # inside an overlong line: discard up to its terminator
        self._frame = 0  # bytes of a response frame seen so far (0: not in one)
        self._frame_len = 0  # its full length once known
        self._reply = bytearray(8)  # head of the last response frame: 02 00 type len data...
        self.replies = 0  # response frames seen (ACKs included)
        self.dropped = 0  # overlong or undecodable lines thrown away
        self._pend = b""  # the last chunk read from the UART (at most _CHUNK bytes)
        self._pos = 0

    def trigger(self):
        self.uart.write(TRIGGER)

    def scan(self, timeout_ms=5000):
        self.clear()  # a code read before this trigger is stale
        self.trigger()
        return self.read(timeout_ms)

    def read(self, timeout_ms=0):
        deadline = ticks_add(ticks_ms(), timeout_ms)
        budget = self.uart.any()  # what is already waiting is always looked at, even with timeout 0
        while True:
            line = self._drain()
            if line is not None:
                return line
            n = self.uart.any()
            if n and (budget > 0 or ticks_diff(deadline, ticks_ms()) > 0):
                self._pend = self.uart.read(min(n, _CHUNK)) or b""
                self._pos = 0
                budget -= len(self._pend)
                continue
            if ticks_diff(deadline, ticks_ms()) <= 0:
                return None
            sleep_ms(_POLL_MS)

    def clear(self):
        # forget buffered input (a stale code from before the last trigger)
        while self.uart.any():
            if not self.uart.read(_CHUNK):
                break
        self._pend = b""
        self._pos = 0
        self._n = 0
        self._drop = False
        self._frame = 0

    def _drain(self):
        # bytes of the last chunk not looked at yet: after a line ends, the rest waits for the next read
        p = self._pend
        i = self._pos
        while i < len(p):
            line = self._byte(p[i])
            i += 1
            if line is not None:
                self._pos = i
                return line
        self._pos = i
        return None

    def _byte(self, b):
        # One byte in; the finished line (str) when it ends one, else None.
        if self._frame:
            return self._frame_byte(b)
        if b == 0x0D or b == 0x0A:
            n = self._n
            self._n = 0
            if self._drop:
                self._drop = False
                return None
            if not n:
                return None  # the LF of a CR LF, or an empty line
            try:
                return str(self._buf[:n], "utf-8")
            except UnicodeError:
                self.dropped += 1
                return None
        if self._n == 0 and b == 0x02 and not self._drop:
            self._frame = 1  # 02 where a line starts: a response frame (data lines are text)
            self._reply[0] = b
            return None
        if b < 0x20 and b != 0x09:
            return None
        if self._drop:
            return None
        if self._n == len(self._buf):
            self._n = 0
            self._drop = True
            self.dropped += 1
            return None
        self._buf[self._n] = b
        self._n += 1
        return None

    def _frame_byte(self, b):
        k = self._frame
        if k < len(self._reply):
            self._reply[k] = b
        if k == 1 and b != 0x00:
            self._frame = 0  # not 02 00: a stray STX, and this byte starts the line
            return self._byte(b)
        if k == 3:
            self._frame_len = 4 + (b or 256) + 2  # head, type, len, data, CRC
        k += 1
        if k >= 4 and k == self._frame_len:
            self._frame = 0
            self.replies += 1
        else:
            self._frame = k
        return None

    def set_command_mode(self, save=False, timeout_ms=500):
        # Zone bit 0x0000 holds LED, sound, aim and light settings besides the mode in bits 1-0: read it,
        # change only the mode. True when the module confirmed; save=True also stores it in its EEPROM.
        self.clear()
        self.uart.write(command(0x07, 0x0000, b"\x01"))
        if not self._await_reply(timeout_ms) or self._reply[3] != 1:
            return False
        value = (self._reply[4] & 0xFC) | 0x01
        self.uart.write(command(0x08, 0x0000, bytes((value,))))
        if not self._await_reply(timeout_ms):
            return False
        if save:
            self.uart.write(command(0x09, 0x0000, b"\x00"))
            return self._await_reply(timeout_ms)
        return True

    def _await_reply(self, timeout_ms):
        # True when the next response frame says success (type 00); text lines meanwhile are dropped
        seen = self.replies
        deadline = ticks_add(ticks_ms(), timeout_ms)
        while self.replies == seen:
            if self.read(0) is not None:
                continue
            if ticks_diff(deadline, ticks_ms()) <= 0:
                return False
            sleep_ms(_POLL_MS)
        return self._reply[2] == 0x00
