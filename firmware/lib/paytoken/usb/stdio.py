# The USB serial port of an ESP32 board for the framed service: MicroPython's stdin/stdout (the USB-UART
# bridge's UART0, or the native USB CDC of an S3/C3) as raw bytes. Ctrl-C is switched off
# (micropython.kbd_intr(-1)) so a 0x03 byte in a frame does not interrupt the firmware; while the service
# runs nothing else may print.
import select
import sys

import micropython


class StdioPort:
    def __init__(self):
        micropython.kbd_intr(-1)
        self._in = sys.stdin.buffer
        self._out = sys.stdout.buffer
        self._poll = select.poll()
        self._poll.register(sys.stdin, select.POLLIN)

    def read(self, n, ms):
        if not self._poll.poll(ms):
            return b""
        return self._in.read(1)  # one byte is known to be there; read(n) would wait for all n

    def write(self, data):
        self._out.write(data)
