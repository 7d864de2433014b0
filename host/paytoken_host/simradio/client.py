"""A CPython device on the simulated radio (asyncio): GAP and a GATT client, for tests and a bleak backend.

    async with RadioClient("127.0.0.1:4242", name="phone") as radio:
        reports = await radio.scan(500)                      # AdvReport(addr, atype, adv_type, rssi, data)
        conn = await radio.connect(reports[0].addr)          # Connection, central role
        await conn.exchange_mtu(247)
        services = await conn.discover_services()
        chars = await conn.discover_characteristics(services[0].start, services[0].end)
        await conn.subscribe(cccd_handle)                    # notifications then arrive in conn.notifications
        await conn.write(chars[1].value_handle, b"hi", response=True)
        handle, value = await conn.notifications.get()
        await conn.disconnect()

A client can also advertise; a central that connects to it arrives in `incoming`. Its GATT server is empty: it
answers an MTU exchange, hands writes to `Connection.on_write` if set, and refuses every other request
("attribute not found"), enough to act as a connectable peer in tests. ATT requests are serialised per
connection (one outstanding, as ATT requires) and time out after 30 s like ATT transactions. Writes longer than
ATT_MTU - 3 raise ValueError instead of being cut.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import att
from .att import AttError, Uuid
from .protocol import ProtocolError, decode, encode, format_address, parse_address

log = logging.getLogger("paytoken.simradio.client")
ATT_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class AdvReport:
    addr: bytes
    atype: int
    adv_type: int  # 0 ADV_IND, 2 ADV_SCAN_IND, 4 SCAN_RSP
    rssi: int
    data: bytes


@dataclass(frozen=True)
class Service:
    start: int
    end: int
    uuid: Uuid


@dataclass(frozen=True)
class Characteristic:
    decl_handle: int
    value_handle: int
    properties: int
    uuid: Uuid
    end_handle: int


@dataclass(frozen=True)
class Descriptor:
    handle: int
    uuid: Uuid


class RadioError(Exception):
    """The broker refused something (its error message), or the connection to it broke."""


class Connection:
    """One link as seen from this device: its handle, role, ATT MTU and GATT client operations."""

    def __init__(self, client: RadioClient, msg: dict[str, Any]):
        self.client = client
        self.handle: int = msg["c"]
        self.role: str = msg["role"]  # our role: "central" or "peripheral"
        self.peer_addr = bytes.fromhex(msg["addr"])
        self.peer_atype: int = msg["atype"]
        self.link: int = msg["link"]
        self.interval_us: int = msg["iv"]
        self.latency: int = msg["lat"]
        self.supervision_ms: int = msg["sto"]
        self.mtu = att.DEFAULT_MTU
        self.preferred_mtu = 256
        self.reason: int | None = None
        self.disconnected = asyncio.Event()
        self.notifications: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.indications: asyncio.Queue[tuple[int, bytes]] = asyncio.Queue()
        self.on_notify: Callable[[int, bytes], None] | None = None
        # False: notifications and indications go only to on_notify (a bleak client never drains the queues)
        self.queue_notifications = True
        self.on_write: Callable[[int, bytes], None] | None = None  # server side: accept writes, see them here
        self._lock = asyncio.Lock()
        self._pending: asyncio.Future[bytes] | None = None

    def __repr__(self) -> str:
        return f"<Connection {self.handle} {self.role} peer={format_address(self.peer_addr)} mtu={self.mtu}>"

    # ------------------------------------------------------------ GATT client

    async def request(self, pdu: bytes) -> bytes:
        """Send one ATT request and return its response PDU; AttError for an error response."""
        async with self._lock:
            if self.disconnected.is_set():
                raise ConnectionError(f"connection {self.handle} is down (reason 0x{self.reason or 0:02x})")
            self._pending = asyncio.get_running_loop().create_future()
            await self.client.send({"t": "tx", "c": self.handle, "p": pdu.hex()})
            try:
                rsp = await asyncio.wait_for(self._pending, ATT_TIMEOUT_S)
            finally:
                self._pending = None
        if rsp[0] == att.ERROR_RSP:
            raise att.parse_error(rsp)
        return rsp

    async def exchange_mtu(self, mtu: int = 517) -> int:
        """ATT MTU exchange with `mtu` as our preference; returns the MTU now in force (the smaller one)."""
        if not att.DEFAULT_MTU <= mtu <= att.MAX_MTU:
            raise ValueError(f"MTU must be in {att.DEFAULT_MTU}..{att.MAX_MTU}")
        self.preferred_mtu = mtu
        rsp = await self.request(bytes([att.MTU_REQ]) + att.u16(mtu))
        (server_mtu,) = struct.unpack_from("<H", rsp, 1)
        self.mtu = max(att.DEFAULT_MTU, min(mtu, server_mtu))
        return self.mtu

    async def discover_services(self, uuid: Uuid | None = None) -> list[Service]:
        found: list[Service] = []
        start = 1
        while start <= 0xFFFF:
            if uuid is None:
                pdu = struct.pack("<BHHH", att.READ_GROUP_TYPE_REQ, start, 0xFFFF, att.PRIMARY_SERVICE)
            else:
                pdu = struct.pack("<BHHH", att.FIND_TYPE_VALUE_REQ, start, 0xFFFF, att.PRIMARY_SERVICE) + uuid.le
            try:
                rsp = await self.request(pdu)
            except AttError as exc:
                if exc.code == att.ERR_ATTR_NOT_FOUND:
                    break
                raise
            if uuid is None:
                for e in att.entries(rsp[2:], rsp[1]):
                    found.append(Service(*struct.unpack_from("<HH", e), Uuid(e[4:])))
            else:
                for e in att.entries(rsp[1:], 4):
                    found.append(Service(*struct.unpack("<HH", e), uuid))
            if found[-1].end <= start - 1:
                raise RadioError("server sent services out of order")
            start = found[-1].end + 1
        return found

    async def discover_characteristics(self, start: int = 1, end: int = 0xFFFF) -> list[Characteristic]:
        raw: list[tuple[int, int, int, Uuid]] = []
        prev = start - 1
        while prev + 1 < end:
            try:
                rsp = await self.request(struct.pack("<BHHH", att.READ_TYPE_REQ, prev + 1, end, att.CHARACTERISTIC))
            except AttError as exc:
                if exc.code == att.ERR_ATTR_NOT_FOUND:
                    break
                raise
            for e in att.entries(rsp[2:], rsp[1]):
                decl, props, value = struct.unpack_from("<HBH", e)
                raw.append((decl, value, props, Uuid(e[5:])))
                prev = value
        return [
            Characteristic(d, v, p, u, raw[i + 1][0] - 1 if i + 1 < len(raw) else end)
            for i, (d, v, p, u) in enumerate(raw)
        ]

    async def discover_descriptors(self, start: int, end: int) -> list[Descriptor]:
        """Attributes in (start, end]: pass a characteristic's value handle and end handle."""
        found: list[Descriptor] = []
        prev = start
        while prev < end:
            try:
                rsp = await self.request(struct.pack("<BHH", att.FIND_INFO_REQ, prev + 1, end))
            except AttError as exc:
                if exc.code == att.ERR_ATTR_NOT_FOUND:
                    break
                raise
            size = 4 if rsp[1] == 1 else 18
            for e in att.entries(rsp[2:], size):
                found.append(Descriptor(struct.unpack_from("<H", e)[0], Uuid(e[2:])))
                prev = found[-1].handle
        return found

    async def read(self, handle: int) -> bytes:
        """One ATT read (at most ATT_MTU - 1 bytes, as NimBLE's gattc_read)."""
        rsp = await self.request(struct.pack("<BH", att.READ_REQ, handle))
        return rsp[1:]

    async def write(self, handle: int, data: bytes, response: bool = True) -> None:
        if len(data) > self.mtu - 3:
            raise ValueError(f"{len(data)} bytes do not fit one ATT write at MTU {self.mtu} (at most {self.mtu - 3})")
        if response:
            await self.request(struct.pack("<BH", att.WRITE_REQ, handle) + data)
        else:
            await self.client.send({"t": "tx", "c": self.handle,
                                    "p": (struct.pack("<BH", att.WRITE_CMD, handle) + data).hex()})

    async def subscribe(self, cccd_handle: int, notify: bool = True, indicate: bool = False) -> None:
        """Write the Client Characteristic Configuration descriptor (0x2902)."""
        await self.write(cccd_handle, att.u16(int(notify) | int(indicate) << 1), response=True)

    async def notify(self, handle: int, data: bytes) -> None:
        """Send a notification (server side); cut to ATT_MTU - 3 bytes as NimBLE does."""
        await self.client.send({"t": "tx", "c": self.handle,
                                "p": (struct.pack("<BH", att.NOTIFY, handle) + data[: self.mtu - 3]).hex()})

    async def disconnect(self, timeout: float = 5.0) -> int | None:
        """gap_disconnect; returns the reason once the link is down (0x16: we ended it)."""
        if not self.disconnected.is_set():
            await self.client.send({"t": "disconnect", "c": self.handle})
            await asyncio.wait_for(self.disconnected.wait(), timeout)
        return self.reason

    # ------------------------------------------------------------ incoming PDUs

    def _rx(self, pdu: bytes) -> None:
        op = pdu[0]
        if op in att.RESPONSES or op == att.CONFIRM:
            if self._pending is not None and not self._pending.done():
                self._pending.set_result(pdu)
            else:
                log.warning("connection %d: unexpected ATT response 0x%02x", self.handle, op)
        elif op in (att.NOTIFY, att.INDICATE):
            (handle,) = struct.unpack_from("<H", pdu, 1)
            value = pdu[3:]
            if op == att.INDICATE:
                if self.queue_notifications:
                    self.indications.put_nowait((handle, value))
                self._tx(bytes([att.CONFIRM]))
            elif self.queue_notifications:
                self.notifications.put_nowait((handle, value))
            if self.on_notify:
                self.on_notify(handle, value)
        elif op == att.MTU_REQ:
            (client_mtu,) = struct.unpack_from("<H", pdu, 1)
            self._tx(bytes([att.MTU_RSP]) + att.u16(self.preferred_mtu))
            self.mtu = max(att.DEFAULT_MTU, min(self.preferred_mtu, client_mtu))
        elif op in (att.WRITE_REQ, att.WRITE_CMD) and self.on_write is not None and len(pdu) >= 3:
            self.on_write(struct.unpack_from("<H", pdu, 1)[0], pdu[3:])
            if op == att.WRITE_REQ:
                self._tx(bytes([att.WRITE_RSP]))
        elif op in att.REQUESTS:
            start = struct.unpack_from("<H", pdu, 1)[0] if len(pdu) >= 3 else 0
            refuse = att.ERR_INVALID_HANDLE if op in (att.READ_REQ, att.READ_BLOB_REQ, att.WRITE_REQ) \
                else att.ERR_ATTR_NOT_FOUND
            self._tx(att.error_rsp(op, start, refuse))
        elif not op & 0x40:  # an unknown request (commands, bit 6, are ignored)
            self._tx(att.error_rsp(op, 0, att.ERR_REQ_NOT_SUPPORTED))

    def _tx(self, pdu: bytes) -> None:
        self.client.send_nowait({"t": "tx", "c": self.handle, "p": pdu.hex()})

    def _down(self, reason: int) -> None:
        self.reason = reason
        self.disconnected.set()
        if self._pending is not None and not self._pending.done():
            self._pending.set_exception(ConnectionError(f"connection {self.handle} dropped (reason 0x{reason:02x})"))


