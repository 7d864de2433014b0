# The payee's side of the BLE transport: a GATT server with paytoken's service, advertising the nonce tag of
# the QR on display, serving one payer at a time (docs/protocol.md section 9).
#
#   p = Peripheral(ble, "paytoken-1234")    registers the service (advertising must be off)
#   p.address()                             (addr_type, addr) for the QR
#   p.start(qr_nonce)                       advertise (again, with a new nonce tag after each QR)
#   p.advertise(adv)                        the same with other advertising data (the sync service's)
#   p.register()                            the service registered again after another one replaced it
#   link = await p.accept(timeout_ms)       the next payer that opened a session: a paytoken Link
#   p.stop()                                advertising off, every central but the served one disconnected
#
# A central is served once it has subscribed and written OPEN (NimBLE reports no CCCD writes, so OPEN is the
# only sign that a central is ready for notifications); accept() answers READY. One payer per start(): the
# payee keeps advertising, and any other central that writes OPEN before the next start() gets BUSY and is
# disconnected: its connect() raises LinkError(BUSY). Centrals that do not open within ADMIT_MS are
# disconnected.
import asyncio
from time import ticks_add, ticks_diff, ticks_ms

import bluetooth
from micropython import const

from paytoken.ble import gatt
from paytoken.ble.conn import BleLink
from paytoken.ble.irq import dispatcher
from paytoken.framing import MAX_FRAME, MIN_FRAME, Reassembler
from paytoken.link import BUSY, CLOSED, TIMEOUT, LinkError

_IRQ_CENTRAL_CONNECT = const(1)
_IRQ_CENTRAL_DISCONNECT = const(2)
_IRQ_GATTS_WRITE = const(3)
_IRQ_MTU_EXCHANGED = const(21)
_IRQ_CONNECTION_UPDATE = const(27)

# What a connected central is: [state, deadline (ticks_ms), ATT_MTU] in self._conns.
_NEW = const(0)  # connected, has not written OPEN yet (disconnected at the deadline)
_SERVED = const(1)  # wrote OPEN first after start(): accept() serves it
_REFUSE = const(2)  # wrote OPEN after another: BUSY goes out next
_REFUSED = const(3)  # BUSY sent: disconnected at the deadline unless it leaves first
_DROP = const(4)  # broke the opening rules: disconnected next
_GONE = const(5)  # disconnect requested
_LINGER = const(6)  # its session ended normally: disconnected at the deadline unless it leaves first

ADMIT_MS = const(10000)  # a central has this long from connecting to writing OPEN
GRACE_MS = const(1000)  # a refused central has this long to leave by itself
LINGER_MS = const(3000)  # after close(), so that notifications still queued in the stack go out (the payer
#                          normally disconnects first, once it has the last message)
# A notification refused (ENOMEM) for this long ends the session (TIMEOUT). Beyond NimBLE's supervision timeout
# (2.56 s): buffers stay taken only while the link does not move, and a payer that vanished is reported as
# CLOSED by the stack first.
NOTIFY_STALL_MS = const(6000)
_TICK_MS = const(250)  # housekeeping period


