"""A bleak backend for the simulated radio: host code written against bleak talks to simulated devices (MicroPython
processes on the broker, docs/simulator.md "Radio") unchanged; only the backend argument differs.

    from bleak import BleakClient, BleakScanner
    from paytoken_host.simradio.bleak_backend import SimBleakClient, SimBleakScanner

    device = await BleakScanner.find_device_by_name("payee", backend=SimBleakScanner)   # env PAYTOKEN_RADIO
    async with BleakClient(device, backend=SimBleakClient) as client:                  # or radio="host:port"
        await client.write_gatt_char(uuid, b"hi", response=True)

Each scanner and each connected client is its own CPython device on the broker (`RadioClient`), with its own
address; a real host adapter is one device shared by all of them. The client behaves as bleak's BlueZ backend
does where backends differ: the ATT MTU is exchanged on connect (517 offered) and `mtu_size` reports the result;
the GAP (0x1800) and GATT (0x1801) services are used but not listed in `services`; a characteristic's handle is
its declaration handle; the disconnected callback runs on every disconnect, ours included; a str address is
looked up with a scan first (`BleakDeviceNotFoundError` if it does not show up within the timeout).

What the simulated radio cannot do raises `BleakError` with the reason: pairing (no security manager), long reads
and writes (the simulated GATT server has no read blob or prepare/execute write: a read returns at most
ATT_MTU - 1 bytes, and a write longer than ATT_MTU - 3 is refused before anything is sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bleak.assigned_numbers import CHARACTERISTIC_PROPERTIES, CharacteristicPropertyName
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.client import BaseBleakClient, NotifyCallback
from bleak.backends.descriptor import BleakGATTDescriptor
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData, AdvertisementDataCallback, BaseBleakScanner
from bleak.backends.service import BleakGATTService, BleakGATTServiceCollection
from bleak.exc import (
    CONTROLLER_ERROR_CODES,
    BleakBluetoothNotAvailableError,
    BleakBluetoothNotAvailableReason,
    BleakDeviceNotFoundError,
    BleakError,
    BleakGATTProtocolError,
)
from bleak.uuids import normalize_uuid_16, normalize_uuid_32, normalize_uuid_str

from . import att
from .att import AttError, Uuid
from .client import AdvReport, Characteristic, Connection, Descriptor, RadioClient, RadioError, Service
from .protocol import ProtocolError, format_address, parse_address

log = logging.getLogger("paytoken.simradio.bleak")

ENV = "PAYTOKEN_RADIO"
PREFERRED_MTU = 517  # what BlueZ offers in its MTU exchange
SCAN_INTERVAL_US = 30_000  # continuous scanning (window = interval): every advertising event is seen
CONNECT_INTERVAL_US = 30_000  # connection interval the client asks for (NimBLE's and a typical host's default)

GAP_SERVICE = normalize_uuid_16(0x1800)
GATT_SERVICE = normalize_uuid_16(0x1801)
DEVICE_NAME = normalize_uuid_16(0x2A00)
CCCD = normalize_uuid_16(0x2902)
HIDDEN_SERVICES = {GAP_SERVICE, GATT_SERVICE}  # BlueZ keeps these to itself

# AD types (Bluetooth Assigned Numbers, "Common Data Types")
AD_UUID16 = (0x02, 0x03)
AD_UUID32 = (0x04, 0x05)
AD_UUID128 = (0x06, 0x07)
AD_NAME_SHORT = 0x08
AD_NAME_COMPLETE = 0x09
AD_TX_POWER = 0x0A
AD_SERVICE_DATA16 = 0x16
AD_SERVICE_DATA32 = 0x20
AD_SERVICE_DATA128 = 0x21
AD_MANUFACTURER = 0xFF


def radio_address(radio: str | None) -> str | None:
    """The broker's "host:port" from the argument or PAYTOKEN_RADIO; None if neither is set. ValueError if it
    is not host:port."""
    value = radio if radio is not None else os.environ.get(ENV)
    if value is None or value == "":
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"simulated radio address must be host:port (as the broker prints it), got {value!r}")
    return value


async def open_radio(radio: str | None, name: str) -> RadioClient:
    """Join the broker as a new device; BleakBluetoothNotAvailableError when there is no broker to join."""
    if radio is None:
        raise BleakBluetoothNotAvailableError(
            f"no simulated radio: set {ENV}=host:port (python -m paytoken_host.simradio.broker prints it) "
            "or pass radio=",
            BleakBluetoothNotAvailableReason.NO_BLUETOOTH,
        )
    client = RadioClient(radio, name=name)
    try:
        return await client.start()
    except (OSError, TimeoutError, RadioError) as exc:
        await client.close(graceful=False)
        raise BleakBluetoothNotAvailableError(
            f"simulated radio at {radio} does not answer: {exc or type(exc).__name__}",
            BleakBluetoothNotAvailableReason.NO_BLUETOOTH,
        ) from exc


def uuid_str(uuid: Uuid) -> str:
    """A UUID as carried in ATT (little-endian, 2 or 16 bytes) in bleak's form (lower-case, 128-bit)."""
    if len(uuid.le) == 2:
        return normalize_uuid_16(int.from_bytes(uuid.le, "little"))
    return normalize_uuid_str(str(uuid))


