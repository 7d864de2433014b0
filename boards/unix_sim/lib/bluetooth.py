# bluetooth for the MicroPython unix port: the API, constants, IRQ codes and tuples, limits and errors of
# MicroPython's ESP32 build (NimBLE, synchronous IRQs, pairing built in, no L2CAP), over the simulated radio
# (host/paytoken_host/simradio). fwbuild installs this as the top-level module `bluetooth` of simulator
# firmware. docs/simulator.md ("Radio") has the model and the known differences from an ESP32.
#
# Environment: PAYTOKEN_RADIO = "host:port" of the radio broker (needed by active(True));
# PAYTOKEN_RADIO_NAME = a name for the broker's device list; PAYTOKEN_RADIO_ADDR = "aa:bb:cc:dd:ee:ff" to ask
# for that public address instead of the one the broker assigns.
#
# The GATT server and the client's discovery live in _bluetooth_gatts.py and _bluetooth_gattc.py, imported
# on first use: a module loaded from .mpy sits in the heap on the unix port (on an ESP32 this is C, in flash).
#
# IRQs are delivered synchronously (the handler is called directly, API calls inside it work) by an asyncio
# task that active(True) starts, whenever the asyncio loop runs, or by bluetooth._pump(timeout_ms) in
# synchronous code. Addresses, data and UUIDs handed to the handler are zeroed once it returns, as an ESP32
# reuses that memory: copy what you keep (bytes(data), bluetooth.UUID(uuid)).
import json as _json
import os as _os
import select as _select
import socket as _socket
import sys as _sys
from binascii import hexlify as _hexlify
from binascii import unhexlify as _unhex

from micropython import const

FLAG_READ = const(0x0002)
FLAG_WRITE_NO_RESPONSE = const(0x0004)
FLAG_WRITE = const(0x0008)
FLAG_NOTIFY = const(0x0010)
FLAG_INDICATE = const(0x0020)

_IRQ_CENTRAL_CONNECT = const(1)
_IRQ_CENTRAL_DISCONNECT = const(2)
_IRQ_GATTS_WRITE = const(3)
_IRQ_GATTS_READ_REQUEST = const(4)
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
_IRQ_GATTC_READ_RESULT = const(15)
_IRQ_GATTC_READ_DONE = const(16)
_IRQ_GATTC_WRITE_DONE = const(17)
_IRQ_GATTC_NOTIFY = const(18)
_IRQ_GATTC_INDICATE = const(19)
_IRQ_GATTS_INDICATE_DONE = const(20)
_IRQ_MTU_EXCHANGED = const(21)
_IRQ_CONNECTION_UPDATE = const(27)
_IRQ_GET_SECRET = const(29)
_IRQ_SET_SECRET = const(30)

# errno values as the unix port's errno module has them (an ESP32 uses newlib's numbers: compare with errno.X)
_EIO = const(5)
_E2BIG = const(7)
_ENOMEM = const(12)
_EBUSY = const(16)
_ENODEV = const(19)
_EINVAL = const(22)
_EOPNOTSUPP = const(95)
_ENOTCONN = const(107)
_EALREADY = const(114)
_EAPP = const(-9)  # BLE_HS_EAPP has no errno: MicroPython passes it on negated
_EHCI_PARAMS = const(-530)  # HCI "invalid parameters" (BLE_HS_HCI_ERR(0x12)), negated likewise

# NimBLE status codes in IRQ data
_HS_ENOTCONN = const(7)
_HS_EBADDATA = const(10)

_MTU_MIN = const(23)
_MTU_MAX = const(527)
_MTU_PREF = const(256)  # CONFIG_BT_NIMBLE_ATT_PREFERRED_MTU
_MAX_CONN = const(4)
_MAX_PROCS = const(4)  # CONFIG_BT_NIMBLE_GATT_MAX_PROCS
_MAX_SVCS = const(8)  # MP_BLUETOOTH_NIMBLE_MAX_SERVICES
_ATTR_LEN = const(20)  # MP_BLUETOOTH_DEFAULT_ATTR_LEN
_ADV_MAX = const(31)
_NAME_MAX = const(31)
_BUF = const(528)
_RBUF = const(1152)  # the broker's longest line: an ATT PDU of the largest MTU (527) in hex, and its envelope

