"""A device's sealed sync over BLE, the relay's end: a device in sync mode (CONFIRM held: paytoken.app.syncble)
advertises the sync service (docs/protocol.md section 9, "Sync service") with its name; BleDeviceLink connects to it
with bleak and carries the sync client's messages, so a bridge can relay them to the backend's POST /v1/sync:

    link = BleDeviceLink("payer")                                         # the host's Bluetooth, by name
    link = BleDeviceLink("AA:BB:CC:DD:EE:FF")                             # or by address
    link = BleDeviceLink("payer", backend="sim", radio="127.0.0.1:4000")  # the simulator's radio
    while (msg1 := link.pull()) is not None:
        link.push(post_to_backend(msg1))
    link.close()

A synchronous facade: bleak runs in the link's own event loop thread. The link opens on construction and opens again
on the next call after the device dropped it (the device keeps every record until the backend acknowledges it, so a
relay simply pulls again). What it shares with the firmware is the definition of the bytes: paytoken.framing and
paytoken.ble.syncgatt; the session's link is the host payer's (hostpayer.BleakLink).
"""

from __future__ import annotations

import asyncio
import re
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from bleak import BleakScanner
from bleak.backends.device import BLEDevice
from bleak.exc import BleakError

from paytoken import framing
from paytoken.ble import syncgatt
from paytoken.link import LinkError
from paytoken_host.hostpayer import BleakLink, Radio
from paytoken_host.sync_bridge_core import AnswerRefused, BridgeError, Payment, Summary

CONNECT_S = 20.0  # finding the device and opening the session
ANSWER_S = 60.0  # the device's response: a PUSH checks every update's signature
_ADDRESS = re.compile(r"^[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}$")
T = TypeVar("T")


class DeviceRefused(AnswerRefused):
    """The device refused a request: `final` when the backend refused it (the device's sync is over), otherwise
    the message was damaged or out of turn and the relay pulls again."""

    def __init__(self, reason: str, final: bool):
        super().__init__(reason)
        self.final = final


class LinkLost(BridgeError, ConnectionError):
    """The BLE link failed (not found, dropped, timed out, malformed): nothing was applied that the device did not
    answer; the next call connects again."""

    def __init__(self, message: str):
        super().__init__("no_answer", message)


class BleDeviceLink:
    """DeviceLink over BLE: `target` a device name (as advertised in sync mode) or address AA:BB:CC:DD:EE:FF;
    backend "bleak" (this host's Bluetooth) or "sim" (the simulated radio, broker at `radio` or PAYTOKEN_RADIO)."""

    def __init__(self, target: str, backend: str = "bleak", radio: str | None = None, timeout: float = CONNECT_S,
                 answer_timeout: float = ANSWER_S):
        if backend not in ("bleak", "sim"):
            raise ValueError(f'backend must be "bleak" or "sim", got {backend!r}')
        if not target:
            raise ValueError("a device name or address is needed")
        if backend == "sim":
            from paytoken_host.simradio.bleak_backend import radio_address

            if radio_address(radio) is None:
                raise ValueError("backend sim needs the broker: radio='host:port' or PAYTOKEN_RADIO")
        self.name = target
        self.timeout = timeout
        self.answer_timeout = answer_timeout
        self._radio = Radio("native" if backend == "bleak" else "sim", radio)
        self._link: BleakLink | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name=f"ble-sync {target}", daemon=True)
        self._thread.start()
        try:
            self._run(self._open())
        except BaseException:
            self.close()
            raise

    # ------------------------------------------------------------ DeviceLink

    def pull(self) -> bytes | None:
        """The device's next sealed message 1; None when it has nothing more to say."""
        body = self._run(self._request(bytes((syncgatt.PULL,)), syncgatt.PULLED))
        return body or None

    def push(self, msg2: bytes) -> int:
        """The backend's message 2 to the device: the number of updates it applied. DeviceRefused when the device
        refuses it (damaged, or no request waiting: pull again; final: the backend refused the device)."""
        if not msg2:
            raise ValueError("message 2 is empty")
        if len(msg2) + 1 > framing.MAX_MESSAGE:
            raise ValueError(f"message 2 of {len(msg2)} bytes: the BLE sync service carries at most "
                             f"{framing.MAX_MESSAGE - 1}")
        return syncgatt.decode_pushed(self._run(self._request(bytes((syncgatt.PUSH,)) + msg2, syncgatt.PUSHED)))

    def wake_hint(self) -> tuple[bytes, int] | None:
        """(wake token, status cursor) for GET /v1/wake once the device has had an answer, else None."""
        return self.status()[0]

    @property
    def summary(self) -> Summary:
        """What the bridge reports after a sync (sync_bridge_core.relay): the wake hint and recent statuses."""
        wake, rows = self.status()
        return Summary(wake, [Payment(*row) for row in rows])

    def status(self) -> tuple[tuple[bytes, int] | None, list[tuple[int, bytes, int, str]]]:
        """(wake hint, the device's recent payments [(role, txid, amount, status)], oldest first)."""
        return syncgatt.decode_status(self._run(self._request(bytes((syncgatt.STATUS,)), syncgatt.STATUS_R)))

    def close(self) -> None:
        if self._loop.is_closed():
            return
        if self._thread.is_alive():
            if self._link is not None:
                try:
                    self._run(self._link.close(), 15)
                except (LinkLost, TimeoutError):
                    pass
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)
        self._link = None
        self._loop.close()

    def __enter__(self) -> BleDeviceLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------ inside the loop thread

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._loop.is_closed():
            coro.close()
            raise LinkLost(f"{self.name}: the link is closed")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(timeout if timeout is not None else self.timeout + self.answer_timeout + 10)

    async def _open(self) -> BleakLink:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        device = await self._find()
        try:
            self._link = await BleakLink.open(device, self._radio, deadline, syncgatt.UUIDS, "device in sync mode")
        except LinkError as exc:
            raise LinkLost(f"{self.name}: {exc}") from None
        return self._link

    async def _find(self) -> BLEDevice:
        kwargs = self._radio.scanner_kwargs()
        try:
            if _ADDRESS.match(self.name):
                device = await BleakScanner.find_device_by_address(self.name.upper(), timeout=self.timeout, **kwargs)
            else:
                device = await BleakScanner.find_device_by_filter(
                    lambda d, ad: ad.local_name == self.name and syncgatt.SERVICE_UUID in ad.service_uuids,
                    timeout=self.timeout, service_uuids=[syncgatt.SERVICE_UUID], **kwargs)
        except BleakError as exc:
            raise LinkLost(f"{self.name}: {exc}") from None
        if device is None:
            raise LinkLost(f"no device {self.name!r} in sync mode within {self.timeout:g} s "
                           "(hold CONFIRM on the device to enter it)")
        return device

    async def _request(self, req: bytes, expect: int) -> bytes:
        link = self._link
        if link is None or link.closed:
            link = await self._open()
        try:
            await link.send(req)
            resp = await link.recv(self.answer_timeout)
        except LinkError as exc:
            await link.close()
            raise LinkLost(f"{self.name}: {exc}") from None
        try:
            body, final, reason = syncgatt.decode(resp, expect)
        except syncgatt.SyncGattError as exc:
            await link.close()
            raise LinkLost(f"{self.name}: malformed response ({exc})") from None
        if body is None:
            raise DeviceRefused(reason, final)
        return body