# --------------------------------------------------------------------------- advertising data


@dataclass
class ParsedAd:
    """The AD structures of advertising or scan response data (Core Supplement Part A) that bleak reports."""

    local_name: str | None = None
    name_complete: bool = False
    service_uuids: list[str] = field(default_factory=list)
    service_data: dict[str, bytes] = field(default_factory=dict)
    manufacturer_data: dict[int, bytes] = field(default_factory=dict)
    tx_power: int | None = None
    error: str | None = None  # what was wrong with the data; the structures before it are kept

    def merge(self, other: ParsedAd) -> ParsedAd:
        """This data with another's added (advertising data, then its scan response: as BlueZ merges them)."""
        name, complete = self.local_name, self.name_complete
        if other.local_name is not None and (name is None or (other.name_complete and not complete)):
            name, complete = other.local_name, other.name_complete
        return ParsedAd(
            name,
            complete,
            self.service_uuids + [u for u in other.service_uuids if u not in self.service_uuids],
            {**self.service_data, **other.service_data},
            {**self.manufacturer_data, **other.manufacturer_data},
            other.tx_power if other.tx_power is not None else self.tx_power,
            self.error or other.error,
        )


def parse_ad(data: bytes) -> ParsedAd:
    """Parse legacy advertising data (≤ 31 bytes of length-type-value structures). A structure running past the
    end, or one too short for its type, ends the parse with `error` saying so; what came before is kept."""
    ad = ParsedAd()
    i = 0
    while i < len(data):
        length = data[i]
        if length == 0:  # the rest is padding
            break
        if i + 1 + length > len(data):
            ad.error = f"AD structure at byte {i} claims {length} bytes, only {len(data) - i - 1} follow"
            break
        kind, value = data[i + 1], bytes(data[i + 2 : i + 1 + length])
        i += 1 + length
        try:
            _parse_structure(ad, kind, value)
        except ValueError as exc:
            ad.error = f"AD type 0x{kind:02x}: {exc}"
            break
    return ad


def _parse_structure(ad: ParsedAd, kind: int, value: bytes) -> None:
    def uuids(size: int) -> list[bytes]:
        if len(value) % size:
            raise ValueError(f"{len(value)} bytes are not a list of {size}-byte UUIDs")
        return [value[j : j + size] for j in range(0, len(value), size)]

    def add(uuid: str) -> None:
        if uuid not in ad.service_uuids:
            ad.service_uuids.append(uuid)

    if kind in AD_UUID16:
        for u in uuids(2):
            add(normalize_uuid_16(int.from_bytes(u, "little")))
    elif kind in AD_UUID32:
        for u in uuids(4):
            add(normalize_uuid_32(int.from_bytes(u, "little")))
    elif kind in AD_UUID128:
        for u in uuids(16):
            add(str(Uuid(u)))
    elif kind in (AD_NAME_SHORT, AD_NAME_COMPLETE):
        complete = kind == AD_NAME_COMPLETE
        if ad.local_name is None or (complete and not ad.name_complete):
            ad.local_name, ad.name_complete = value.decode("utf-8", errors="replace"), complete
    elif kind == AD_TX_POWER:
        if len(value) != 1:
            raise ValueError("TX power level is one byte")
        ad.tx_power = struct.unpack("b", value)[0]
    elif kind in (AD_SERVICE_DATA16, AD_SERVICE_DATA32, AD_SERVICE_DATA128):
        size = {AD_SERVICE_DATA16: 2, AD_SERVICE_DATA32: 4, AD_SERVICE_DATA128: 16}[kind]
        if len(value) < size:
            raise ValueError(f"service data shorter than its {size}-byte UUID")
        raw = value[:size]
        uuid = (normalize_uuid_16(int.from_bytes(raw, "little")) if size == 2
                else normalize_uuid_32(int.from_bytes(raw, "little")) if size == 4 else str(Uuid(raw)))
        ad.service_data[uuid] = value[size:]
    elif kind == AD_MANUFACTURER:
        if len(value) < 2:
            raise ValueError("manufacturer data shorter than its company identifier")
        ad.manufacturer_data[int.from_bytes(value[:2], "little")] = value[2:]


