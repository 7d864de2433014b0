# Sync over USB serial: the request handler of the sync types (docs/protocol.md §11, "Sync requests") that the
# app's USB watcher (paytoken.app.usbwatch) registers on paytoken.usb.service.Service when a relay
# (host/sync_bridge.py) talks on the port. It only carries sealed messages between the relay and the firmware's
# sync client (paytoken.sync_client), which the relay cannot read or forge.
#
#   SYNC_PULL   ()     -> the next sealed message 1, or an empty body: nothing more to say (the sync is over)
#   SYNC_PUSH   (msg2) -> applied u8, then the status summary; E_REFUSED: a damaged or misdirected answer
#                         (nothing applied: pull again), E_SYNC: the backend refused the sync (final)
#   SYNC_STATUS ()     -> the status summary (paytoken.syncwire.status_summary, the same as BLE STATUS's)
# A push repeated byte for byte (the relay did not get the response) gets the same response again, nothing
# applied twice. on_sync(handler) is called when a sync ends (a pull with nothing more to say).
from paytoken.sync_client import SyncClient, SyncError, summary
from paytoken.usb import frames
from paytoken.usb.service import Error


class SyncHandler:
    TYPES = (frames.T_SYNC_PULL, frames.T_SYNC_PUSH, frames.T_SYNC_STATUS)
    stop = None  # the watcher decides when to stop serving

    def __init__(self, wallet, backend_kx, on_sync=None):
        self.wallet = wallet
        self.kx = backend_kx
        self.on_sync = on_sync
        self.client = None  # the sync under way
        self.last = None  # the newest client: its wake hint
        self.applied = 0
        self.syncs = 0
        self._push = None  # (msg2, response body) of the last push taken

    def handle(self, rtype, payload):
        if rtype == frames.T_SYNC_PUSH:
            return self.push(payload)
        if payload:
            raise Error(frames.E_REQUEST, "no payload expected")
        if rtype == frames.T_SYNC_PULL:
            return self.pull()
        return self.summary()

    def pull(self):
        try:
            if self.client is None:
                self.client = self.last = SyncClient(self.wallet, self.kx)
            msg = self.client.request()
        except SyncError as e:
            self.client = None
            raise Error(frames.E_SYNC, str(e))
        if msg is None:
            self.client = None
            self.syncs += 1
            if self.on_sync is not None:
                self.on_sync(self)
            return b""
        return msg

    def push(self, msg2):
        if self._push is not None and self._push[0] == msg2:
            return self._push[1]
        c = self.client
        if c is None:
            raise Error(frames.E_STATE, "no sealed request is waiting for an answer: pull first")
        try:
            n = c.answer(msg2)
        except SyncError as e:
            if e.final:
                self.client = None
                raise Error(frames.E_SYNC, str(e))
            raise Error(frames.E_REFUSED, str(e))
        self.applied += n
        body = bytes((min(n, 255),)) + self.summary()
        self._push = (bytes(msg2), body)
        return body

    def summary(self):
        return summary(self.wallet, self.last)