class RadioClient:
    """A device on the simulated radio: `address` is PAYTOKEN_RADIO ("host:port")."""

    def __init__(self, address: str, name: str = "", addr: str | bytes | None = None):
        host, _, port = address.rpartition(":")
        self.host, self.port = host or "127.0.0.1", int(port)
        self.name = name
        self.requested_addr = parse_address(addr) if isinstance(addr, str) else addr
        self.addr = b""
        self.atype = 0
        self.id = 0
        self.cfg: dict[str, Any] = {}
        self.connections: dict[int, Connection] = {}
        self.incoming: asyncio.Queue[Connection] = asyncio.Queue()
        self.errors: list[str] = []
        self.on_adv: Callable[[AdvReport], None] | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._task: asyncio.Task[None] | None = None
        self._welcome: asyncio.Future[dict[str, Any]] | None = None
        self._scan: tuple[list[AdvReport], asyncio.Future[None]] | None = None
        self._connect: asyncio.Future[Connection] | None = None
        self._ctl: list[asyncio.Future[Any]] = []

    async def __aenter__(self) -> RadioClient:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self) -> RadioClient:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port, limit=1 << 20)
        self._welcome = asyncio.get_running_loop().create_future()
        self._task = asyncio.get_running_loop().create_task(self._read())
        hello: dict[str, Any] = {"t": "hello", "v": 1, "name": self.name}
        if self.requested_addr:
            hello["addr"] = self.requested_addr.hex()
        await self.send(hello)
        welcome = await asyncio.wait_for(self._welcome, 5)
        self.id, self.addr, self.atype, self.cfg = welcome["id"], bytes.fromhex(welcome["addr"]), welcome["atype"], \
            welcome["cfg"]
        return self

    async def close(self, graceful: bool = True) -> None:
        """Switch the radio off ("bye": peers see reason 0x15 at once) or just vanish (peers time out)."""
        if self._writer is None:
            return
        if graceful and not self._writer.is_closing():
            await self.send({"t": "bye"})
        self._writer.close()
        if self._task:
            self._task.cancel()
        self._writer = None

    async def send(self, msg: dict[str, Any]) -> None:
        self.send_nowait(msg)
        if self._writer is not None:
            await self._writer.drain()

    def send_nowait(self, msg: dict[str, Any]) -> None:
        if self._writer is None or self._writer.is_closing():
            raise RadioError("not connected to the radio broker")
        self._writer.write(encode(msg))

    async def control(self, op: str, **args: Any) -> Any:
        """A control operation over the wire (the same as BrokerThread's methods)."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._ctl.append(future)
        await self.send({"t": "ctl", "op": op, **args})
        return await asyncio.wait_for(future, 5)

    # ------------------------------------------------------------ GAP

    async def advertise(self, interval_us: int = 100_000, adv_data: bytes = b"", resp_data: bytes = b"",
                        connectable: bool = True) -> None:
        await self.send({"t": "adv", "iv": interval_us, "conn": connectable, "d": adv_data.hex(),
                         "r": resp_data.hex()})

    async def stop_advertising(self) -> None:
        await self.send({"t": "adv_stop"})

    async def scan(self, duration_ms: int, interval_us: int = 30_000, window_us: int = 30_000,
                   active: bool = True) -> list[AdvReport]:
        """Scan for duration_ms and return every report (duplicates included, as NimBLE delivers them)."""
        if self._scan is not None:
            raise RadioError("already scanning")
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        reports: list[AdvReport] = []
        self._scan = (reports, done)
        try:
            await self.send({"t": "scan", "dur": duration_ms, "iv": interval_us, "win": window_us, "act": active})
            await asyncio.wait_for(done, duration_ms / 1000 + 5)
        finally:
            self._scan = None
        return reports

    async def connect(self, addr: bytes | str, atype: int = 0, timeout_ms: int = 2000,
                      interval_us: int = 30_000) -> Connection:
        """Connect as central; TimeoutError if no connectable advertiser with that address shows up in time."""
        peer = parse_address(addr) if isinstance(addr, str) else addr
        if self._connect is not None:
            raise RadioError("a connection attempt is already pending")
        self._connect = asyncio.get_running_loop().create_future()
        try:
            await self.send({"t": "connect", "atype": atype, "addr": peer.hex(), "dur": timeout_ms,
                             "iv": interval_us})
            return await asyncio.wait_for(self._connect, timeout_ms / 1000 + 5)
        finally:
            self._connect = None

    # ------------------------------------------------------------ incoming messages

    async def _read(self) -> None:
        assert self._reader is not None
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                try:
                    self._dispatch(decode(line.rstrip(b"\n")))
                except (ProtocolError, KeyError, ValueError, TypeError, IndexError, struct.error) as exc:
                    log.error("bad message from the broker (%s): %r", exc, line[:120])
                    self.errors.append(f"bad message from the broker: {exc}")
        finally:
            for conn in list(self.connections.values()):
                conn._down(0x08)
            self.connections.clear()

    def _dispatch(self, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "welcome" and self._welcome and not self._welcome.done():
            self._welcome.set_result(msg)
        elif t == "rx":
            conn = self.connections.get(msg["c"])
            if conn is not None:
                conn._rx(bytes.fromhex(msg["p"]))
        elif t == "advrep":
            report = AdvReport(bytes.fromhex(msg["addr"]), msg["atype"], msg["k"], msg["rssi"],
                               bytes.fromhex(msg["d"]))
            if self._scan is not None:
                self._scan[0].append(report)
            if self.on_adv:
                self.on_adv(report)
        elif t == "scan_done":
            if self._scan is not None and not self._scan[1].done():
                self._scan[1].set_result(None)
        elif t == "conn":
            conn = Connection(self, msg)
            self.connections[conn.handle] = conn
            if conn.role == "central" and self._connect is not None and not self._connect.done():
                self._connect.set_result(conn)
            elif conn.role == "peripheral":
                self.incoming.put_nowait(conn)
        elif t == "conn_fail":
            if self._connect is not None and not self._connect.done():
                status = msg["status"]
                self._connect.set_exception(TimeoutError("no connectable advertiser answered") if status == 13
                                            else ConnectionAbortedError("connection attempt cancelled"))
        elif t == "disc":
            conn = self.connections.pop(msg["c"], None)
            if conn is not None:
                conn._down(msg["reason"])
        elif t == "update":
            conn = self.connections.get(msg["c"])
            if conn is not None:
                conn.interval_us, conn.latency, conn.supervision_ms = msg["iv"], msg["lat"], msg["sto"]
        elif t == "cfg":
            self.cfg.update({k: v for k, v in msg.items() if k != "t"})
        elif t == "ctl":
            if self._ctl:
                self._ctl.pop(0).set_result(msg["result"])
        elif t == "error":
            self.errors.append(msg["msg"])
            if "op" in msg and self._ctl:
                self._ctl.pop(0).set_exception(RadioError(msg["msg"]))
            elif self._welcome is not None and not self._welcome.done():
                self._welcome.set_exception(RadioError(msg["msg"]))
            else:
                log.warning("broker: %s", msg["msg"])
        # "done" (transmit buffers released) is for devices that model NimBLE's buffers; a client has none.
