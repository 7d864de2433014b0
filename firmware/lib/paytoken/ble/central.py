# The payer's side of the BLE transport: a GATT client that reaches the payee of a scanned QR
# (docs/protocol.md section 9).
#
#   link = await connect(ble, addr_type, addr, nonce, timeout_ms)
#
# 1. gap_connect to the QR's address; if that fails or times out, a scan for the paytoken service with the
#    QR nonce's tag in the advertising data (gatt.adv_matches), then gap_connect to the device found;
# 2. discover the service, its two characteristics and the notify characteristic's CCCD: a device that does
#    not offer them is UNREACHABLE;
# 3. ATT MTU exchange (our preference set first with config(mtu=...));
# 4. subscribe (CCCD <- 01 00), write OPEN, wait for READY (or BUSY: LinkError(BUSY)).
# Every step is bounded by the one timeout_ms. Then frames go out as writes with response, one at a time,
# and notifications come back through the Reassembler.
import asyncio
from time import ticks_add, ticks_diff, ticks_ms

import bluetooth
from micropython import const

from paytoken.ble import gatt
from paytoken.ble.conn import BleLink
from paytoken.ble.irq import dispatcher
from paytoken.framing import MAX_FRAME, MIN_FRAME, Reassembler
from paytoken.link import CLOSED, TIMEOUT, UNREACHABLE, LinkError

_IRQ_SCAN_RESULT = const(5)
_IRQ_SCAN_DONE = const(6)
_IRQ_PERIPHERAL_CONNECT = const(7)
_IRQ_PERIPHERAL_DISCONNECT = const(8)
_IRQ_GATTC_SERVICE_RESULT = const(9)
_IRQ_GATTC_SERVICE_DONE = const(10)
_IRQ_GATTC_CHARACTERISTIC_RESULT = const(11)
_IRQ_GATTC_CHARACTERISTIC_DONE = const(12)
_IRQ_GATTC_DESCRIPTOR_RESULT = const(13)
_IRQ_GATTC_DESCRIPTOR_DONE = const(14)
_IRQ_GATTC_WRITE_DONE = const(17)
_IRQ_GATTC_NOTIFY = const(18)
_IRQ_MTU_EXCHANGED = const(21)
_IRQ_CONNECTION_UPDATE = const(27)

_HS_ENOTCONN = const(7)  # NimBLE status of a procedure cut short by the link's end

_IDLE = const(0)
_CONNECTING = const(1)
_SCANNING = const(2)
_CONNECTED = const(3)

DIRECT_MS = const(2000)  # longest gap_connect attempt (MicroPython's default scan_duration_ms); at most half
#                          the time given, so that the scan fallback has the rest
CONN_INTERVAL_US = (15000, 30000)  # requested connection interval: min, max
SCAN_INTERVAL_US = const(30000)  # scan window = interval: listen all the time while looking for the payee
# Both beyond NimBLE's supervision timeout (2.56 s): a payee that vanished is reported as CLOSED by the stack
# first; these only end a link that stays up without moving.
WRITE_TIMEOUT_MS = const(6000)  # a write with response unanswered this long ends the session (TIMEOUT)
WRITE_STALL_MS = const(6000)  # a write refused (ENOMEM) for this long ends the session (TIMEOUT)


def prepare(ble, mtu=gatt.PREFERRED_MTU, max_message=gatt.SESSION_MESSAGE):
    # The Central that connect() with the same mtu and max_message uses (made now if not yet).
    d = dispatcher(ble)
    c = d.central
    if c is None or c.mtu != mtu or c.max_message != max_message:
        if c is not None and c._link is not None:
            c._link.close()
        c = Central(ble, mtu, max_message)
        d.central = c
    return c


async def connect(ble, addr_type, addr, nonce, timeout_ms, mtu=gatt.PREFERRED_MTU, max_message=gatt.SESSION_MESSAGE):
    """Reach the payee of a QR (address, nonce) and open a session: a paytoken Link.

    LinkError(UNREACHABLE) when neither the address nor a scan finds a payee offering the service,
    LinkError(BUSY) when the payee serves another payer, LinkError(TIMEOUT) when a step overruns timeout_ms,
    LinkError(CLOSED) when the connection drops on the way. A link still open from before is closed.
    """
    return await prepare(ble, mtu, max_message).connect(addr_type, addr, nonce, timeout_ms)


