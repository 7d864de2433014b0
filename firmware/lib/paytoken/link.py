# A link carries whole protocol messages between one payer and one payee for one session. The apps speak
# only to this interface; BLE GATT (paytoken.ble) is one implementation, Loopback (below) the in-process
# one that app tests and the host tools use.
#
#   await link.send(msg)               one message (bytes); LinkError when it cannot leave
#   msg = await link.recv(timeout_ms)  the next message; LinkError(TIMEOUT | CLOSED | FRAME)
#   link.close()                       idempotent; the peer's recv then fails with CLOSED
#   link.closed                        True once either side closed or the connection dropped
import asyncio

TIMEOUT = "timeout"  # nothing arrived in time
CLOSED = "closed"  # this side closed, the peer closed, or the radio link dropped
FRAME = "frame"  # a frame that does not continue the message (paytoken.framing): the session is over
BUSY = "busy"  # the payee is serving another payer
UNREACHABLE = "unreachable"  # no device answered at the QR's address


class LinkError(Exception):
    def __init__(self, reason, detail=""):
        super().__init__(reason + (": " + detail if detail else ""))
        self.reason = reason


class Loopback:
    # One end of an in-process pair (see pair()). drop_after: the link drops once this end has sent that many
    # messages, which the fault tests use to cut a session at every step.

    def __init__(self, drop_after=None):
        self.peer = None
        self.closed = False
        self.sent = 0
        self.drop_after = drop_after
        self._inbox = []
        self._event = asyncio.Event()

    async def send(self, msg):
        if self.closed:
            raise LinkError(CLOSED)
        if self.drop_after is not None and self.sent >= self.drop_after:
            self.close()
            raise LinkError(CLOSED, "link dropped")
        self.sent += 1
        self.peer._inbox.append(bytes(msg))
        self.peer._event.set()

    async def recv(self, timeout_ms):
        while not self._inbox:
            if self.closed:
                raise LinkError(CLOSED)
            self._event.clear()
            try:
                await asyncio.wait_for_ms(self._event.wait(), timeout_ms)
            except asyncio.TimeoutError:
                raise LinkError(TIMEOUT)
        return self._inbox.pop(0)

    def close(self):
        # Both ends see the drop, as with a radio link; messages already delivered stay readable.
        for end in (self, self.peer):
            if end is not None and not end.closed:
                end.closed = True
                end._event.set()


def pair(drop_after_a=None, drop_after_b=None):
    a, b = Loopback(drop_after_a), Loopback(drop_after_b)
    a.peer, b.peer = b, a
    return a, b