@dataclass(frozen=True)
class SimDevice:
    """BLEDevice.details of a device seen on the simulated radio: what connecting to it takes."""

    addr: bytes
    atype: int
    connectable: bool
    radio: str


# --------------------------------------------------------------------------- scanner


class SimBleakScanner(BaseBleakScanner):
    """bleak scanner on the simulated radio. Keyword arguments beyond bleak's: radio ("host:port", default
    PAYTOKEN_RADIO), radio_name (this device's name in the broker's lists)."""

    def __init__(
        self,
        detection_callback: AdvertisementDataCallback | None,
        service_uuids: list[str] | None,
        scanning_mode: str = "active",
        *,
        radio: str | None = None,
        radio_name: str = "bleak-scanner",
        **kwargs: Any,  # bluez=, cb=: other backends' arguments
    ) -> None:
        super().__init__(detection_callback, service_uuids)
        if scanning_mode not in ("active", "passive"):
            raise BleakError(f'scanning_mode must be "active" or "passive", got {scanning_mode!r}')
        self._active = scanning_mode == "active"
        if service_uuids is not None:  # bleak's form, so that "180d" matches as "0000180d-0000-1000-...": ValueError
            self._service_uuids = [normalize_uuid_str(u) for u in service_uuids]  # for what is not a UUID
        self._radio_address = radio_address(radio)
        self._name = radio_name
        self._radio: RadioClient | None = None
        self._heard: dict[bytes, list[bytes | int | None]] = {}  # addr -> [adv data, scan response, adv type]

    async def start(self) -> None:
        if self._radio is not None:
            raise BleakError("Scanner already started")
        self.seen_devices = {}
        self._heard = {}
        radio = await open_radio(self._radio_address, self._name)
        radio.on_adv = self._on_adv
        self._radio = radio
        try:
            await radio.send({"t": "scan", "dur": 0, "iv": SCAN_INTERVAL_US, "win": SCAN_INTERVAL_US,
                              "act": self._active})
        except BaseException:
            self._radio = None
            await radio.close()
            raise

    async def stop(self) -> None:
        radio, self._radio = self._radio, None
        if radio is None:
            return
        radio.on_adv = None
        try:
            await radio.send({"t": "scan_stop"})
            await radio.close()
        except (RadioError, OSError):  # the broker went away: nothing left to stop
            await radio.close(graceful=False)

    def _on_adv(self, report: AdvReport) -> None:
        heard = self._heard.setdefault(report.addr, [None, None, None])
        if report.adv_type == 4:  # SCAN_RSP
            heard[1] = report.data
        else:
            heard[0], heard[2] = report.data, report.adv_type
        adv_raw, rsp_raw, adv_type = heard
        parsed = parse_ad(adv_raw) if isinstance(adv_raw, bytes) else ParsedAd()
        if isinstance(rsp_raw, bytes):
            parsed = parsed.merge(parse_ad(rsp_raw))
        if parsed.error:
            log.warning("%s: malformed advertising data (%s): %s", format_address(report.addr), parsed.error,
                        report.data.hex())
        if not self.is_allowed_uuid(parsed.service_uuids):
            return
        adv = AdvertisementData(
            local_name=parsed.local_name,
            manufacturer_data=parsed.manufacturer_data,
            service_data=parsed.service_data,
            service_uuids=parsed.service_uuids,
            tx_power=parsed.tx_power,
            rssi=report.rssi,
            platform_data=(adv_raw, rsp_raw, adv_type, parsed.error),
        )
        assert self._radio_address is not None
        details = SimDevice(report.addr, report.atype, adv_type == 0, self._radio_address)
        address = format_address(report.addr).upper()
        device = self.create_or_update_device(address, address, parsed.local_name, details, adv)
        try:
            self.call_detection_callbacks(device, adv)
        except Exception:  # the radio reader calls us: a failing callback must not stop the scan
            log.exception("detection callback failed")