class Peripheral:
    def __init__(self, ble, name, mtu=gatt.PREFERRED_MTU, max_message=gatt.SESSION_MESSAGE, uuids=None):
        # uuids: (service, write, notify) of another service with the same link (the sync service), else paytoken's
        if not MIN_FRAME + 3 <= mtu <= MAX_FRAME + 3:
            raise ValueError("mtu out of range")
        if not ble.active():
            ble.active(True)
        self.ble = ble
        self.name = name
        self._mtu = mtu
        self._uuids = uuids or (gatt.SERVICE_UUID, gatt.WRITE_UUID, gatt.NOTIFY_UUID)
        self.register()
        self._rx = Reassembler(max_message)
        self._txbuf = bytearray(mtu - 3)
        self._conns = {}
        self._serving = None  # handle of the central admitted (state _SERVED) until its session ends
        self._link = None  # its BleLink, once accept() made it
        self._accepted = False  # a payer was accepted since start(): every other one is refused until the next
        self._adv = None
        self._resp = gatt.scan_response(name)
        self._advertising = False
        self._readvertise = False
        self._interval_ms = 15  # connection interval, for pacing: the payer asks for 15..30 ms; updates tell
        self._accept_flag = asyncio.ThreadSafeFlag()
        self._hk_flag = asyncio.ThreadSafeFlag()
        self._task = None
        self.irq_error = None

    def register(self):
        """(Re)register this peripheral's service and take the GATT server's events: at start, and again after
        another service (sync mode) replaced it. OSError(EBUSY) while advertising or connected."""
        ble = self.ble
        ble.config(gap_name=self.name, mtu=self._mtu)
        ble.gap_advertise(None)  # services can only be registered while not advertising
        s, w, n = self._uuids
        chars = ((bluetooth.UUID(w), bluetooth.FLAG_WRITE), (bluetooth.UUID(n), bluetooth.FLAG_NOTIFY))
        ((self._wh, self._nh),) = ble.gatts_register_services(((bluetooth.UUID(s), chars),))
        # Remote writes longer than the buffer are cut; append mode would merge frames.
        ble.gatts_set_buffer(self._wh, self._mtu - 3, False)
        dispatcher(ble).peripheral = self

    def address(self):
        """(addr_type, addr): this radio's address as ble.config('mac') reports it, for the QR."""
        addr_type, addr = self.ble.config("mac")
        return addr_type, bytes(addr)

    def start(self, qr_nonce):
        """Advertise (connectable) for the QR with this nonce; call again with each new QR's nonce."""
        self.advertise(gatt.adv_payload(qr_nonce))

    def advertise(self, adv):
        """Advertise (connectable) with this advertising data; one central per call, as start()."""
        self._adv = adv
        self._advertising = True
        self._accepted = False
        self.ble.gap_advertise(gatt.ADV_INTERVAL_US, adv_data=self._adv, resp_data=self._resp, connectable=True)
        self._run()

    def stop(self):
        """Stop advertising and disconnect every central not being served. The served link, if any, is closed
        (CLOSED); its connection lingers up to LINGER_MS so that its last notifications still go out."""
        self._advertising = False
        try:
            self.ble.gap_advertise(None)
        except OSError:
            pass
        link = self._link
        if link is not None:
            link.close()
        for conn, st in list(self._conns.items()):
            if st[0] != _LINGER and st[0] != _GONE:
                self._drop(conn, st)
        self._serving = None
        self._run()

    def _run(self):
        # The housekeeping task runs while advertising or while any central is connected.
        if self._task is None:
            self._task = asyncio.create_task(self._housekeeping())
        self._hk_flag.set()

    async def accept(self, timeout_ms):
        """The Link of the first payer that opens a session after start(); LinkError(TIMEOUT) if none does in
        time. One payer per start(): from then until the next start() every other central gets BUSY, and a
        second accept() raises LinkError(BUSY)."""
        link = self._link
        if link is not None:
            if not link.closed:
                raise LinkError(BUSY, "a session is open")
            link._shutdown()
        if self._accepted:
            raise LinkError(BUSY, "one payer per start()")
        deadline = ticks_add(ticks_ms(), timeout_ms)
        while True:
            conn = self._serving
            st = self._conns.get(conn) if conn is not None else None
            if st is not None and st[0] == _SERVED and self._link is None:
                link = BleLink(self, conn, self._rx, self._txbuf, min(st[2], self._mtu), False)
                self._link = link
                try:
                    await self._write(link, gatt.READY_FRAME)
                    self._accepted = True
                    return link
                except LinkError:
                    link._shutdown()
                    continue
            left = ticks_diff(deadline, ticks_ms())
            if left <= 0:
                raise LinkError(TIMEOUT, "no payer")
            try:
                await asyncio.wait_for_ms(self._accept_flag.wait(), left)
            except asyncio.TimeoutError:
                pass

    # --- role interface for BleLink --------------------------------------------------------------------------

    async def _write(self, link, frame):
        # One notification; on ENOMEM (the stack is out of buffers) wait a connection interval and send the
        # same frame again, for up to NOTIFY_STALL_MS.
        await link.paced(self.ble.gatts_notify, self._nh, frame, NOTIFY_STALL_MS, self._interval_ms, "notify")
        await asyncio.sleep_ms(0)  # let the stack's and other tasks run between frames

    def _release(self, link, linger=False):
        if self._link is link:
            self._link = None
        if self._serving == link.conn:
            self._serving = None
        st = self._conns.get(link.conn)
        if st is None:
            return
        if linger:
            st[0] = _LINGER
            st[1] = ticks_add(ticks_ms(), LINGER_MS)
            self._run()
        else:
            self._drop(link.conn, st)

    def _link_failed(self, link):
        self._hk_flag.set()  # housekeeping disconnects it now, whatever the app is doing

    def _disconnect(self, conn):
        try:
            self.ble.gap_disconnect(conn)
        except OSError:
            pass

    # --- housekeeping task: everything the IRQ hands over ----------------------------------------------------

    async def _housekeeping(self):
        try:
            while self._advertising or self._conns:
                try:
                    await asyncio.wait_for_ms(self._hk_flag.wait(), _TICK_MS)
                except asyncio.TimeoutError:
                    pass
                self._tend()
        finally:
            self._task = None

    def _tend(self):
        if self._readvertise:
            # NimBLE stops advertising when a central connects: advertise on, so that another payer can
            # connect and be told BUSY (fails quietly while every connection slot is taken).
            self._readvertise = False
            if self._advertising:
                try:
                    self.ble.gap_advertise(gatt.ADV_INTERVAL_US, adv_data=self._adv, resp_data=self._resp)
                except OSError:
                    pass
        link = self._link
        if link is not None and link.closed:
            link._shutdown()
        now = ticks_ms()
        for conn, st in list(self._conns.items()):
            s = st[0]
            if s == _REFUSE:
                try:
                    self.ble.gatts_notify(conn, self._nh, gatt.BUSY_FRAME)
                except OSError:
                    pass  # it is disconnected at the deadline all the same
                st[0] = _REFUSED
                st[1] = ticks_add(now, GRACE_MS)
            elif s == _DROP or (s != _SERVED and ticks_diff(now, st[1]) >= 0):
                if s == _GONE:  # no disconnect event came: forget it
                    self._conns.pop(conn, None)
                    continue
                if self._serving == conn:
                    self._serving = None
                self._drop(conn, st)

    def _drop(self, conn, st):
        st[0] = _GONE
        st[1] = ticks_add(ticks_ms(), GRACE_MS)
        self._disconnect(conn)

    # --- IRQ (via paytoken.ble.irq) -------------------------------------------------------------------------

    def owns(self, conn):
        return conn in self._conns

    def _irq(self, event, data):
        if event == _IRQ_GATTS_WRITE:
            conn, attr = data
            if attr == self._wh:
                self._on_write(conn, self.ble.gatts_read(attr))
        elif event == _IRQ_CENTRAL_CONNECT:
            self._conns[data[0]] = [_NEW, ticks_add(ticks_ms(), ADMIT_MS), gatt.DEFAULT_MTU]
            self._readvertise = True
            self._hk_flag.set()
        elif event == _IRQ_CENTRAL_DISCONNECT:
            conn = data[0]
            self._conns.pop(conn, None)
            if self._serving == conn:
                self._serving = None
            link = self._link
            if link is not None and link.conn == conn:
                self._link = None
                link._dropped()
            self._readvertise = True
            self._hk_flag.set()
            self._accept_flag.set()
        elif event == _IRQ_MTU_EXCHANGED:
            conn, mtu = data
            st = self._conns.get(conn)
            if st is not None:
                st[2] = mtu
            link = self._link
            if link is not None and link.conn == conn:
                link.set_mtu(min(mtu, self._mtu))
        elif event == _IRQ_CONNECTION_UPDATE:
            if data[4] == 0:
                self._interval_ms = max(8, data[1] * 5 // 4)  # units of 1.25 ms
        return None

    def _on_write(self, conn, data):
        link = self._link
        if link is not None and link.conn == conn:
            link._on_frame(data)
            return
        st = self._conns.get(conn)
        if st is None:
            return
        if st[0] == _NEW and data == gatt.OPEN_FRAME:
            if self._serving is None and not self._accepted:
                st[0] = _SERVED
                self._serving = conn
                self._accept_flag.set()
            else:
                st[0] = _REFUSE
                self._hk_flag.set()
        elif st[0] == _NEW or st[0] == _SERVED:
            # Data before READY, or anything but OPEN first: not a payer that follows the protocol.
            st[0] = _DROP
            if self._serving == conn:
                self._serving = None
            self._hk_flag.set()

    def _irq_failed(self, exc):
        self.irq_error = exc
        link = self._link
        if link is not None:
            link._fail(CLOSED, "IRQ handler: %r" % exc)
        self._hk_flag.set()