# ATT opcodes
_ERR = const(0x01)
_MTU_REQ = const(0x02)
_MTU_RSP = const(0x03)
_FIND_INFO_REQ = const(0x04)
_FIND_INFO_RSP = const(0x05)
_FIND_TYPE_REQ = const(0x06)
_FIND_TYPE_RSP = const(0x07)
_READ_TYPE_REQ = const(0x08)
_READ_TYPE_RSP = const(0x09)
_READ_REQ = const(0x0A)
_READ_RSP = const(0x0B)
_READ_BLOB_REQ = const(0x0C)
_READ_GROUP_REQ = const(0x10)
_READ_GROUP_RSP = const(0x11)
_WRITE_REQ = const(0x12)
_WRITE_RSP = const(0x13)
_NOTIFY = const(0x1B)
_INDICATE = const(0x1D)
_CONFIRM = const(0x1E)
_WRITE_CMD = const(0x52)

# attribute kinds in the GATT server table (handle h is _attrs[h - 1])
_K_SVC = const(0)  # (kind, service uuid, end handle, 0)
_K_CHR = const(1)  # (kind, uuid, properties, value handle)
_K_VAL = const(2)  # (kind, uuid, flags, 0)
_K_CCC = const(3)  # (kind, 0x2902, value handle, 0)
_K_DSC = const(4)  # (kind, uuid, flags, 0)

# GATT client procedures: [kind, handle or prev, end, filter uuid, pending characteristic]
_P_MTU = const(0)
_P_SVC = const(1)
_P_CHR = const(2)
_P_DSC = const(3)
_P_READ = const(4)
_P_WRITE = const(5)
_P_IND = const(6)

_U_SVC = b"\x00\x28"
_U_CHR = b"\x03\x28"
_U_CCC = b"\x02\x29"


def _u16(v):
    return bytes((v & 0xFF, v >> 8 & 0xFF))


def _g16(b, i):
    return b[i] | b[i + 1] << 8


def _bytes(v):
    # C's mp_get_buffer_raise: any object with the buffer protocol (str included), else TypeError
    return bytes(memoryview(v))


def _blocks(n):
    # transmit buffers an n-byte ATT PDU holds until delivered: 256-byte blocks incl. HCI and L2CAP headers
    return (n + 8 + 255) >> 8


class UUID(bytearray):
    # The bytes are the UUID's little-endian value, as bytes(uuid) gives on an ESP32.
    def __init__(self, value):
        if isinstance(value, int):
            if value > 65535:
                raise ValueError("invalid UUID")
            b = bytes((value & 0xFF, value >> 8 & 0xFF))
        else:
            b = _bytes(value)
            if len(b) not in (2, 4, 16):
                h = b.replace(b"-", b"")
                for c in h:
                    if not (48 <= c <= 57 or 65 <= c <= 70 or 97 <= c <= 102):
                        raise ValueError("invalid char in UUID")
                if len(h) != 32:
                    raise ValueError("UUID too long" if len(h) > 32 else "UUID too short")
                b = bytes(reversed(_unhex(h)))
        super().__init__(b)

    def __eq__(self, other):
        return isinstance(other, UUID) and len(other) == len(self) and bytes(other) == bytes(self)

    def __ne__(self, other):
        return not self.__eq__(other)

    def __hash__(self):
        return hash(bytes(self))

    def __repr__(self):
        h = _hexlify(bytes(reversed(self))).decode()
        if len(self) <= 4:
            return "UUID(0x" + h + ")"
        return "UUID('%s-%s-%s-%s-%s')" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])

    __str__ = __repr__


class _Conn:
    def __init__(self, h, central, at, addr):
        self.h = h
        self.central = central  # True: we are the central (the peer is a peripheral)
        self.at = at
        self.addr = addr
        self.mtu = _MTU_MIN
        self.mtx = False  # an MTU exchange was sent or answered
        self.held = 0  # transmit buffers in flight on this link
        self.req = None  # the outstanding ATT request or indication
        self.q = []  # (proc, pdu, blocks) waiting for it
        self.cccd = {}  # value handle -> client configuration (1 notify, 2 indicate)
        self.closing = False


_ble = None


