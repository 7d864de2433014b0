"""The simulated radio's broker: the air between simulated BLE devices (docs/simulator.md, "Radio").

Devices (MicroPython processes running boards/unix_sim/lib/bluetooth.py, or CPython `client.RadioClient`s) connect
over loopback TCP and speak the JSON-lines protocol of `protocol`. The broker models advertising and scanning,
connection set-up, and every connection's link layer in real time: connection events every interval, a number of
LL packets per event and direction, LL fragmentation, peripheral latency, packet loss with retransmission at the
next event, the supervision timeout, and link drops injected by tests. ATT PDUs are carried unchanged; the GATT
logic lives in the devices.

Run in-process (`BrokerThread`) or as a process: python -m paytoken_host.simradio.broker --help
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import logging
import random
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field, fields
from typing import Any, TypeVar

from . import att
from .protocol import (
    MAX_LINE,
    REASON_CONN_TIMEOUT,
    REASON_LOCAL_HOST,
    REASON_POWER_OFF,
    REASON_REMOTE_USER,
    STATUS_CANCELLED,
    STATUS_TIMEOUT,
    VERSION,
    ProtocolError,
    decode,
    encode,
    format_address,
    get_addr,
    get_bool,
    get_hex,
    get_int,
    get_str,
    parse_address,
)

log = logging.getLogger("paytoken.simradio")

MAX_CONNECTIONS = 4  # CONFIG_BT_NIMBLE_MAX_CONNECTIONS in MicroPython's ESP32 build
ADDRESS_PREFIX = bytes((0x02, 0x50, 0x54))  # assigned public addresses: 02:50:54:xx:xx:xx
ADV_DELAY_S = 0.010  # advDelay: 0..10 ms of random delay added to every advertising interval
T = TypeVar("T")


@dataclass
class RadioConfig:
    """Broker-wide settings. The link fields apply to every link; `set_link` overrides them for one."""

    interval_ms: float | None = None  # None: the interval the central asked for (NimBLE default 30 ms)
    latency: int = 0  # peripheral latency: connection events the peripheral may sleep through
    loss: float = 0.0  # probability that one LL packet (or an event's first exchange) is lost
    ppe: int = 4  # LL packets per connection event and direction
    supervision_ms: int = 2560  # NimBLE's BLE_GAP_INITIAL_SUPERVISION_TIMEOUT
    ll_payload: int = 27  # LL data payload bytes per packet (27 = no data length extension)
    tx_buffers: int = 12  # per-device transmit buffers (NimBLE msys_1 blocks on ESP32)
    rssi: int = -50  # RSSI that scanners see for a device (per device: config(device=..., rssi=...))


LINK_FIELDS = ("interval_ms", "latency", "loss", "ppe", "supervision_ms", "ll_payload")
LIMITS: dict[str, tuple[type, float, float]] = {
    "interval_ms": (float, 7.5, 4000.0),
    "latency": (int, 0, 499),
    "loss": (float, 0.0, 1.0),
    "ppe": (int, 1, 100),
    "supervision_ms": (int, 100, 32000),
    "ll_payload": (int, 27, 251),
    "tx_buffers": (int, 1, 1000),
    "rssi": (int, -127, 20),
}


class BrokerError(Exception):
    """A control request the broker refused; the text says why."""


def check_setting(name: str, value: Any) -> Any:
    if name not in LIMITS:
        raise BrokerError(f"unknown setting {name!r}; settings: {', '.join(LIMITS)}")
    kind, lo, hi = LIMITS[name]
    if name == "interval_ms" and value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise BrokerError(f"{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    if not lo <= value <= hi:
        raise BrokerError(f"{name} must be in {lo}..{hi}, got {value!r}")
    return kind(value)


@dataclass
class Advertising:
    interval_s: float
    connectable: bool
    adv_data: bytes
    resp_data: bytes


@dataclass
class Scan:
    start: float
    interval_s: float
    window_s: float
    active: bool
    timer: asyncio.TimerHandle | None = None


@dataclass
class PendingConnect:
    atype: int
    addr: bytes
    interval_us: int
    timer: asyncio.TimerHandle | None = None


@dataclass
class Packet:
    pdu: bytes
    blocks: int
    left: int  # L2CAP bytes (PDU + 4-byte header) still to send as LL packets


@dataclass
class DropRule:
    """`drop_at`: drop a link at the `nth` ATT PDU that matches (direction, opcode, attribute handle; None: any),
    right after delivering it, or instead of delivering it (`deliver` False: it is lost with the link)."""

    nth: int
    dir: str | None = None
    att: int | None = None
    handle: int | None = None
    deliver: bool = True
    reason: int = REASON_CONN_TIMEOUT
    seen: int = 0  # matching PDUs so far (the nth is the one the link drops at)

    def matches(self, side: str, pdu: bytes) -> bool:
        return ((self.dir is None or self.dir == side) and (self.att is None or self.att == pdu[0])
                and (self.handle is None or self.handle == pdu_handle(pdu)))


def pdu_handle(pdu: bytes) -> int | None:
    """The attribute handle of a PDU that names one (reads, writes, notifications, indications); else None."""
    return int.from_bytes(pdu[1:3], "little") if pdu[0] in att.HANDLE_PDUS and len(pdu) >= 3 else None


TRACE_LEN = 512  # ATT PDUs a link remembers (`trace`)


def _direction_stats() -> dict[str, int]:
    return dict(pdus=0, bytes=0, ll_packets=0, ll_bytes=0, retransmissions=0, discarded=0)


@dataclass
class Link:
    id: int
    central: Device
    peripheral: Device
    ch: int  # connection handle on the central
    ph: int  # connection handle on the peripheral
    params: dict[str, Any]
    created: float
    last_ok: float
    queue: dict[str, deque[Packet]] = field(default_factory=lambda: {"c2p": deque(), "p2c": deque()})
    credit: dict[str, int] = field(default_factory=lambda: {"c2p": 0, "p2c": 0})
    stats: dict[str, Any] = field(
        default_factory=lambda: dict(events=0, events_lost=0, events_skipped=0, c2p=_direction_stats(),
                                     p2c=_direction_stats())
    )
    up: bool = True
    dead: bool = False  # one side vanished without switching its radio off: only the supervision timeout ends it
    terminate: Device | None = None  # gap_disconnect asked by this side: ends at the next connection event
    drop_after: int | None = None
    drop_reason: int = REASON_CONN_TIMEOUT
    drop_at: DropRule | None = None
    trace: deque[tuple[str, int, int | None, int]] = field(default_factory=lambda: deque(maxlen=TRACE_LEN))
    reason: dict[str, int] | None = None
    closed: float | None = None
    event: int = 0
    mtu_req: int = 0
    mtu: int = att.DEFAULT_MTU
    task: asyncio.Task[None] | None = None

    def side(self, dev: Device) -> str:
        return "c2p" if dev is self.central else "p2c"


class Device:
    def __init__(self, dev_id: int, writer: asyncio.StreamWriter, rssi: int):
        self.id = dev_id
        self.writer = writer
        self.name = ""
        self.addr = b""
        self.atype = 0
        self.hello = False
        self.alive = True
        self.rssi = rssi
        self.adv: Advertising | None = None
        self.adv_task: asyncio.Task[None] | None = None
        self.scan: Scan | None = None
        self.connect: PendingConnect | None = None
        self.links: dict[int, Link] = {}
        self.closed_handles: set[int] = set()

    def send(self, msg: dict[str, Any]) -> None:
        if self.alive and not self.writer.is_closing():
            self.writer.write(encode(msg))

    def label(self) -> str:
        return f"{self.name or 'device'}#{self.id}"


class Broker:
    """The air. Create, `await start()`, then devices connect to `port`; `control()` is the test API."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, seed: int | None = None,
                 config: RadioConfig | None = None):
        self.host = host
        self.port = port
        self.rng = random.Random(seed)
        self.config = config or RadioConfig()
        self.devices: dict[int, Device] = {}
        self.links: dict[int, Link] = {}
        self.armed: DropRule | None = None  # drop_at without a link: for the next link made
        self._server: asyncio.Server | None = None
        self._next_device = 1
        self._next_link = 1
        self._next_addr = 1
        self._clients: set[asyncio.StreamWriter] = set()
        self._t0 = 0.0

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return asyncio.get_running_loop()

    def now(self) -> float:
        return asyncio.get_running_loop().time()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, limit=MAX_LINE)
        self.port = self._server.sockets[0].getsockname()[1]
        self._t0 = self.now()
        log.info("listening on %s:%d", self.host, self.port)
        return self.port

    async def stop(self) -> None:
        if self._server:
            self._server.close()
        for link in list(self.links.values()):
            if link.task:
                link.task.cancel()
            link.up = False
        for dev in list(self.devices.values()):
            self._stop_gap(dev)
        for writer in list(self._clients):
            writer.close()
        if self._server:
            await self._server.wait_closed()

    # ---------------------------------------------------------------- connections from devices

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._clients.add(writer)
        dev = Device(0, writer, self.config.rssi)
        try:
            while True:
                try:
                    line = await reader.readline()
                except ValueError:  # longer than MAX_LINE; asyncio dropped it
                    self._error(dev, f"line longer than {MAX_LINE} bytes dropped")
                    continue
                except ConnectionError:
                    break
                if not line:
                    break
                if not line.strip():
                    continue
                try:
                    self._handle(dev, decode(line.rstrip(b"\r\n")))
                except (ProtocolError, BrokerError) as exc:
                    self._error(dev, str(exc), line)
                try:
                    await writer.drain()
                except ConnectionError:  # the device's process ended while the broker wrote to it
                    break
        finally:
            self._clients.discard(writer)
            if dev.hello and dev.alive:
                log.info("%s vanished", dev.label())
                self._vanish(dev, graceful=False)
            writer.close()

    def _error(self, dev: Device, msg: str, line: bytes = b"") -> None:
        log.warning("%s: %s", dev.label(), msg)
        reply: dict[str, Any] = {"t": "error", "msg": msg}
        if line:
            reply["line"] = line[:120].decode("utf-8", "replace").rstrip("\r\n")
        if not dev.writer.is_closing():
            dev.writer.write(encode(reply))

    def _handle(self, dev: Device, msg: dict[str, Any]) -> None:
        t = msg["t"]
        if t == "ctl":
            op = get_str(msg, "op", 32)
            args = {k: v for k, v in msg.items() if k not in ("t", "op")}
            try:
                result = self.control(op, **args)
            except BrokerError as exc:
                dev.writer.write(encode({"t": "error", "op": op, "msg": str(exc)}))
            else:
                dev.writer.write(encode({"t": "ctl", "op": op, "result": result}))
            return
        if t == "hello":
            self._hello(dev, msg)
            return
        if not dev.hello:
            raise ProtocolError(f'"{t}" before "hello": a device introduces itself first')
        handler = self._handlers.get(t)
        if handler is None:
            raise ProtocolError(f'unknown message type "{t}"; types: hello, {", ".join(self._handlers)}, ctl')
        handler(self, dev, msg)

    def _hello(self, dev: Device, msg: dict[str, Any]) -> None:
        if dev.hello:
            raise ProtocolError('"hello" twice on one connection')
        version = get_int(msg, "v", 1, 1000, VERSION)
        if version != VERSION:
            raise ProtocolError(f"protocol version {version} not supported (broker speaks {VERSION})")
        name = get_str(msg, "name", 64)
        if msg.get("addr") is not None:
            addr = get_addr(msg, "addr")
            if self._by_addr(0, addr) is not None:
                raise ProtocolError(f"address {format_address(addr)} is in use by another device")
        else:
            addr = self._new_address()
        dev.id = self._next_device
        self._next_device += 1
        dev.name, dev.addr, dev.hello = name or f"dev{dev.id}", addr, True
        self.devices[dev.id] = dev
        log.info("%s joined as %s", dev.label(), format_address(addr))
        dev.send({"t": "welcome", "id": dev.id, "addr": addr.hex(), "atype": 0, "v": VERSION,
                  "cfg": {"tx_buffers": self.config.tx_buffers, "max_conn": MAX_CONNECTIONS}})

    def _new_address(self) -> bytes:
        while True:
            addr = ADDRESS_PREFIX + self._next_addr.to_bytes(3, "big")
            self._next_addr += 1
            if self._by_addr(0, addr) is None:
                return addr

    def _by_addr(self, atype: int, addr: bytes) -> Device | None:
        for dev in self.devices.values():
            if dev.alive and dev.atype == atype and dev.addr == addr:
                return dev
        return None

    # ---------------------------------------------------------------- device messages

    def _on_addr(self, dev: Device, msg: dict[str, Any]) -> None:
        atype = get_int(msg, "atype", 0, 1)
        addr = get_addr(msg, "addr")
        other = self._by_addr(atype, addr)
        if other is not None and other is not dev:
            raise ProtocolError(f"address {format_address(addr)} is in use by another device")
        dev.atype, dev.addr = atype, addr

    def _on_adv(self, dev: Device, msg: dict[str, Any]) -> None:
        interval_us = get_int(msg, "iv", 20_000, 10_240_000)
        dev.adv = Advertising(interval_us / 1e6, get_bool(msg, "conn", True), get_hex(msg, "d", 31, ""),
                              get_hex(msg, "r", 31, ""))
        if dev.adv_task:
            dev.adv_task.cancel()
        dev.adv_task = self.loop.create_task(self._advertise(dev))

    def _on_adv_stop(self, dev: Device, msg: dict[str, Any]) -> None:
        dev.adv = None
        if dev.adv_task:
            dev.adv_task.cancel()
            dev.adv_task = None

    def _on_scan(self, dev: Device, msg: dict[str, Any]) -> None:
        if dev.scan is not None:
            raise ProtocolError("scan: already scanning")
        duration_ms = get_int(msg, "dur", 0, 2**31)
        interval_us = get_int(msg, "iv", 2500, 10_240_000, 1_280_000)
        window_us = get_int(msg, "win", 2500, 10_240_000, 11_250)
        scan = Scan(self.now(), interval_us / 1e6, min(window_us, interval_us) / 1e6, get_bool(msg, "act", False))
        if duration_ms:
            scan.timer = self.loop.call_later(duration_ms / 1000, self._scan_end, dev, scan)
        dev.scan = scan

    def _scan_end(self, dev: Device, scan: Scan) -> None:
        if dev.scan is scan:
            dev.scan = None
            dev.send({"t": "scan_done"})

    def _on_scan_stop(self, dev: Device, msg: dict[str, Any]) -> None:
        if dev.scan and dev.scan.timer:
            dev.scan.timer.cancel()
        dev.scan = None

    def _on_connect(self, dev: Device, msg: dict[str, Any]) -> None:
        if dev.connect is not None:
            raise ProtocolError("connect: a connection attempt is already pending")
        if len(dev.links) >= MAX_CONNECTIONS:
            raise ProtocolError(f"connect: already {MAX_CONNECTIONS} connections")
        pending = PendingConnect(get_int(msg, "atype", 0, 3), get_addr(msg, "addr"),
                                 get_int(msg, "iv", 7500, 4_000_000, 30_000))
        duration_ms = get_int(msg, "dur", 1, 2**31, 2000)
        pending.timer = self.loop.call_later(duration_ms / 1000, self._connect_timeout, dev, pending)
        dev.connect = pending

    def _connect_timeout(self, dev: Device, pending: PendingConnect) -> None:
        if dev.connect is pending:
            dev.connect = None
            dev.send({"t": "conn_fail", "status": STATUS_TIMEOUT})

    def _on_connect_cancel(self, dev: Device, msg: dict[str, Any]) -> None:
        if dev.connect is not None:
            if dev.connect.timer:
                dev.connect.timer.cancel()
            dev.connect = None
            dev.send({"t": "conn_fail", "status": STATUS_CANCELLED})

    def _link_of(self, dev: Device, msg: dict[str, Any]) -> Link | None:
        handle = get_int(msg, "c", 0, 0xEFF)
        link = dev.links.get(handle)
        if link is None and handle not in dev.closed_handles:
            raise ProtocolError(f'{msg["t"]}: no connection with handle {handle}')
        return link  # None: the link dropped moments ago; the device hears of it in a moment

    def _on_disconnect(self, dev: Device, msg: dict[str, Any]) -> None:
        link = self._link_of(dev, msg)
        if link is not None and link.terminate is None:
            link.terminate = dev

    def _on_tx(self, dev: Device, msg: dict[str, Any]) -> None:
        pdu = get_hex(msg, "p", att.MAX_MTU)
        blocks = get_int(msg, "b", 0, 1000, 0)
        if not pdu:
            raise ProtocolError("tx: empty PDU")
        link = self._link_of(dev, msg)
        if link is None:
            return
        side = link.side(dev)
        if not link.up:
            link.stats[side]["discarded"] += 1
            return
        link.queue[side].append(Packet(pdu, blocks, len(pdu) + 4))

    def _on_bye(self, dev: Device, msg: dict[str, Any]) -> None:
        log.info("%s switched its radio off", dev.label())
        self._vanish(dev, graceful=True)

    _handlers: dict[str, Callable[[Broker, Device, dict[str, Any]], None]] = {
        "addr": _on_addr,
        "adv": _on_adv,
        "adv_stop": _on_adv_stop,
        "scan": _on_scan,
        "scan_stop": _on_scan_stop,
        "connect": _on_connect,
        "connect_cancel": _on_connect_cancel,
        "disconnect": _on_disconnect,
        "tx": _on_tx,
        "bye": _on_bye,
    }

    def _stop_gap(self, dev: Device) -> None:
        dev.adv = None
        if dev.adv_task:
            dev.adv_task.cancel()
            dev.adv_task = None
        if dev.scan and dev.scan.timer:
            dev.scan.timer.cancel()
        dev.scan = None
        if dev.connect and dev.connect.timer:
            dev.connect.timer.cancel()
        dev.connect = None

    def _vanish(self, dev: Device, graceful: bool) -> None:
        """The device left: switched off (peers told at once) or gone (peers notice by supervision timeout)."""
        self._stop_gap(dev)
        for link in list(dev.links.values()):
            if graceful:
                reasons = (REASON_POWER_OFF, REASON_POWER_OFF)
                self._drop(link, *reasons)
            else:
                link.dead = True
        dev.alive = False
        self.devices.pop(dev.id, None)

    # ---------------------------------------------------------------- advertising, scanning, connecting

    async def _advertise(self, dev: Device) -> None:
        adv = dev.adv
        while adv is not None and dev.adv is adv and dev.alive:
            self._adv_event(dev, adv)
            if dev.adv is not adv:
                break
            await asyncio.sleep(adv.interval_s + self.rng.uniform(0, ADV_DELAY_S))

    def _adv_event(self, dev: Device, adv: Advertising) -> None:
        now = self.now()
        kind = 0 if adv.connectable else 2  # ADV_IND, or ADV_SCAN_IND (NimBLE's non-connectable general mode)
        for other in list(self.devices.values()):
            scan = other.scan
            if other is dev or scan is None or (now - scan.start) % scan.interval_s >= scan.window_s:
                continue
            report = {"t": "advrep", "atype": dev.atype, "addr": dev.addr.hex(), "k": kind, "rssi": dev.rssi}
            other.send(dict(report, d=adv.adv_data.hex()))
            if scan.active:  # the scan request is answered with a SCAN_RSP
                other.send(dict(report, k=4, d=adv.resp_data.hex()))
        if not adv.connectable or len(dev.links) >= MAX_CONNECTIONS:
            return
        for other in list(self.devices.values()):
            pending = other.connect
            if (other is not dev and pending is not None and pending.atype == dev.atype and pending.addr == dev.addr
                    and len(other.links) < MAX_CONNECTIONS):
                self._establish(other, dev, pending)
                return

    @staticmethod
    def _free_handle(dev: Device) -> int:
        handle = 0
        while handle in dev.links:
            handle += 1
        return handle

    def _establish(self, central: Device, peripheral: Device, pending: PendingConnect) -> None:
        if pending.timer:
            pending.timer.cancel()
        central.connect = None
        peripheral.adv = None  # legacy advertising stops when a connection is made
        params = {k: getattr(self.config, k) for k in LINK_FIELDS}
        if params["interval_ms"] is None:
            params["interval_ms"] = pending.interval_us / 1000
        now = self.now()
        link = Link(self._next_link, central, peripheral, self._free_handle(central), self._free_handle(peripheral),
                    params, now, now, drop_at=self.armed)
        self.armed = None
        self._next_link += 1
        self.links[link.id] = link
        central.links[link.ch] = link
        central.closed_handles.discard(link.ch)
        peripheral.links[link.ph] = link
        peripheral.closed_handles.discard(link.ph)
        log.info("link %d: %s -> %s", link.id, central.label(), peripheral.label())
        for dev, handle, peer, role in ((central, link.ch, peripheral, "central"),
                                        (peripheral, link.ph, central, "peripheral")):
            dev.send({"t": "conn", "c": handle, "role": role, "atype": peer.atype, "addr": peer.addr.hex(),
                      "link": link.id, **self._timing(link)})
        link.task = self.loop.create_task(self._run_link(link))

    @staticmethod
    def _timing(link: Link) -> dict[str, int]:
        p = link.params
        return {"iv": round(p["interval_ms"] * 1000), "lat": p["latency"], "sto": p["supervision_ms"]}

    # ---------------------------------------------------------------- the link layer

    async def _run_link(self, link: Link) -> None:
        next_t = self.now() + link.params["interval_ms"] / 1000
        while link.up:
            delay = next_t - self.now()
            if delay > 0:
                await asyncio.sleep(delay)
            if not link.up:
                break
            self._connection_event(link)
            interval = link.params["interval_ms"] / 1000
            next_t = max(next_t + interval, self.now() + interval / 4)

    def _connection_event(self, link: Link) -> None:
        p = link.params
        link.event += 1
        stats = link.stats
        stats["events"] += 1
        now = self.now()
        if p["latency"] and not link.queue["p2c"] and link.event % (p["latency"] + 1):
            stats["events_skipped"] += 1  # the peripheral sleeps through this one
            return
        if link.dead or self.rng.random() < p["loss"]:
            stats["events_lost"] += 1
            if (now - link.last_ok) * 1000 >= p["supervision_ms"]:
                log.info("link %d: supervision timeout", link.id)
                self._drop(link, REASON_CONN_TIMEOUT, REASON_CONN_TIMEOUT)
            return
        link.last_ok = now
        budget = {"c2p": p["ppe"], "p2c": p["ppe"]}
        lost = False
        while link.up and not lost:
            moved = False
            for side in ("c2p", "p2c"):
                queue = link.queue[side]
                if not queue or not budget[side]:
                    continue
                if self.rng.random() < p["loss"]:
                    stats[side]["retransmissions"] += 1
                    lost = True  # a packet not acknowledged ends the event; it is sent again at the next one
                    break
                budget[side] -= 1
                moved = True
                pkt = queue[0]
                size = min(p["ll_payload"], pkt.left)
                pkt.left -= size
                stats[side]["ll_packets"] += 1
                stats[side]["ll_bytes"] += size
                if pkt.left == 0:
                    queue.popleft()
                    self._deliver(link, side, pkt)
                    if not link.up:
                        return
            if not moved:
                break
        self._flush_credit(link)
        if link.up and link.terminate is not None:
            by_central = link.terminate is link.central
            self._drop(link, REASON_LOCAL_HOST if by_central else REASON_REMOTE_USER,
                       REASON_REMOTE_USER if by_central else REASON_LOCAL_HOST)

    def _deliver(self, link: Link, side: str, pkt: Packet) -> None:
        receiver, handle = (link.peripheral, link.ph) if side == "c2p" else (link.central, link.ch)
        rule = link.drop_at
        if rule is not None and rule.matches(side, pkt.pdu):
            rule.seen += 1
            if rule.seen == rule.nth:
                link.drop_at = None
                if not rule.deliver:  # lost with the link: the sender's buffers stay taken, as on air
                    log.info("link %d: dropped at a planned PDU, before it arrived", link.id)
                    link.stats[side]["discarded"] += 1
                    self._drop(link, rule.reason, rule.reason)
                    return
                link.drop_after, link.drop_reason = 1, rule.reason
        link.trace.append((side, pkt.pdu[0], pdu_handle(pkt.pdu), len(pkt.pdu)))
        stats = link.stats[side]
        stats["pdus"] += 1
        stats["bytes"] += len(pkt.pdu)
        link.credit[side] += pkt.blocks
        op = pkt.pdu[0]
        if op == att.MTU_REQ and len(pkt.pdu) == 3:
            link.mtu_req = int.from_bytes(pkt.pdu[1:3], "little")
        elif op == att.MTU_RSP and len(pkt.pdu) == 3 and link.mtu_req:
            link.mtu = max(att.DEFAULT_MTU, min(link.mtu_req, int.from_bytes(pkt.pdu[1:3], "little")))
        receiver.send({"t": "rx", "c": handle, "p": pkt.pdu.hex()})
        if link.drop_after is not None:
            link.drop_after -= 1
            if link.drop_after <= 0:
                log.info("link %d: dropped after the planned number of packets", link.id)
                self._drop(link, link.drop_reason, link.drop_reason)

    def _flush_credit(self, link: Link) -> None:
        for side, dev, handle in (("c2p", link.central, link.ch), ("p2c", link.peripheral, link.ph)):
            blocks = link.credit[side]
            if blocks:
                link.credit[side] = 0
                dev.send({"t": "done", "c": handle, "b": blocks})

    def _drop(self, link: Link, reason_central: int, reason_peripheral: int) -> None:
        if not link.up:
            return
        self._flush_credit(link)
        link.up = False
        link.closed = self.now()
        link.reason = {"central": reason_central, "peripheral": reason_peripheral}
        for side, dev, handle, reason in (("c2p", link.central, link.ch, reason_central),
                                          ("p2c", link.peripheral, link.ph, reason_peripheral)):
            link.stats[side]["discarded"] += len(link.queue[side])
            link.queue[side].clear()
            if dev.links.get(handle) is link:
                del dev.links[handle]
                dev.closed_handles.add(handle)
            dev.send({"t": "disc", "c": handle, "reason": reason})
        log.info("link %d dropped (reason 0x%02x/0x%02x)", link.id, reason_central, reason_peripheral)
        try:
            current = asyncio.current_task()
        except RuntimeError:
            current = None
        if link.task is not None and link.task is not current:
            link.task.cancel()

    # ---------------------------------------------------------------- control API

    def control(self, op: str, **args: Any) -> Any:
        """Run one control operation (docs/simulator.md lists them); BrokerError if refused."""
        handler = getattr(self, f"_ctl_{op}", None)
        if handler is None:
            ops = sorted(name[5:] for name in dir(self) if name.startswith("_ctl_"))
            raise BrokerError(f"unknown control operation {op!r}; operations: {', '.join(ops)}")
        try:
            return handler(**args)
        except TypeError as exc:
            raise BrokerError(f"{op}: {exc}") from None

    def _ctl_ping(self) -> dict[str, Any]:
        return {"version": VERSION, "time_ms": round((self.now() - self._t0) * 1000)}

    def _ctl_config(self, link: int | None = None, device: int | str | None = None, **settings: Any) -> dict[str, Any]:
        if link is not None:
            return self._set_link(self._find_link(link), settings)
        if device is not None:
            dev = self._find_device(device)
            if set(settings) - {"rssi"}:
                raise BrokerError("a device has only one setting: rssi")
            if "rssi" in settings:
                dev.rssi = check_setting("rssi", settings["rssi"])
            return {"rssi": dev.rssi}
        checked = {name: check_setting(name, value) for name, value in settings.items()}
        for name, value in checked.items():
            setattr(self.config, name, value)
        live = {k: v for k, v in checked.items() if k in LINK_FIELDS and v is not None}
        for each in list(self.links.values()):
            if each.up and live:
                self._set_link(each, live)
        if "tx_buffers" in checked:
            for dev in self.devices.values():
                dev.send({"t": "cfg", "tx_buffers": self.config.tx_buffers})
        return asdict(self.config)

    def _ctl_reset(self) -> dict[str, Any]:
        """Back to the default settings, no drop_at armed for the next link (devices and links stay)."""
        self.armed = None
        defaults = asdict(RadioConfig())
        defaults["interval_ms"] = None
        return self._ctl_config(**defaults)

    def _set_link(self, link: Link, settings: dict[str, Any]) -> dict[str, Any]:
        unknown = set(settings) - set(LINK_FIELDS)
        if unknown:
            raise BrokerError(
                f"not a link setting: {', '.join(sorted(unknown))}; link settings: {', '.join(LINK_FIELDS)}"
            )
        checked = {name: check_setting(name, value) for name, value in settings.items()}
        if checked.get("interval_ms", 0) is None:
            raise BrokerError("interval_ms of a link must be a number")
        timing_before = self._timing(link)
        link.params.update(checked)
        if link.up and self._timing(link) != timing_before:
            for dev, handle in ((link.central, link.ch), (link.peripheral, link.ph)):
                dev.send({"t": "update", "c": handle, **self._timing(link)})
        return dict(link.params)

    def _ctl_drop(self, link: int, reason: int = REASON_CONN_TIMEOUT, after: int | None = None) -> dict[str, Any]:
        target = self._find_link(link)
        if not isinstance(reason, int) or not 0 < reason < 256:
            raise BrokerError(f"reason must be an HCI error code 1..255, got {reason!r}")
        if not target.up:
            raise BrokerError(f"link {link} is already down")
        if after is None:
            self._drop(target, reason, reason)
        else:
            if isinstance(after, bool) or not isinstance(after, int) or after < 1:
                raise BrokerError(f"after must be a positive number of packets, got {after!r}")
            target.drop_after, target.drop_reason = after, reason
        return self._link_info(target)

    def _ctl_drop_at(self, nth: int = 1, link: int | None = None, dir: str | None = None, att: int | None = None,
                     handle: int | None = None, deliver: bool = True,
                     reason: int = REASON_CONN_TIMEOUT) -> dict[str, Any]:
        target = None if link is None else self._find_link(link)
        if target is not None and not target.up:
            raise BrokerError(f"link {link} is already down")
        if dir not in (None, "c2p", "p2c"):
            raise BrokerError(f'dir must be "c2p" (central to peripheral), "p2c" or null, got {dir!r}')
        for name, value, lo, hi in (("nth", nth, 1, 1 << 31), ("att", att, 0, 0xFF), ("handle", handle, 0, 0xFFFF),
                                    ("reason", reason, 1, 0xFF)):
            if value is None and name in ("att", "handle"):
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
                raise BrokerError(f"{name} must be an integer {lo}..{hi}, got {value!r}")
        if not isinstance(deliver, bool):
            raise BrokerError(f"deliver must be true or false, got {deliver!r}")
        rule = DropRule(nth, dir, att, handle, deliver, reason)
        if target is None:
            self.armed = rule
        else:
            target.drop_at = rule
        return {"link": link, **asdict(rule)}

    def _ctl_trace(self, link: int) -> list[dict[str, Any]]:
        return [{"dir": side, "att": op, "handle": handle, "len": size}
                for side, op, handle, size in self._find_link(link).trace]

    def _ctl_devices(self) -> list[dict[str, Any]]:
        return [
            {"device": d.id, "name": d.name, "addr": format_address(d.addr), "atype": d.atype, "rssi": d.rssi,
             "advertising": d.adv is not None, "scanning": d.scan is not None, "connecting": d.connect is not None,
             "links": sorted(link.id for link in d.links.values())}
            for d in self.devices.values()
        ]

    def _ctl_links(self, all: bool = False) -> list[dict[str, Any]]:
        return [self._link_info(link) for link in self.links.values() if all or link.up]

    def _ctl_stats(self, link: int) -> dict[str, Any]:
        return self._link_info(self._find_link(link))

    def _ctl_inject(self, device: int | str, line: str) -> dict[str, Any]:
        """Send a raw line to a device (to test how it copes with a broken broker)."""
        dev = self._find_device(device)
        if not isinstance(line, str) or "\n" in line:
            raise BrokerError("line must be a string without a newline")
        dev.writer.write(line.encode() + b"\n")
        return {"device": dev.id}

    def _find_link(self, link_id: Any) -> Link:
        link = self.links.get(link_id) if isinstance(link_id, int) else None
        if link is None:
            raise BrokerError(f"no link {link_id!r}; links: {sorted(self.links)}")
        return link

    def _find_device(self, key: Any) -> Device:
        for dev in self.devices.values():
            if key == dev.id or key == dev.name:
                return dev
            if isinstance(key, str) and ":" in key:
                try:
                    if parse_address(key) == dev.addr:
                        return dev
                except ProtocolError:
                    break
        raise BrokerError(f"no device {key!r}")

    def _link_info(self, link: Link) -> dict[str, Any]:
        def end(dev: Device, handle: int) -> dict[str, Any]:
            return {"device": dev.id, "name": dev.name, "addr": format_address(dev.addr), "handle": handle}

        stats = dict(link.stats)
        for side in ("c2p", "p2c"):
            stats[side] = dict(stats[side], queued=len(link.queue[side]))
        return {
            "link": link.id, "up": link.up, "reason": link.reason, "mtu": link.mtu,
            "drop_at": None if link.drop_at is None else asdict(link.drop_at),
            "central": end(link.central, link.ch), "peripheral": end(link.peripheral, link.ph),
            "params": dict(link.params), "stats": stats,
            "created_ms": round((link.created - self._t0) * 1000),
            "closed_ms": None if link.closed is None else round((link.closed - self._t0) * 1000),
        }


