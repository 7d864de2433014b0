# The running app's USB watcher: a provisioned device syncs over its USB serial while its app runs (the terminal
# showing its QR, the card ready to scan). An asyncio task looks at the port between the app's turns with a
# non-blocking read of a few bytes; nothing of the USB service or of sync is loaded until a frame arrives. Then
# it loads paytoken.usb.service and paytoken.sync_usb lazily, serves requests until the relay has been quiet for
# IDLE_MS, shows the sync's outcome for a while (screen 'sync', via USB) and unloads what it loaded, so nothing
# of sync is in RAM while paying. While a payment session is under way (app.busy) every request gets E_BUSY,
# built here without loading the frame codec, and the relay asks again later.
#
#   w = UsbWatch(port, app, wallet, backend_kx, screen, log); asyncio.create_task(w.run())
# port: read(n, ms) / write(data) as paytoken.usb.stdio.StdioPort; EOFError ends the watcher (no link).
import asyncio
import sys
from binascii import crc32
from time import ticks_diff, ticks_ms

from micropython import const

POLL_MS = const(50)  # the port is looked at this often
IDLE_MS = const(1500)  # after the relay's last request, serving ends and the sync modules are unloaded
SHOW_MS = const(4000)  # the sync's outcome stays on the screen this long, then the app's screen comes back
_E_BUSY = const(8)  # paytoken.usb.frames.E_BUSY


def busy_frame(rtype):
    # frames.response(rtype, E_BUSY, b"busy: paying"), without the frame codec (binascii is built in)
    body = bytes((1, (rtype & 0x7F) | 0x80, 0, 13, _E_BUSY)) + b"busy: paying"
    return b"PT" + body + (crc32(body) & 0xFFFFFFFF).to_bytes(4, "big")


class _Pushed:
    # The port with the bytes the watcher already read put back in front.
    def __init__(self, port, first):
        self.port = port
        self.first = first

    def read(self, n, ms):
        b = self.first
        if b:
            self.first = b[n:]
            return b[:n]
        return self.port.read(n, ms)

    def write(self, data):
        self.port.write(data)


class UsbWatch:
    def __init__(self, port, app, wallet, backend_kx, screen, log):
        self.port = port
        self.app = app
        self.wallet = wallet
        self.kx = backend_kx
        self.screen = screen
        self.log = log
        self._head = b""  # bytes seen while busy, until a frame's type is known
        self.served = 0  # requests served

    async def run(self):
        while True:
            try:
                b = self.port.read(64, 0)
            except EOFError:
                self.log("usb", "end=closed")
                return
            if not b:
                await asyncio.sleep_ms(POLL_MS)
            elif getattr(self.app, "busy", False):
                self._busy(b)
            else:
                self._head = b""
                await self._serve(b)

    def _busy(self, b):
        h = (self._head + b)[-64:]
        i = h.find(b"PT")
        if i >= 0 and len(h) >= i + 4:
            self.port.write(busy_frame(h[i + 3]))
            h = b""
        self._head = h

    async def _serve(self, first):
        before = set(sys.modules)
        from paytoken import sync_usb
        from paytoken.usb.service import Service

        shown = []
        prev = self.screen.state
        svc = Service(_Pushed(self.port, first))
        h = sync_usb.SyncHandler(self.wallet, self.kx, lambda h: shown.append(self._synced(h)))
        svc.register(h)
        self.log("usb", "sync=start")
        last = ticks_ms()
        while ticks_diff(ticks_ms(), last) < IDLE_MS and not getattr(self.app, "busy", False):
            n = svc.requests
            if svc.serve_one(0) == "closed":
                break
            if svc.requests != n:
                last = ticks_ms()
            else:
                await asyncio.sleep_ms(POLL_MS)
        self.served += svc.requests
        self.log("usb", "sync=end requests=%d syncs=%d applied=%d" % (svc.requests, h.syncs, h.applied))
        svc = h = sync_usb = Service = None
        from paytoken.app.start import forget

        for name in set(sys.modules) - before:
            forget(name)
        if shown:
            await self._restore(prev, shown[-1])

    def _synced(self, h):
        from paytoken.sync_client import counts, field

        text = counts(self.wallet)
        self.log("synced", "applied=%d uploaded=%d balance=%d statuses=%s" % (
            h.applied, h.last.uploaded, self.wallet.balance, field(text)))
        self.screen.show("sync", "USB", "synced", text)
        return self.screen.state

    async def _restore(self, prev, ours):
        t0 = ticks_ms()
        while ticks_diff(ticks_ms(), t0) < SHOW_MS:
            await asyncio.sleep_ms(POLL_MS)
            if self.screen.state is not ours or getattr(self.app, "busy", False):
                return  # the app moved on: its screen stays
        if prev is not None and prev[0] != "sync":
            self.screen.show(*prev)