class BLE:
    def __new__(cls):
        global _ble
        if _ble is None:
            _ble = object.__new__(cls)
            _ble._s = None
            _ble._irq = None
            _ble._name = b"MPY ESP32"  # CONFIG_BT_NIMBLE_SVC_GAP_DEVICE_NAME of MicroPython's ESP32 build
            _ble._busy = False
            _ble._depth = 0
            _ble._sec = {}
            _ble._task = None
            _ble._kick = False
            _ble._buf = None
        return _ble

    # ------------------------------------------------------------------ radio on and off

    def active(self, *a):
        if len(a) > 1:
            raise TypeError("function takes at most 2 positional arguments")
        if a:
            if a[0]:
                self._init()  # as mp_bluetooth_init: an active stack is shut down and started afresh
            else:
                self._deinit()
        return self._s is not None

    def _init(self):
        self._deinit()
        env = _os.getenv("PAYTOKEN_RADIO")
        if not env:
            raise OSError(_ENODEV, "bluetooth sim: set PAYTOKEN_RADIO to the radio broker's host:port")
        host, _, port = env.rpartition(":")
        s = _socket.socket()
        try:
            s.connect(_socket.getaddrinfo(host or "127.0.0.1", int(port))[0][-1])
        except (OSError, ValueError):
            s.close()
            raise OSError(_ENODEV, "bluetooth sim: no radio broker at PAYTOKEN_RADIO=" + env)
        if self._buf is None:
            self._buf = bytearray(_BUF)  # IRQ data, as NimBLE's buffers on an ESP32
            self._mvb = memoryview(self._buf)
            self._zero = memoryview(bytes(_BUF))
            self._abuf = bytearray(6)
            self._mva = memoryview(self._abuf)
            self._uuids = {2: UUID(bytes(2)), 4: UUID(bytes(4)), 16: UUID(bytes(16))}
        self._s = s
        self._p = _select.poll()
        self._p.register(s, _select.POLLIN)
        self._rbuf = bytearray(_RBUF)
        self._rmv = memoryview(self._rbuf)
        self._rn = 0
        self._q = []
        self._n = 0
        addr = _os.getenv("PAYTOKEN_RADIO_ADDR")
        self._send(
            '{"t":"hello","v":1,"name":%s,"addr":%s}\n'
            % (_json.dumps(_os.getenv("PAYTOKEN_RADIO_NAME") or ""),
               _json.dumps(addr.replace(":", "").lower() if addr else None))
        )
        for _ in range(50):  # up to 5 s for the welcome
            if self._q or self._s is None:
                break
            self._fill(100)
        w = self._q.pop(0) if self._q else None
        if not isinstance(w, dict) or w.get("t") != "welcome":
            msg = w.get("msg") if isinstance(w, dict) else "no answer"
            self._deinit()
            raise OSError(_ENODEV, "bluetooth sim: the radio broker refused: " + str(msg))
        self._pub = _unhex(w["addr"])
        self._addr = self._pub
        self._at = 0
        self._rpa = False
        self._txmax = self._txfree = w["cfg"]["tx_buffers"]
        self._mtu = _MTU_PREF
        self._conns = {}
        self._adv = self._scan = self._connecting = False
        self._advd = self._resp = b""
        self._procs = 0
        self._chr = False
        self._gatts_reset()
        # NimBLE's sync_cb loads the IRK from the application (pairing is built into the ESP32 port)
        key = b"irk"
        if self._call(_IRQ_GET_SECRET, (10, 0, self._dmv(key))) is None:
            self._call(_IRQ_SET_SECRET, (10, self._dmv(key), memoryview(_os.urandom(16))))
        self._start_reader()

    def _deinit(self):
        s = self._s
        if s is None:
            return
        self._s = None
        try:
            s.write(b'{"t":"bye"}\n')
        except OSError:
            pass
        self._stop_reader()
        s.close()
        self._conns = {}
        self._q = []
        self._adv = self._scan = self._connecting = False

    def _need(self):
        if self._s is None:
            raise OSError(_ENODEV)

    def _lost(self):
        print("bluetooth sim: lost the connection to the radio broker; the radio is off")
        s = self._s
        self._s = None
        self._stop_reader()
        if s:
            s.close()
        self._conns = {}

    # ------------------------------------------------------------------ broker link

    def _send(self, line):
        s = self._s
        if s is None:
            raise OSError(_ENODEV)
        try:
            s.write(line)
        except OSError:
            self._lost()
            raise OSError(_EIO)

    def _tx(self, h, pdu, blocks):
        self._send('{"t":"tx","c":%d,"p":"%s","b":%d}\n' % (h, _hexlify(pdu).decode(), blocks))

    def _fill(self, ms):
        # Read what the broker sent (waiting up to ms). Transmit buffer releases apply at once, as NimBLE
        # frees them from its own task; every other message waits in _q for _pump. The bytes go into one
        # preallocated buffer: NimBLE's own memory is not MicroPython's heap on an ESP32, so the simulated
        # stack must not churn the firmware's heap with a fresh buffer per read.
        s = self._s
        if s is None or not self._p.poll(ms):
            return False
        buf, n = self._rbuf, self._rn
        if n == len(buf):  # a line longer than any the broker sends: drop it
            print("bluetooth sim: a line longer than %d bytes from the radio broker dropped" % n)
            n = 0
        try:  # non-blocking for this read: a socket's readinto otherwise waits until the buffer is full
            s.setblocking(False)
            k = s.readinto(self._rmv[n:])
            s.setblocking(True)
        except OSError:
            k = 0
        if k is None:  # nothing after all (poll said readable)
            return False
        if not k:
            self._lost()
            return False
        n += k
        start = 0
        while True:
            i = buf.find(b"\n", start, n)
            if i < 0:
                break
            line = bytes(self._rmv[start:i])
            start = i + 1
            try:
                m = _json.loads(line)
            except ValueError:
                m = line
            if isinstance(m, dict) and m.get("t") == "done":
                c = self._conns.get(m.get("c"))
                b = m.get("b", 0)
                if c and isinstance(b, int):
                    c.held -= b
                    self._txfree += b
            else:
                self._q.append(m)
        if start:
            self._rmv[: n - start] = self._rmv[start:n]
            n -= start
        self._rn = n
        return True

    def _pump(self, ms=0):
        if self._busy or self._s is None:
            return 0
        self._busy = True
        n = 0
        try:
            while self._fill(0):
                pass
            if not self._q and ms and self._fill(ms):
                while self._fill(0):
                    pass
            while self._q and self._s is not None:
                self._dispatch(self._q.pop(0))
                n += 1
        finally:
            self._busy = False
        return n

    def _start_reader(self):
        try:
            import asyncio
        except ImportError:
            return
        self._core = asyncio.core
        self._ioq = asyncio.core._io_queue
        self._task = asyncio.create_task(self._reader())

    async def _reader(self):
        s = self._s
        while self._s is s:
            yield self._core._io_queue.queue_read(s)
            self._pump(0)

    def _stop_reader(self):
        t = self._task
        self._task = None
        if t is not None and t is not self._core.cur_task:
            t.cancel()

    def _ensure(self):
        # a new asyncio event loop (asyncio.new_event_loop) forgets the reader task: start another
        if self._task is not None and self._core._io_queue is not self._ioq:
            self._start_reader()

    def _dispatch(self, m):
        try:
            t = m["t"]
            if t == "rx":
                c = self._conns.get(m["c"])
                if c:
                    self._att(c, _unhex(m["p"]))
            elif t == "advrep":
                if self._scan:
                    self._call(
                        _IRQ_SCAN_RESULT,
                        (m["atype"], self._amv(_unhex(m["addr"])), m["k"], m["rssi"], self._dmv(_unhex(m["d"]))),
                    )
            elif t == "scan_done":
                if self._scan:
                    self._scan = False
                    self._call(_IRQ_SCAN_DONE, ())
            elif t == "conn":
                c = _Conn(m["c"], m["role"] == "central", m["atype"], _unhex(m["addr"]))
                self._conns[c.h] = c
                if c.central:
                    self._connecting = False
                else:
                    self._adv = False  # legacy advertising stops when a central connects
                ev = _IRQ_PERIPHERAL_CONNECT if c.central else _IRQ_CENTRAL_CONNECT
                self._call(ev, (c.h, c.at, self._amv(c.addr)))
            elif t == "conn_fail":
                if self._connecting:
                    self._connecting = False
                    self._call(_IRQ_PERIPHERAL_DISCONNECT, (0xFFFF, 0xFF, self._amv(bytes(6))))
            elif t == "disc":
                c = self._conns.pop(m["c"], None)
                if c:
                    self._down(c)
            elif t == "update":
                self._call(_IRQ_CONNECTION_UPDATE, (m["c"], m["iv"] // 1250, m["lat"], m["sto"] // 10, 0))
            elif t == "cfg":
                n = m["tx_buffers"]
                self._txfree += n - self._txmax
                self._txmax = n
            elif t == "error":
                print("bluetooth sim: the radio broker reports an error:", m.get("msg"))
            else:
                raise ValueError("unknown type")
        except (KeyError, ValueError, TypeError, IndexError) as e:
            print("bluetooth sim: bad message from the radio broker ignored (%s): %s" % (e, str(m)[:100]))

    # ------------------------------------------------------------------ IRQs

    def _call(self, ev, data):
        h = self._irq
        r = None
        if h is not None:
            self._depth += 1
            try:
                r = h(ev, data)
            except BaseException as e:
                # as invoke_irq_handler_run_protected: report, then disable the handler
                print("Unhandled exception in IRQ callback handler")
                _sys.print_exception(e)
                self._irq = None
            self._depth -= 1
        if self._depth:
            return r  # an event raised inside a handler (e.g. SCAN_DONE by gap_scan(None)): outer data stays
        # The memory behind the memoryviews and the UUID is reused on an ESP32: make stale views visible.
        n = self._n
        if n:
            self._mvb[:n] = self._zero[:n]
            self._n = 0
        self._mva[:] = self._zero[:6]
        for u in self._uuids.values():
            u[:] = self._zero[: len(u)]
        return r

    def _dmv(self, data):
        n = min(len(data), _BUF)
        self._mvb[:n] = data[:n]
        self._n = max(self._n, n)
        return self._mvb[:n]

    def _amv(self, addr):
        self._mva[:] = addr
        return self._mva

    def _uuid(self, b):
        u = self._uuids[len(b)]
        u[:] = b
        return u

    def irq(self, handler):
        if handler is not None and not callable(handler):
            raise ValueError("invalid handler")
        self._irq = handler
        if self._s is not None:
            self._ensure()

    # ------------------------------------------------------------------ configuration

    def config(self, *a, **kw):
        if not kw:
            if len(a) != 1:
                raise TypeError("must query one param")
            k = a[0]
            if k == "gap_name":
                return bytes(self._name)
            if k == "mac":
                self._need()
                if self._rpa:
                    raise OSError(_EINVAL)
                return (self._at, bytes(self._addr))
            if k == "mtu":
                self._need()
                return self._mtu
            raise ValueError("unknown config param")
        if a:
            raise TypeError("can't specify pos and kw args")
        for k, v in kw.items():
            if k == "gap_name":
                v = _bytes(v)
                if len(v) > _NAME_MAX:
                    raise OSError(_EINVAL)
                self._name = v
            elif k == "mtu":
                v = int(v) & 0xFFFF
                self._need()
                if v < _MTU_MIN or v > _MTU_MAX:
                    raise OSError(_EINVAL)
                self._mtu = v
            elif k == "addr_mode":
                v = int(v)
                self._need()
                self._addr_mode(v)
            elif k in ("bond", "mitm", "le_secure", "io"):
                self._sec[k] = v
            else:
                raise ValueError("unknown config param")

    def _addr_mode(self, mode):
        if mode == 0:
            at, addr = 0, self._pub
        elif 1 <= mode <= 3:
            r = bytearray(_os.urandom(6))
            # static random 11xxxxxx (also the RPA's identity), NRPA 00xxxxxx; an RPA on air is 01xxxxxx
            r[0] = r[0] & 0x3F | (0x40 if mode == 2 else 0 if mode == 3 else 0xC0)
            at, addr = 1, bytes(r)
        else:
            return
        self._rpa = mode == 2
        self._at, self._addr = at, addr
        self._send('{"t":"addr","atype":%d,"addr":"%s"}\n' % (at, _hexlify(addr).decode()))

    # ------------------------------------------------------------------ GAP

    def gap_advertise(self, interval_us=500000, adv_data=None, *, resp_data=None, connectable=True):
        if interval_us is None:
            if self._s is not None and self._adv:
                self._adv = False
                self._send('{"t":"adv_stop"}\n')
            return
        self._need()
        self._ensure()
        if self._adv:
            self._adv = False
            self._send('{"t":"adv_stop"}\n')
        if adv_data is not None:
            adv_data = _bytes(adv_data)
            if len(adv_data) > _ADV_MAX:
                raise OSError(_EINVAL)
            self._advd = adv_data
        if resp_data is not None:
            resp_data = _bytes(resp_data)
            if len(resp_data) > _ADV_MAX:
                raise OSError(_EINVAL)
            self._resp = resp_data
        if connectable and len(self._conns) >= _MAX_CONN:
            raise OSError(_ENOMEM)
        itvl = int(interval_us) // 625
        if itvl == 0:
            itvl = 48 if connectable else 160  # NimBLE's defaults: 30 ms, 100 ms
        if itvl < 0x20 or itvl > 0x4000:
            raise OSError(_EHCI_PARAMS)
        self._send(
            '{"t":"adv","iv":%d,"conn":%s,"d":"%s","r":"%s"}\n'
            % (itvl * 625, "true" if connectable else "false", _hexlify(self._advd).decode(),
               _hexlify(self._resp).decode())
        )
        self._adv = True

    def gap_scan(self, *a):
        if len(a) > 4:
            raise TypeError("function takes at most 5 positional arguments")
        self._need()
        if a and a[0] is None:
            self._scan_stop()
            return
        self._ensure()
        dur = int(a[0]) if a else 0
        itvl = int(a[1]) if len(a) > 1 else 1280000
        win = int(a[2]) if len(a) > 2 else 11250
        act = bool(a[3]) if len(a) > 3 else False
        if self._connecting:
            raise OSError(_EBUSY)
        if self._scan:
            raise OSError(_EALREADY)
        itvl = max(4, min(0x4000, itvl // 625))
        win = max(4, min(0x4000, win // 625))
        if win > itvl:
            raise OSError(_EINVAL)
        self._send(
            '{"t":"scan","dur":%d,"iv":%d,"win":%d,"act":%s}\n'
            % (max(0, dur), itvl * 625, win * 625, "true" if act else "false")
        )
        self._scan = True

    def _scan_stop(self):
        if self._scan:
            self._scan = False
            self._send('{"t":"scan_stop"}\n')
            self._call(_IRQ_SCAN_DONE, ())

    def gap_connect(self, *a):
        if len(a) == 1:
            if a[0] is not None:
                raise TypeError("invalid addr")
            self._need()
            if not self._connecting:
                raise OSError(_EALREADY)
            self._send('{"t":"connect_cancel"}\n')
            return
        if not 2 <= len(a) <= 5:
            raise TypeError("function takes 3 to 6 positional arguments")
        at = int(a[0]) & 0xFF
        addr = _bytes(a[1])
        if len(addr) != 6:
            raise ValueError("invalid addr")
        dur = a[2] if len(a) > 2 and a[2] is not None else 2000
        miv = a[3] if len(a) > 3 and a[3] is not None else 0
        self._need()
        self._ensure()
        self._scan_stop()
        if self._connecting:
            raise OSError(_EALREADY)
        if len(self._conns) >= _MAX_CONN:
            raise OSError(_ENOMEM)
        if at > 3:
            raise OSError(_EINVAL)
        for c in self._conns.values():
            if c.addr == addr and c.at == at:
                raise OSError(_EIO)  # BLE_HS_EDONE: already connected to it
        itvl = max(6, min(3200, int(miv) // 1250)) if miv else 24  # NimBLE's default minimum: 30 ms
        self._send(
            '{"t":"connect","atype":%d,"addr":"%s","dur":%d,"iv":%d}\n'
            % (at, _hexlify(addr).decode(), int(dur) or 30000, itvl * 1250)
        )
        self._connecting = True

    def gap_disconnect(self, conn_handle):
        self._need()
        c = self._conns.get(conn_handle)
        if c is None:
            return False
        if c.closing:
            raise OSError(_EALREADY)
        c.closing = True
        self._send('{"t":"disconnect","c":%d}\n' % conn_handle)
        return True

    def gap_pair(self, conn_handle):
        raise OSError(_EOPNOTSUPP)  # the simulated radio has no security manager

    def gap_passkey(self, conn_handle, action, passkey):
        raise OSError(_EOPNOTSUPP)

    # ------------------------------------------------------------------ GATT server

    def _gatts_reset(self):
        # NimBLE's default GAP (0x1800: device name, appearance) and GATT (0x1801: service changed) services
        self._attrs = [
            (_K_SVC, b"\x00\x18", 5, 0),
            (_K_CHR, b"\x00\x2a", 0x02, 3),
            (_K_VAL, b"\x00\x2a", FLAG_READ, 0),
            (_K_CHR, b"\x01\x2a", 0x02, 5),
            (_K_VAL, b"\x01\x2a", FLAG_READ, 0),
            (_K_SVC, b"\x01\x18", 9, 0),
            (_K_CHR, b"\x05\x2a", 0x20, 8),
            (_K_VAL, b"\x05\x2a", FLAG_INDICATE, 0),
            (_K_CCC, _U_CCC, 8, 0),
        ]
        # MicroPython allocates value storage for every characteristic NimBLE registers, GAP's included
        self._db = {3: [bytearray(_ATTR_LEN), 0, False], 5: [bytearray(_ATTR_LEN), 0, False],
                    8: [bytearray(_ATTR_LEN), 0, False]}
        self._nsvc = 0

    def gatts_register_services(self, services):
        return _gatts().register(self, services)

    def gatts_read(self, value_handle):
        e = self._db.get(value_handle) if self._s is not None else None
        if e is None:
            return b""  # as on an ESP32: the error of mp_bluetooth_gatts_read is not checked
        v = bytes(e[0][: e[1]])
        if e[2]:
            e[1] = 0
        return v

    def gatts_write(self, value_handle, data, send_update=False):
        data = _bytes(data)
        self._need()
        e = self._db.get(value_handle)
        if e is None:
            raise OSError(_EINVAL)
        if len(data) > len(e[0]):
            e[0] = bytearray(len(data))  # a local write enlarges the buffer
        e[0][: len(data)] = data
        e[1] = len(data)
        if send_update:
            # ble_gatts_chr_updated: subscribed clients only, sent later by NimBLE, failures silent
            for c in list(self._conns.values()):
                f = c.cccd.get(value_handle, 0)
                try:
                    if f & 1:
                        self._ni(c.h, value_handle, None, False, False)
                    elif f & 2:
                        self._ni(c.h, value_handle, None, True, False)
                except OSError:
                    pass
        return len(data)

    def gatts_set_buffer(self, value_handle, len, append=False):
        self._need()
        e = self._db.get(value_handle)
        if e is None:
            raise OSError(_EINVAL)
        e[0] = bytearray(len)
        e[1] = 0
        e[2] = bool(append)

    def gatts_notify(self, conn_handle, value_handle, data=None):
        self._ni(conn_handle, value_handle, data, False, True)

    def gatts_indicate(self, conn_handle, value_handle, data=None):
        self._ni(conn_handle, value_handle, data, True, True)

    def _ni(self, ch, vh, data, ind, irq):
        # notify/indicate, sent whether or not the client subscribed (as ble_gatts_notify_custom)
        if data is not None:
            data = _bytes(data)
        self._need()
        if data is not None:
            self._room(1)  # ble_hs_mbuf_from_flat
        if ind and self._procs >= _MAX_PROCS:
            raise OSError(_ENOMEM)
        if data is None:
            # NimBLE reads the stored value through the access callback, with no connection
            if irq and self._call(_IRQ_GATTS_READ_REQUEST, (0xFFFF, vh)):
                raise OSError(_EAPP)
            e = self._db.get(vh)
            if e is None:
                raise OSError(_EAPP)
            data = bytes(e[0][: e[1]])
        if vh == 0:
            raise OSError(_EINVAL)
        c = self._conns.get(ch)
        mtu = c.mtu if c else _MTU_MIN
        pdu = bytes((_INDICATE if ind else _NOTIFY,)) + _u16(vh) + data[: mtu - 3]  # cut to fit, silently
        b = _blocks(len(pdu))
        self._room(b)
        if c is None:
            raise OSError(_ENOTCONN)
        self._take(c, b)
        if ind:
            self._procs += 1
            self._req(c, [_P_IND, vh], pdu, b)
        else:
            self._tx(ch, pdu, b)

    def _room(self, blocks):
        if self._txfree < blocks:
            while self._fill(0):  # buffers freed by delivered packets
                pass
            if self._q and self._task is not None and not self._busy and not self._kick:
                # the reader task waits for the socket, which is drained now: have the queue handled
                self._kick = True
                self._core.create_task(self._kicker())
            if self._txfree < blocks:
                raise OSError(_ENOMEM)

    async def _kicker(self):
        self._kick = False
        self._pump(0)

    def _take(self, c, b):
        self._txfree -= b
        c.held += b

    def _srv(self, c, op, p):
        _gatts().srv(self, c, op, p)

    # ------------------------------------------------------------------ GATT client

    def _proc(self, ch, kind, pdu, p=None):
        # start a client procedure: checks in NimBLE's order, then the request (queued behind one outstanding)
        if self._procs >= _MAX_PROCS:
            raise OSError(_ENOMEM)
        if pdu is None:
            raise OSError(_EINVAL)
        b = _blocks(len(pdu))
        self._room(b)
        c = self._conns.get(ch)
        if c is None:
            raise OSError(_ENOTCONN)
        self._procs += 1
        self._take(c, b)
        self._req(c, p or [kind], pdu, b)
        return c

    def _req(self, c, p, pdu, b):
        if c.req is None:
            c.req = p
            self._tx(c.h, pdu, b)
        else:
            c.q.append((p, pdu, b))

    def _end(self, c, ev, data):
        c.req = None
        if ev:
            self._call(ev, data)
        self._procs -= 1
        if c.req is None and c.q and c.h in self._conns:
            c.req, pdu, b = c.q.pop(0)
            self._tx(c.h, pdu, b)

    def gattc_discover_services(self, conn_handle, uuid=None):
        _gattc().discover_services(self, conn_handle, uuid)

    def gattc_discover_characteristics(self, conn_handle, start_handle, end_handle, uuid=None):
        _gattc().discover_characteristics(self, conn_handle, start_handle, end_handle, uuid)

    def gattc_discover_descriptors(self, conn_handle, start_handle, end_handle):
        _gattc().discover_descriptors(self, conn_handle, start_handle, end_handle)

    def gattc_read(self, conn_handle, value_handle):
        self._need()
        self._ensure()
        pdu = bytes((_READ_REQ,)) + _u16(value_handle) if value_handle else None
        self._proc(conn_handle, _P_READ, pdu, [_P_READ, value_handle])

    def gattc_write(self, conn_handle, value_handle, data, mode=0):
        data = _bytes(data)
        self._need()
        self._ensure()
        if mode != 0 and mode != 1:
            raise OSError(_EINVAL)
        c = self._conns.get(conn_handle)
        mtu = c.mtu if c else _MTU_MIN
        op = _WRITE_REQ if mode else _WRITE_CMD
        pdu = bytes((op,)) + _u16(value_handle) + data[: mtu - 3]  # cut to fit, silently (ble_att_tx)
        if mode:
            self._proc(conn_handle, _P_WRITE, pdu, [_P_WRITE, value_handle])
            return
        b = _blocks(len(pdu))
        self._room(b)
        if c is None:
            raise OSError(_ENOTCONN)
        self._take(c, b)
        self._tx(conn_handle, pdu, b)

    def gattc_exchange_mtu(self, conn_handle):
        # no active check in MicroPython here: with the stack off there is simply no such connection
        c = self._conns.get(conn_handle) if self._s is not None else None
        if c is not None:
            self._ensure()
        if c is not None and self._procs >= _MAX_PROCS:
            raise OSError(_ENOMEM)
        if c is None:
            raise OSError(_ENOTCONN)
        if c.mtx:
            raise OSError(_EALREADY)
        self._proc(conn_handle, _P_MTU, bytes((_MTU_REQ,)) + _u16(self._mtu), [_P_MTU, self._mtu])
        c.mtx = True

    def _att(self, c, p):
        op = p[0]
        if op == _NOTIFY or op == _INDICATE:
            h = _g16(p, 1)
            self._call(_IRQ_GATTC_NOTIFY if op == _NOTIFY else _IRQ_GATTC_INDICATE, (c.h, h, self._dmv(p[3:])))
            if op == _INDICATE and c.h in self._conns:
                self._tx(c.h, bytes((_CONFIRM,)), 0)
        elif op & 1 or op == _CONFIRM:
            if c.req is not None:
                self._rsp(c, c.req, op, p)
        else:
            self._srv(c, op, p)

    def _rsp(self, c, q, op, p):
        # a response to our outstanding request q
        k = q[0]
        if _P_SVC <= k <= _P_DSC:
            _gattc().rsp(self, c, q, op, p)
            return
        st = 0
        if op == _ERR:
            st = 0x100 + p[4]  # BLE_HS_ATT_ERR(code)
            eh = _g16(p, 2)
        if k == _P_MTU:
            if op == _MTU_RSP:
                c.mtu = max(_MTU_MIN, min(q[1], _g16(p, 1)))
                self._end(c, _IRQ_MTU_EXCHANGED, (c.h, c.mtu))
            else:
                self._end(c, 0, None)
        elif k == _P_READ:
            if op == _READ_RSP:
                self._call(_IRQ_GATTC_READ_RESULT, (c.h, q[1], self._dmv(p[1:])))
                self._end(c, _IRQ_GATTC_READ_DONE, (c.h, q[1], 0))
            else:
                self._end(c, _IRQ_GATTC_READ_DONE, (c.h, eh if op == _ERR else q[1], st or _HS_EBADDATA))
        elif k == _P_WRITE:
            self._end(c, _IRQ_GATTC_WRITE_DONE, (c.h, q[1], st if op == _ERR else 0))
        elif op == _CONFIRM:  # k == _P_IND
            self._end(c, _IRQ_GATTS_INDICATE_DONE, (c.h, q[1], 0))

    def _down(self, c):
        # the link is gone: buffers back, pending procedures fail (indications first, as NimBLE's
        # ble_gap_conn_broken does), then the disconnect event
        self._txfree += c.held
        ps = ([c.req] if c.req else []) + [x[0] for x in c.q]
        c.req = None
        c.q = []
        for ind in (True, False):
            for q in ps:
                if (q[0] == _P_IND) == ind:
                    self._fail(c, q)
        ev = _IRQ_PERIPHERAL_DISCONNECT if c.central else _IRQ_CENTRAL_DISCONNECT
        self._call(ev, (c.h, c.at, self._amv(c.addr)))

    def _fail(self, c, q):
        k = q[0]
        self._procs -= 1
        if k == _P_IND:
            self._call(_IRQ_GATTS_INDICATE_DONE, (c.h, q[1], _HS_ENOTCONN))
        elif k == _P_READ:
            self._call(_IRQ_GATTC_READ_DONE, (c.h, 0, _HS_ENOTCONN))
        elif k == _P_WRITE:
            self._call(_IRQ_GATTC_WRITE_DONE, (c.h, q[1], _HS_ENOTCONN))
        elif k != _P_MTU:
            self._procs += 1
            _gattc().done(self, c, q, _HS_ENOTCONN)


def _gatts():
    # the GATT server (answering the peer's requests, registering services): loaded when first needed
    import _bluetooth_gatts

    return _bluetooth_gatts


def _gattc():
    # the GATT client's discovery procedures: loaded when first needed
    import _bluetooth_gattc

    return _bluetooth_gattc


def _pump(timeout_ms=0):
    # Simulator only (not on an ESP32): deliver the IRQs that have arrived; if none had, wait up to timeout_ms
    # for the next. For synchronous code; under asyncio the reader task does this. Returns the messages handled.
    return _ble._pump(timeout_ms) if _ble is not None else 0


del const