class BrokerThread:
    """A broker on its own event loop in a background thread, for tests: `with BrokerThread() as radio: ...`.

    `radio.address` is what PAYTOKEN_RADIO must hold; every control operation is a method (`config`, `reset`,
    `drop`, `drop_at`, `trace`, `devices`, `links`, `stats`, `inject`, `ping`); `call(coro)` runs a coroutine
    (e.g. a `RadioClient` scenario) on the broker's loop and returns its result.
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, seed: int | None = None,
                 config: RadioConfig | None = None):
        self.broker = Broker(host, port, seed=seed, config=config)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="simradio-broker", daemon=True)

    @property
    def port(self) -> int:
        return self.broker.port

    @property
    def address(self) -> str:
        return f"{self.broker.host}:{self.broker.port}"

    def start(self) -> BrokerThread:
        self._thread.start()
        self.call(self.broker.start())
        return self

    def stop(self) -> None:
        if self._thread.is_alive():
            self.call(self.broker.stop())
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
        self._loop.close()

    def __enter__(self) -> BrokerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start a coroutine on the broker's loop and return at once; `.result(timeout)` waits for it."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def control(self, op: str, **args: Any) -> Any:
        async def run() -> Any:
            return self.broker.control(op, **args)

        return self.call(run())

    def ping(self) -> dict[str, Any]:
        return self.control("ping")

    def config(self, **settings: Any) -> dict[str, Any]:
        return self.control("config", **settings)

    def reset(self) -> dict[str, Any]:
        return self.control("reset")

    def drop(self, link: int, reason: int = REASON_CONN_TIMEOUT, after: int | None = None) -> dict[str, Any]:
        return self.control("drop", link=link, reason=reason, after=after)

    def drop_at(self, nth: int = 1, link: int | None = None, dir: str | None = None, att: int | None = None,
                handle: int | None = None, deliver: bool = True, reason: int = REASON_CONN_TIMEOUT) -> dict[str, Any]:
        return self.control("drop_at", nth=nth, link=link, dir=dir, att=att, handle=handle, deliver=deliver,
                            reason=reason)

    def trace(self, link: int) -> list[dict[str, Any]]:
        return self.control("trace", link=link)

    def devices(self) -> list[dict[str, Any]]:
        return self.control("devices")

    def links(self, all: bool = False) -> list[dict[str, Any]]:
        return self.control("links", all=all)

    def stats(self, link: int) -> dict[str, Any]:
        return self.control("stats", link=link)

    def inject(self, device: int | str, line: str) -> dict[str, Any]:
        return self.control("inject", device=device, line=line)

    def wait_for(self, predicate: Callable[[], T], timeout: float = 5.0, interval: float = 0.01) -> T:
        """Poll `predicate` (e.g. lambda: radio.links()) until it returns something true; TimeoutError if not."""
        import time

        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise TimeoutError(f"condition not met within {timeout} s")
            time.sleep(interval)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m paytoken_host.simradio.broker",
        description="Simulated BLE radio for MicroPython unix-port devices (docs/simulator.md, section Radio). "
        "Prints PAYTOKEN_RADIO=host:port once listening; give that to every device.",
    )
    ap.add_argument("--host", default="127.0.0.1", help="address to listen on (default: loopback)")
    ap.add_argument("--port", type=int, default=0, help="TCP port (default 0: any free port)")
    ap.add_argument("--seed", type=int, default=None, help="seed for packet loss and advertising jitter")
    ap.add_argument("--interval-ms", type=float, default=None, help="connection interval for every link "
                    "(default: what the central asks for, 30 ms)")
    ap.add_argument("--latency", type=int, default=0, help="peripheral latency (connection events)")
    ap.add_argument("--loss", type=float, default=0.0, help="LL packet loss probability 0..1")
    ap.add_argument("--ppe", type=int, default=4, help="LL packets per connection event and direction")
    ap.add_argument("--supervision-ms", type=int, default=2560, help="supervision timeout")
    ap.add_argument("--ll-payload", type=int, default=27, help="LL payload bytes per packet (27..251)")
    ap.add_argument("--tx-buffers", type=int, default=12, help="transmit buffers per device")
    ap.add_argument("-v", "--verbose", action="store_true", help="log devices, links and drops to stderr")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, stream=sys.stderr,
                        format="simradio: %(message)s")
    config = RadioConfig()
    try:
        for f in fields(RadioConfig):
            value = getattr(args, f.name, None)
            if value is not None:
                setattr(config, f.name, check_setting(f.name, value))
    except BrokerError as exc:
        ap.error(str(exc))

    async def run() -> None:
        broker = Broker(args.host, args.port, seed=args.seed, config=config)
        port = await broker.start()
        print(f"PAYTOKEN_RADIO={args.host}:{port}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await broker.stop()

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
