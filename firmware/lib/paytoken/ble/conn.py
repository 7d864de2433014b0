# One BLE connection as a paytoken Link (paytoken/link.py): messages cut into frames (paytoken.framing) that
# cross as ATT writes (payer -> payee) or notifications (payee -> payer). The role that made the connection
# (peripheral.py or central.py) owns the link: role._write(link, frame) puts one frame on the air, paced and
# bounded in time; role._release(link, linger) disconnects; role._link_failed(link) hears of a failure seen in the IRQ.
#
# Receiving happens in the BLE IRQ: _on_frame() feeds each frame to the Reassembler, which copies it into
# its one preallocated buffer, so nothing waits on the asyncio side between frames and no frame can be lost
# while the app is busy (on an ESP32 a slow IRQ handler holds the NimBLE task, and the link layer's flow
# control holds the sender). Only a completed message is handed over, as a new bytes object.
import asyncio
from errno import ENOMEM
from time import ticks_add, ticks_diff, ticks_ms

from micropython import const

from paytoken.ble import gatt
from paytoken.framing import MIN_FRAME, FrameError, iter_frames
from paytoken.link import BUSY, CLOSED, FRAME, TIMEOUT, LinkError

BACKLOG = const(4)  # received messages not yet taken by recv(): one more ends the session (FRAME)


class BleLink:
    def __init__(self, role, conn, rx, txbuf, mtu, opening):
        self.conn = conn
        self.frame_size = MIN_FRAME
        self._role = role
        self._rx = rx  # the role's Reassembler, reset for this connection
        self._txbuf = txbuf  # the role's frame buffer: iter_frames fills it one frame at a time
        self._msgs = []
        self._err = None  # LinkError reason once the session is over
        self._detail = ""
        self._down = False  # the role has been told to disconnect (or the link dropped)
        self._open = not opening  # a payer's link opens on READY (gatt control frames)
        self._tx_seq = 0
        self._sending = False
        self.rx_flag = asyncio.ThreadSafeFlag()  # a message, READY, or the end of the session
        self.tx_flag = asyncio.ThreadSafeFlag()  # a write response, or the end of the session
        self.wstatus = -1  # status of the last write with response (central)
        # What crossed the air in messages (control frames excluded): frames and ATT payload bytes.
        self.frames_out = 0
        self.bytes_out = 0
        self.frames_in = 0
        self.bytes_in = 0
        self.stalls = 0  # frames the stack refused for lack of buffers (ENOMEM) and that were resent
        rx.reset(0)
        self.set_mtu(mtu)

    async def paced(self, send, handle, frame, stall_ms, interval_ms, what, *mode):
        # Hands one frame to the stack: send(conn, handle, frame, *mode) (gatts_notify or gattc_write). On
        # ENOMEM (NimBLE's transmit buffers are full) the same frame again after a connection interval, for up
        # to stall_ms; any other error, or the stall, ends the session.
        waited = 0
        while True:
            if self._err is not None:
                raise LinkError(self._err, self._detail)
            try:
                send(self.conn, handle, frame, *mode)
                return
            except OSError as e:
                if e.errno != ENOMEM:
                    self._fail(CLOSED, "%s: errno %d" % (what, e.errno))
                    raise LinkError(CLOSED, self._detail)
                if waited >= stall_ms:
                    self._fail(TIMEOUT, what + " stalled")
                    raise LinkError(TIMEOUT, self._detail)
            self.stalls += 1
            await asyncio.sleep_ms(interval_ms)
            waited += interval_ms

    @property
    def closed(self):
        return self._err is not None

    def set_mtu(self, mtu):
        # New messages use frames of ATT_MTU - 3 bytes, never more than the role's buffer.
        self.frame_size = max(MIN_FRAME, min(mtu - 3, len(self._txbuf)))

    # --- IRQ side: short, no waiting, nothing raised -----------------------------------------------------

    def _on_frame(self, data):
        if self._err is not None:
            return
        if not self._open:
            code = gatt.control_code(data)
            if code == gatt.READY:
                self._open = True
                self.rx_flag.set()
            elif code == gatt.BUSY:
                self._fail(BUSY, "the payee is serving another payer")
            else:
                self._fail(FRAME, "expected READY or BUSY")
            return
        self.frames_in += 1
        self.bytes_in += len(data)
        try:
            msg = self._rx.feed(data)
        except FrameError as e:
            self._fail(FRAME, e.reason)
            return
        if msg is not None:
            if len(self._msgs) >= BACKLOG:
                self._fail(FRAME, "backlog")
                return
            self._msgs.append(msg)
            self.rx_flag.set()

    def _fail(self, reason, detail=""):
        if self._err is None:
            self._detail = detail
            self._err = reason
            self._role._link_failed(self)
        self.rx_flag.set()
        self.tx_flag.set()

    def _dropped(self):
        # The connection is gone (disconnect event): nothing left to disconnect.
        self._down = True
        self._fail(CLOSED, "disconnected")

    # --- asyncio side ------------------------------------------------------------------------------------

    def _shutdown(self, linger=False):
        # linger: the session ended normally; the role may leave the connection up a moment so that frames
        # still queued in the stack reach the peer (a notification has no acknowledgement to wait for).
        if not self._down:
            self._down = True
            self._role._release(self, linger)

    def _error(self):
        self._shutdown()
        return LinkError(self._err, self._detail)

    async def send(self, msg):
        """Send one message (1..MAX_MESSAGE bytes); returns once every frame is on its way.

        LinkError(CLOSED | TIMEOUT | FRAME | BUSY) if the session is or gets over; any failure or cancellation
        part-way ends the session, since the peer holds half a message.
        """
        if self._err is not None:
            raise self._error()
        if self._sending:
            raise LinkError(BUSY, "another send is in progress")
        frames = iter_frames(msg, self.frame_size, self._tx_seq, self._txbuf)  # ValueError: bad length
        self._sending = True
        try:
            for f in frames:
                await self._role._write(self, f)
                self.frames_out += 1
                self.bytes_out += len(f)
            self._tx_seq += 1
        except LinkError:
            self._shutdown()
            raise
        except BaseException:  # cancelled mid-message
            self._fail(CLOSED, "send interrupted")
            self._shutdown()
            raise
        finally:
            self._sending = False

    async def recv(self, timeout_ms):
        """The next message (bytes). LinkError(TIMEOUT) when none completes in time (the session stays open);
        LinkError(CLOSED | FRAME | BUSY) once the session is over and every message that arrived was taken."""
        deadline = ticks_add(ticks_ms(), timeout_ms)
        while True:
            if self._msgs:
                return self._msgs.pop(0)
            if self._err is not None:
                raise self._error()
            left = ticks_diff(deadline, ticks_ms())
            if left <= 0:
                raise LinkError(TIMEOUT)
            try:
                await asyncio.wait_for_ms(self.rx_flag.wait(), left)
            except asyncio.TimeoutError:
                pass

    def close(self):
        """End the session and disconnect; idempotent. Messages already received stay readable."""
        self._fail(CLOSED, "closed")
        self._shutdown(True)

    async def _wait(self, flag, test, deadline, what):
        # Wait for test() while the link lives; LinkError(TIMEOUT, what) at the deadline (the session ends).
        while not test():
            if self._err is not None:
                raise LinkError(self._err, self._detail)
            left = ticks_diff(deadline, ticks_ms())
            if left <= 0:
                self._fail(TIMEOUT, what)
                raise LinkError(TIMEOUT, what)
            try:
                await asyncio.wait_for_ms(flag.wait(), left)
            except asyncio.TimeoutError:
                pass