# --------------------------------------------------------------------------- client


def _disconnect_reason(reason: int | None) -> str:
    if reason is None:
        return "link down"
    return f"reason 0x{reason:02x}: {CONTROLLER_ERROR_CODES.get(reason, 'unknown')}"


class SimBleakClient(BaseBleakClient):
    """bleak client on the simulated radio. Keyword arguments beyond bleak's: radio ("host:port", default
    PAYTOKEN_RADIO), radio_name (this device's name in the broker's lists), mtu (offered in the exchange on connect,
    23..517), interval_us (connection interval asked for)."""

    def __init__(
        self,
        address_or_ble_device: BLEDevice | str,
        *,
        disconnected_callback: Callable[[], None] | None = None,
        timeout: float = 30.0,
        services: set[str] | None = None,
        radio: str | None = None,
        radio_name: str = "bleak-client",
        mtu: int = PREFERRED_MTU,
        interval_us: int = CONNECT_INTERVAL_US,
        **kwargs: Any,  # bluez=, winrt=: other backends' arguments
    ) -> None:
        super().__init__(address_or_ble_device, disconnected_callback=disconnected_callback, timeout=timeout)
        if not att.DEFAULT_MTU <= mtu <= att.MAX_MTU:
            raise ValueError(f"mtu must be in {att.DEFAULT_MTU}..{att.MAX_MTU}, got {mtu}")
        if not 7_500 <= interval_us <= 4_000_000:
            raise ValueError(f"interval_us must be in 7500..4000000, got {interval_us}")
        self._device: SimDevice | None = None
        self._device_name: str | None = None
        if isinstance(address_or_ble_device, BLEDevice):
            self._device_name = address_or_ble_device.name
            if isinstance(address_or_ble_device.details, SimDevice):
                self._device = address_or_ble_device.details
        try:
            parse_address(self.address)
        except ProtocolError as exc:
            raise ValueError(f"{exc} (expected AA:BB:CC:DD:EE:FF)") from None
        self._radio_address = radio_address(radio if radio is not None or self._device is None
                                            else self._device.radio)
        self._requested_services = services
        self._name = radio_name
        self._mtu_offer = mtu
        self._interval_us = interval_us
        self._radio: RadioClient | None = None
        self._conn: Connection | None = None
        self._watch: asyncio.Task[None] | None = None
        self._callbacks: dict[int, NotifyCallback] = {}  # value handle -> callback
        self._cache: dict[int, bytes] = {}  # handle -> last value read or notified (use_cached)
        self._mtu = att.DEFAULT_MTU

    # ------------------------------------------------------------ connection

    @property
    def name(self) -> str:
        if self._device_name:
            return self._device_name
        return self.address.replace(":", "-").upper()

    @property
    def mtu_size(self) -> int:
        return self._mtu

    @property
    def is_connected(self) -> bool:
        return self._conn is not None and not self._conn.disconnected.is_set()

    async def connect(self, pair: bool, **kwargs: Any) -> None:
        if self.is_connected:
            raise BleakError("Client is already connected")
        if pair:
            log.warning("pairing requested: the simulated radio has no security manager, connecting without")
        timeout = kwargs.get("timeout", self._timeout)
        if self._device is None:
            from bleak import BleakScanner

            found = await BleakScanner.find_device_by_address(self.address, timeout=timeout,
                                                              backend=SimBleakScanner, radio=self._radio_address)
            if found is None:
                raise BleakDeviceNotFoundError(self.address, f"Device with address {self.address} was not found.")
            assert isinstance(found.details, SimDevice)
            self._device = found.details
            self._device_name = self._device_name or found.name
        radio = await open_radio(self._radio_address, self._name)
        self._radio = radio
        try:
            async with asyncio.timeout(timeout):
                try:
                    conn = await radio.connect(self._device.addr, self._device.atype,
                                               timeout_ms=max(1, int(timeout * 1000)), interval_us=self._interval_us)
                except TimeoutError:
                    raise TimeoutError(f"{self.address} did not accept a connection within {timeout} s "
                                       "(not advertising connectable, or no free connection slot)") from None
                conn.queue_notifications = False
                conn.on_notify = self._on_notify
                self._conn = conn
                self._watch = asyncio.get_running_loop().create_task(self._watch_link(conn))
                self._mtu = await self._att(conn, conn.exchange_mtu(self._mtu_offer))
                self.services = await self._discover(conn)
        except BaseException:
            await self._teardown(notify=False)
            raise

    async def _discover(self, conn: Connection) -> BleakGATTServiceCollection:
        collection = BleakGATTServiceCollection()
        services: list[Service] = await self._att(conn, conn.discover_services())
        for svc in services:
            chars: list[Characteristic] = await self._att(conn, conn.discover_characteristics(svc.start, svc.end))
            uuid = uuid_str(svc.uuid)
            if uuid == GAP_SERVICE:
                await self._read_device_name(conn, chars)
            if uuid in HIDDEN_SERVICES:
                continue
            if self._requested_services is not None and uuid not in self._requested_services:
                continue
            service = BleakGATTService(svc, svc.start, uuid)
            collection.add_service(service)
            for ch in chars:
                props: list[CharacteristicPropertyName] = [
                    name for bit, name in CHARACTERISTIC_PROPERTIES.items() if bit <= 0x80 and ch.properties & bit]
                char = BleakGATTCharacteristic(ch, ch.decl_handle, uuid_str(ch.uuid), props,
                                               lambda: self._mtu - 3, service)
                collection.add_characteristic(char)
                if ch.end_handle > ch.value_handle:
                    descriptors: list[Descriptor] = await self._att(
                        conn, conn.discover_descriptors(ch.value_handle, ch.end_handle))
                    for d in descriptors:
                        collection.add_descriptor(BleakGATTDescriptor(d, d.handle, uuid_str(d.uuid), char))
        return collection

    async def _read_device_name(self, conn: Connection, chars: list[Characteristic]) -> None:
        # BlueZ names a device from its advertising, else from the GAP Device Name characteristic.
        if self._device_name:
            return
        for ch in chars:
            if uuid_str(ch.uuid) == DEVICE_NAME and ch.properties & 0x02:
                with contextlib.suppress(AttError):
                    self._device_name = (await self._att(conn, conn.read(ch.value_handle))).decode("utf-8", "replace")

    async def _watch_link(self, conn: Connection) -> None:
        await conn.disconnected.wait()
        log.debug("%s: disconnected (%s)", self.address, _disconnect_reason(conn.reason))
        if self._conn is conn:
            await self._teardown(notify=True)

    async def _teardown(self, notify: bool) -> None:
        conn, radio, watch = self._conn, self._radio, self._watch
        self._conn = self._radio = self._watch = None
        self.services = None
        self._callbacks.clear()
        self._cache.clear()
        self._mtu = att.DEFAULT_MTU
        if watch is not None and watch is not asyncio.current_task():
            watch.cancel()
        if radio is not None:
            try:
                if conn is not None and not conn.disconnected.is_set():
                    await conn.disconnect(timeout=2)
                await radio.close()
            except (RadioError, OSError, TimeoutError):
                await radio.close(graceful=False)
        if notify and conn is not None and self._disconnected_callback is not None:
            asyncio.get_running_loop().call_soon(self._disconnected_callback)

    async def disconnect(self) -> None:
        conn = self._conn
        if conn is None:
            return
        try:
            if not conn.disconnected.is_set():
                await conn.disconnect(timeout=10)
        except (RadioError, OSError, TimeoutError) as exc:
            log.warning("%s: disconnect: %r", self.address, exc)
        finally:
            if self._conn is conn:
                await self._teardown(notify=True)

    async def pair(self, *args: Any, **kwargs: Any) -> None:
        raise BleakError("pairing is not available on the simulated radio: it has no security manager")

    async def unpair(self) -> None:
        raise BleakError("pairing is not available on the simulated radio: it has no security manager")

    # ------------------------------------------------------------ GATT

    def _link(self) -> Connection:
        conn = self._conn
        if conn is None or conn.disconnected.is_set():
            raise BleakError("Not connected")
        return conn

    @staticmethod
    async def _att(conn: Connection, operation: Any) -> Any:
        """Await one ATT operation on conn, with its errors as bleak raises them."""
        try:
            return await operation
        except AttError as exc:
            raise BleakGATTProtocolError(exc.code) from exc
        except ConnectionError as exc:
            raise BleakError(f"Not connected: the link dropped ({_disconnect_reason(conn.reason)})") from exc
        except RadioError as exc:
            raise BleakError(f"simulated radio: {exc}") from exc

    async def read_gatt_char(self, characteristic: BleakGATTCharacteristic, *, use_cached: bool = False,
                             **kwargs: Any) -> bytearray:
        ch: Characteristic = characteristic.obj
        return await self._read(ch.value_handle, use_cached)

    async def read_gatt_descriptor(self, descriptor: BleakGATTDescriptor, *, use_cached: bool = False,
                                   **kwargs: Any) -> bytearray:
        return await self._read(descriptor.handle, use_cached)

    async def _read(self, handle: int, use_cached: bool) -> bytearray:
        conn = self._link()
        if use_cached and handle in self._cache:
            return bytearray(self._cache[handle])
        value: bytes = await self._att(conn, conn.read(handle))
        self._cache[handle] = value
        return bytearray(value)

    async def write_gatt_char(self, characteristic: BleakGATTCharacteristic, data: Any, response: bool) -> None:
        ch: Characteristic = characteristic.obj
        await self._write(ch.value_handle, bytes(data), response)

    async def write_gatt_descriptor(self, descriptor: BleakGATTDescriptor, data: Any) -> None:
        await self._write(descriptor.handle, bytes(data), True)

    async def _write(self, handle: int, data: bytes, response: bool) -> None:
        conn = self._link()
        limit = self._mtu - 3
        if len(data) > limit:
            raise BleakError(f"{len(data)} bytes do not fit one ATT write at MTU {self._mtu} (at most {limit}); "
                             "long writes (prepare/execute) are not available on the simulated radio")
        await self._att(conn, conn.write(handle, data, response=response))

    async def start_notify(self, characteristic: BleakGATTCharacteristic, callback: NotifyCallback,
                           **kwargs: Any) -> None:
        conn = self._link()
        ch: Characteristic = characteristic.obj
        props = characteristic.properties
        if "notify" not in props and "indicate" not in props:
            raise BleakError(f"characteristic {characteristic.uuid} (handle {characteristic.handle}) "
                             "supports neither notify nor indicate")
        cccd = characteristic.get_descriptor(CCCD)
        if cccd is None:
            raise BleakError(f"characteristic {characteristic.uuid} (handle {characteristic.handle}) has no CCCD")
        self._callbacks[ch.value_handle] = callback
        try:
            await self._att(conn, conn.subscribe(cccd.handle, notify="notify" in props, indicate="notify" not in props))
        except BaseException:
            self._callbacks.pop(ch.value_handle, None)
            raise

    async def stop_notify(self, characteristic: BleakGATTCharacteristic) -> None:
        conn = self._link()
        ch: Characteristic = characteristic.obj
        cccd = characteristic.get_descriptor(CCCD)
        if cccd is None:
            raise BleakError(f"characteristic {characteristic.uuid} (handle {characteristic.handle}) has no CCCD")
        await self._att(conn, conn.subscribe(cccd.handle, notify=False, indicate=False))
        self._callbacks.pop(ch.value_handle, None)

    def _on_notify(self, handle: int, value: bytes) -> None:
        # Called from the radio reader: the callback runs from the loop, so an exception in it is logged by
        # asyncio and the reader carries on.
        self._cache[handle] = value
        callback = self._callbacks.get(handle)
        if callback is not None:
            asyncio.get_running_loop().call_soon(callback, bytearray(value))
