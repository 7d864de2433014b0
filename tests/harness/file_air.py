# Runs on MicroPython: a radio between two processes through files in one folder, with the transport
# interface of paytoken.ble (docs/architecture.md, "Transport"), for the two-process tests and heap budgets
# (tests/harness/app_side.py). Small on purpose: what it costs in the heap stands in for the BLE layer's.
#
#   folder/adv          the payee is advertising (holds the QR nonce, hex); absent: UNREACHABLE
#   folder/conn         a payer asked to connect (holds a connection number); the payee takes it in accept()
#   folder/serving      the payee is serving a payer: others get BUSY
#   folder/<n>.payer    messages the payer sent on connection n, one hex line each; "CLOSE" ends it
#   folder/<n>.payee    the same from the payee
import asyncio
import os
from binascii import hexlify, unhexlify
from time import ticks_add, ticks_diff, ticks_ms

from paytoken import link
from paytoken.link import LinkError

POLL_MS = 5


def _exists(p):
    try:
        os.stat(p)
        return True
    except OSError:
        return False


def _put(p, text):
    with open(p + ".tmp", "w") as f:
        f.write(text)
    os.rename(p + ".tmp", p)


def _rm(p):
    try:
        os.remove(p)
    except OSError:
        pass


class FileLink:
    def __init__(self, folder, n, side, peer):
        self._out = "%s/%d.%s" % (folder, n, side)
        self._in = "%s/%d.%s" % (folder, n, peer)
        self._pos = 0
        self._closed = False
        self._peer_closed = False

    @property
    def closed(self):
        if not self._closed and not self._peer_closed:
            self._peek()
        return self._closed or self._peer_closed

    def _lines(self):
        try:
            with open(self._in) as f:
                f.seek(self._pos)
                data = f.read()
        except OSError:
            return []
        end = data.rfind("\n") + 1
        self._pos += end
        return data[:end].split()

    def _peek(self):
        # only notices a CLOSE that is the next line; messages stay for recv()
        try:
            with open(self._in) as f:
                f.seek(self._pos)
                if f.readline().strip() == "CLOSE":
                    self._peer_closed = True
        except OSError:
            pass

    async def send(self, msg):
        if self.closed:
            raise LinkError(link.CLOSED)
        with open(self._out, "a") as f:
            f.write(hexlify(msg).decode())
            f.write("\n")

    async def recv(self, timeout_ms):
        deadline = ticks_add(ticks_ms(), timeout_ms)
        while True:
            if self._closed:
                raise LinkError(link.CLOSED)
            try:
                with open(self._in) as f:
                    f.seek(self._pos)
                    line = f.readline()
            except OSError:
                line = ""
            if line.endswith("\n"):
                self._pos += len(line)
                line = line.strip()
                if line == "CLOSE":
                    self._peer_closed = True
                    raise LinkError(link.CLOSED)
                return unhexlify(line)
            if ticks_diff(deadline, ticks_ms()) <= 0:
                raise LinkError(link.TIMEOUT)
            await asyncio.sleep_ms(POLL_MS)

    def close(self):
        if not self._closed:
            self._closed = True
            with open(self._out, "a") as f:
                f.write("CLOSE\n")


class PayeeRadio:
    def __init__(self, folder, addr=b"\xc2\x11\x22\x33\x44\x55"):
        self.folder = folder
        self.addr = addr

    def address(self):
        return 1, self.addr

    def start(self, nonce):
        _put(self.folder + "/adv", hexlify(nonce).decode())

    def stop(self):
        _rm(self.folder + "/adv")
        _rm(self.folder + "/serving")
        _rm(self.folder + "/conn")

    async def accept(self, timeout_ms):
        deadline = ticks_add(ticks_ms(), timeout_ms)
        p = self.folder + "/conn"
        while not _exists(p):
            if ticks_diff(deadline, ticks_ms()) <= 0:
                raise LinkError(link.TIMEOUT)
            await asyncio.sleep_ms(POLL_MS)
        with open(p) as f:
            n = int(f.read())
        _put(self.folder + "/serving", str(n))
        _rm(p)
        return FileLink(self.folder, n, "payee", "payer")


class PayerRadio:
    def __init__(self, folder):
        self.folder = folder

    async def connect(self, addr_type, addr, nonce, timeout_ms):
        f = self.folder
        if not _exists(f + "/adv"):
            raise LinkError(link.UNREACHABLE)
        if _exists(f + "/serving") or _exists(f + "/conn"):
            raise LinkError(link.BUSY)
        n = ticks_ms() & 0xFFFFFF
        _put(f + "/conn", str(n))
        return FileLink(f, n, "payer", "payee")