class Central:
    # The GATT client role: its buffers (Reassembler, frame buffer) are allocated once and serve every
    # connection. One connection at a time.

    def __init__(self, ble, mtu=gatt.PREFERRED_MTU, max_message=gatt.SESSION_MESSAGE):
        if not MIN_FRAME + 3 <= mtu <= MAX_FRAME + 3:
            raise ValueError("mtu out of range")
        self.ble = ble
        self.mtu = mtu
        self.max_message = max_message
        self._rx = Reassembler(max_message)
        self._txbuf = bytearray(mtu - 3)
        self._flag = asyncio.ThreadSafeFlag()
        self._svc = bluetooth.UUID(gatt.SERVICE_UUID)
        self._wu = bluetooth.UUID(gatt.WRITE_UUID)
        self._nu = bluetooth.UUID(gatt.NOTIFY_UUID)
        self._cccd_uuid = bluetooth.UUID(gatt.CCCD_UUID)
        self._addr = bytearray(6)
        self._interval_ms = 15  # connection interval (what we ask for) until an update tells
        self._link = None
        self.irq_error = None
        self._reset()

    def _reset(self):
        self._phase = _IDLE
        self._conn = None
        self._lost = False  # the connection dropped before the link existed
        self._failed = False  # the connection attempt ended without a connection
        self._stray = None  # a connection completing after its attempt was given up
        self._tag = None
        self._found = False
        self._found_type = 0
        self._scan_done = False
        self._start = 0
        self._end = 0
        self._wh = 0
        self._nh = 0
        self._nend = 0
        self._cccd = 0
        self._done = 0
        self._status = 0
        self._mtu_done = False
        self.att_mtu = gatt.DEFAULT_MTU
        self.via_scan = False  # the last connect() found the payee by scanning

    async def connect(self, addr_type, addr, nonce, timeout_ms):
        if self._link is not None:
            self._link.close()
            self._link = None
        self._reset()
        self._tag = gatt.nonce_tag(nonce)
        deadline = ticks_add(ticks_ms(), timeout_ms)
        ble = self.ble
        if not ble.active():
            ble.active(True)
        ble.config(mtu=self.mtu)
        try:
            if not await self._connect_to(addr_type, addr, deadline, 2):
                if not await self._scan(deadline):
                    raise LinkError(UNREACHABLE, "no payee at the address or by its nonce")
                self.via_scan = True
                if not await self._connect_to(self._found_type, self._addr, deadline):
                    raise LinkError(UNREACHABLE, "payee found by scan, connection failed")
            link = BleLink(self, self._conn, self._rx, self._txbuf, gatt.DEFAULT_MTU, True)
            self._link = link
            await self._discover(deadline)
            if not self._mtu_done:  # the payee may have started the exchange itself
                try:
                    ble.gattc_exchange_mtu(self._conn)
                except OSError:
                    pass  # already under way, or the connection is gone: the wait below tells
                await self._until(lambda: self._mtu_done, deadline, "MTU exchange")
            link.set_mtu(min(self.att_mtu, self.mtu))
            await self._write(link, gatt.CCCD_NOTIFY, self._cccd, deadline)
            await self._write(link, gatt.OPEN_FRAME, self._wh, deadline)
            await link._wait(link.rx_flag, lambda: link._open, deadline, "no READY")
            self._phase = _CONNECTED
            return link
        except BaseException as e:
            self._abort()
            if isinstance(e, OSError):
                raise LinkError(CLOSED, "bluetooth: errno %d" % e.errno)
            raise

    def _abort(self):
        # Undo whatever connect() had under way.
        phase = self._phase
        self._phase = _IDLE
        try:
            if phase == _SCANNING:
                self.ble.gap_scan(None)
            elif phase == _CONNECTING:
                self.ble.gap_connect(None)
        except OSError:
            pass
        link = self._link
        if link is not None:
            if link._err is None:
                link._fail(CLOSED, "connect abandoned")
            link._shutdown()
        elif self._conn is not None and not self._lost:
            self._disconnect(self._conn)

    async def _until(self, test, deadline, what):
        # Wait on connect-phase events; TIMEOUT at the deadline, CLOSED if the connection drops meanwhile.
        while not test():
            if self._stray is not None:
                self._disconnect(self._stray)
                self._stray = None
            if self._lost or (self._link is not None and self._link._err is not None):
                link = self._link
                if link is not None and link._err != CLOSED:
                    raise LinkError(link._err, link._detail)
                raise LinkError(CLOSED, "disconnected during " + what)
            left = ticks_diff(deadline, ticks_ms())
            if left <= 0:
                raise LinkError(TIMEOUT, what)
            try:
                await asyncio.wait_for_ms(self._flag.wait(), left)
            except asyncio.TimeoutError:
                pass

    async def _connect_to(self, addr_type, addr, deadline, share=1):
        # One gap_connect attempt for up to DIRECT_MS and 1/share of the time left; True once connected, False
        # if it failed or ran out of time.
        left = ticks_diff(deadline, ticks_ms())
        if left <= 0:
            return False
        dur = min(DIRECT_MS, left // share)
        self._phase = _CONNECTING
        self._failed = False
        self._conn = None
        try:
            self.ble.gap_connect(addr_type, addr, dur, CONN_INTERVAL_US[0], CONN_INTERVAL_US[1])
        except OSError:
            self._phase = _IDLE
            return False
        # NimBLE ends the attempt itself after dur; the margin covers its report.
        until = ticks_add(ticks_ms(), dur + 500)
        if ticks_diff(until, deadline) > 0:
            until = deadline
        try:
            await self._until(lambda: self._conn is not None or self._failed, until, "connection")
        except LinkError:
            pass
        if self._conn is not None:
            self._phase = _CONNECTED
            return True
        self._phase = _IDLE
        if not self._failed:
            try:
                self.ble.gap_connect(None)
            except OSError:
                pass
        return False

    async def _scan(self, deadline):
        # A scan for the service with the QR nonce's tag, for up to half the time left.
        left = ticks_diff(deadline, ticks_ms())
        if left < 200:
            return False
        self._found = False
        self._scan_done = False
        self._phase = _SCANNING
        try:
            self.ble.gap_scan(left // 2, SCAN_INTERVAL_US, SCAN_INTERVAL_US, False)
        except OSError:
            self._phase = _IDLE
            return False
        try:
            await self._until(lambda: self._found or self._scan_done, deadline, "scan")
        except LinkError:
            pass
        self._phase = _IDLE
        if not self._scan_done:
            try:
                self.ble.gap_scan(None)
            except OSError:
                pass
        return self._found

    async def _discover(self, deadline):
        conn = self._conn
        await self._step(self.ble.gattc_discover_services, (conn, self._svc), _IRQ_GATTC_SERVICE_DONE, deadline)
        if not self._end:
            raise LinkError(UNREACHABLE, "no paytoken service")
        args = (conn, self._start, self._end)
        await self._step(self.ble.gattc_discover_characteristics, args, _IRQ_GATTC_CHARACTERISTIC_DONE, deadline)
        if not (self._wh and self._nh):
            raise LinkError(UNREACHABLE, "paytoken service without its characteristics")
        end = self._nend if self._nend > self._nh else self._end  # the notify characteristic's last handle
        if end > self._nh:
            # NimBLE's ble_gattc_disc_all_dscs takes the value handle and searches from the handle after it.
            args = (conn, self._nh, end)
            await self._step(self.ble.gattc_discover_descriptors, args, _IRQ_GATTC_DESCRIPTOR_DONE, deadline)
        if not self._cccd:
            raise LinkError(UNREACHABLE, "notify characteristic without CCCD")

    async def _step(self, call, args, done, deadline):
        # One discovery procedure, until its *_DONE event. A procedure cut by the link's end reports NimBLE's
        # BLE_HS_ENOTCONN before the disconnect event: CLOSED. Any other failure: the device does not offer
        # the service as it should, UNREACHABLE.
        self._done = 0
        call(*args)
        await self._until(lambda: self._done == done, deadline, "discovery")
        if self._status == _HS_ENOTCONN:
            raise LinkError(CLOSED, "disconnected during discovery")
        if self._status:
            raise LinkError(UNREACHABLE, "discovery failed: status %d" % self._status)

    # --- role interface for BleLink --------------------------------------------------------------------------

    async def _write(self, link, frame, handle=0, deadline=None):
        # One write with response; waits for _IRQ_GATTC_WRITE_DONE. ENOMEM: the same frame again after a
        # connection interval, for up to WRITE_STALL_MS.
        link.wstatus = -1
        link.tx_flag.clear()
        await link.paced(self.ble.gattc_write, handle or self._wh, frame, WRITE_STALL_MS, self._interval_ms, "write",
                         1)
        if deadline is None:
            deadline = ticks_add(ticks_ms(), WRITE_TIMEOUT_MS)
        await link._wait(link.tx_flag, lambda: link.wstatus >= 0, deadline, "write response")
        if link.wstatus != 0:
            link._fail(CLOSED, "write status %d" % link.wstatus)
            raise LinkError(CLOSED, link._detail)

    def _release(self, link, linger=False):
        # Writes are acknowledged: once send() returned the payee has every frame, nothing to linger for.
        if self._link is link:
            self._disconnect(link.conn)

    def _link_failed(self, link):
        self._flag.set()

    def _disconnect(self, conn):
        try:
            self.ble.gap_disconnect(conn)
        except OSError:
            pass

    # --- IRQ (via paytoken.ble.irq) -------------------------------------------------------------------------

    def owns(self, conn):
        return conn == self._conn

    def _irq(self, event, data):
        if event == _IRQ_GATTC_NOTIFY:
            conn, handle, frame = data
            link = self._link
            if link is not None and conn == link.conn and handle == self._nh:
                link._on_frame(frame)
            return None
        if event == _IRQ_GATTC_WRITE_DONE:
            conn, _, status = data
            link = self._link
            if link is not None and conn == link.conn:
                link.wstatus = status
                link.tx_flag.set()
            return None
        if event == _IRQ_SCAN_RESULT:
            if self._phase == _SCANNING and not self._found:
                addr_type, addr, adv_type, _, adv = data
                if adv_type <= 1 and gatt.adv_matches(adv, self._tag):  # ADV_IND, ADV_DIRECT_IND
                    self._addr[:] = addr
                    self._found_type = addr_type
                    self._found = True
        elif event == _IRQ_SCAN_DONE:
            self._scan_done = True
        elif event == _IRQ_PERIPHERAL_CONNECT:
            if self._phase == _CONNECTING and self._conn is None:
                self._conn = data[0]
            else:
                self._stray = data[0]
        elif event == _IRQ_PERIPHERAL_DISCONNECT:
            conn = data[0]
            if self._conn is not None and conn == self._conn:
                self._lost = True
                link = self._link
                if link is not None:
                    link._dropped()
            elif self._phase == _CONNECTING:
                self._failed = True
        elif event == _IRQ_GATTC_SERVICE_RESULT:
            conn, start, end, uuid = data
            if conn == self._conn and bluetooth.UUID(uuid) == self._svc:
                self._start = start
                self._end = end
        elif event == _IRQ_GATTC_CHARACTERISTIC_RESULT:
            conn, end, value, props, uuid = data
            if conn == self._conn:
                u = bluetooth.UUID(uuid)
                if u == self._wu and props & gatt.PROP_WRITE:
                    self._wh = value
                elif u == self._nu and props & gatt.PROP_NOTIFY:
                    self._nh = value
                    self._nend = end
        elif event == _IRQ_GATTC_DESCRIPTOR_RESULT:
            conn, handle, uuid = data
            if conn == self._conn and not self._cccd and bluetooth.UUID(uuid) == self._cccd_uuid:
                self._cccd = handle
        elif (
            event == _IRQ_GATTC_SERVICE_DONE
            or event == _IRQ_GATTC_CHARACTERISTIC_DONE
            or event == _IRQ_GATTC_DESCRIPTOR_DONE
        ):
            if data[0] == self._conn:
                self._done = event
                self._status = data[1]
        elif event == _IRQ_MTU_EXCHANGED:
            conn, mtu = data
            if conn == self._conn:
                self.att_mtu = mtu
                self._mtu_done = True
                link = self._link
                if link is not None:
                    link.set_mtu(min(mtu, self.mtu))
        elif event == _IRQ_CONNECTION_UPDATE:
            if data[4] == 0:
                self._interval_ms = max(8, data[1] * 5 // 4)
        self._flag.set()
        return None

    def _irq_failed(self, exc):
        self.irq_error = exc
        link = self._link
        if link is not None:
            link._fail(CLOSED, "IRQ handler: %r" % exc)
        self._flag.set()
