"""The sync relay behind host/sync_bridge.py (issue 9): carries a device's sealed sync messages (docs/protocol.md
§10, "Sealed exchange") between the device and the backend's POST /v1/sync, and trusts nothing it carries: it
cannot read or forge them, and a damaged one changes nothing on either side.

    link = SerialDeviceLink("/dev/ttyUSB0")            # or sync_ble.BleDeviceLink(...): any DeviceLink
    result = relay(link, "http://backend:8000", progress=print_to_stderr)
    relay(link, url, stay=True)                          # then wait on GET /v1/wake and relay again when woken

A DeviceLink is one device reachable through a relay transport (USB serial here, BLE in sync_ble.py). relay()
pulls message 1, posts it (retried with jittered exponential backoff: the backend's answer to a repeated message 1
is idempotent), pushes message 2 back, until the device has nothing more to say.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from paytoken import syncwire
from paytoken.usb import frames

# Exit codes of host/sync_bridge.py, per failure kind.
EXIT_CODES = {
    "ok": 0,
    "usage": 2,  # bad arguments, or a transport this installation lacks (--ble without sync_ble)
    "port": 3,  # the serial port does not open (or the BLE device is not found)
    "no_answer": 4,  # the device stopped answering (or never did), or stayed busy
    "device": 5,  # the device refused or failed (e.g. its ledger is damaged, the backend refused its sync)
    "backend": 9,  # the backend could not be reached after the retries, or refused
    "interrupted": 130,
}


class BridgeError(Exception):
    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind
        self.message = message

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]


class DeviceError(BridgeError):
    """The device refused a request (status: the §11 status code) or failed."""

    def __init__(self, message: str, status: int | None = None, kind: str = "device"):
        super().__init__(kind, message)
        self.status = status


class DeviceBusy(DeviceError):
    """The device is paying: ask again later."""

    def __init__(self, message: str = "busy: paying"):
        super().__init__(message, frames.E_BUSY, "no_answer")


class AnswerRefused(DeviceError):
    """The device did not take a message 2 (damaged or not for its request): nothing applied, pull again."""


class DeviceLink(Protocol):
    """One device reachable through a relay transport."""

    name: str

    def pull(self) -> bytes | None:
        """The device's next sealed message 1, None when it has nothing more to say."""

    def push(self, msg2: bytes) -> int:
        """Hand the backend's message 2 to the device; the updates it applied (DeviceError on refusal)."""

    def wake_hint(self) -> tuple[bytes, int] | None:
        """(wake token, status cursor) after a sync, for the long-poll."""

    def close(self) -> None: ...


@dataclass
class Payment:
    role: int
    txid: bytes
    amount: int
    status: str


@dataclass
class Summary:
    """A device's status summary (docs/protocol.md §10, "Status summary"): its wake hint and recent payments."""

    wake: tuple[bytes, int] | None
    payments: list[Payment]


def parse_summary(body: bytes) -> Summary:
    """A device's status summary (paytoken.syncwire.status_summary: USB SYNC_STATUS, BLE STATUS); DeviceError if
    malformed."""
    try:
        hint, rows = syncwire.decode_status_summary(body)
    except syncwire.WireError as e:
        raise DeviceError(f"malformed status summary from the device ({e})") from None
    return Summary(hint, [Payment(*row) for row in rows])


class SerialDeviceLink:
    """A device on a USB serial port (the frames of paytoken.usb.frames, sent by station.SerialLink)."""

    def __init__(self, port: str, baud: int = 115200, timeout: float = 10.0, name: str | None = None):
        from paytoken_host.station import SerialLink, StationError, choose_port

        try:
            port = choose_port(port)
            self.link = SerialLink(port, baud, timeout, retries=1)
        except StationError as e:
            raise BridgeError(e.kind, e.message) from None
        self.name = name or port
        self.summary: Summary | None = None

    def _request(self, rtype: int, payload: bytes = b"") -> bytes:
        from paytoken_host.station import StationError

        try:
            return self.link.request(rtype, payload)
        except StationError as e:
            if e.status == frames.E_BUSY:
                raise DeviceBusy() from None
            if e.status == frames.E_REFUSED:
                raise AnswerRefused(e.message, e.status) from None
            if e.status is not None:
                raise DeviceError(e.message, e.status) from None
            raise BridgeError("no_answer" if e.kind == "no_answer" else "device", f"{self.name}: {e.message}") from None

    def pull(self) -> bytes | None:
        return self._request(frames.T_SYNC_PULL) or None

    def push(self, msg2: bytes) -> int:
        body = self._request(frames.T_SYNC_PUSH, msg2)
        if not body:
            raise DeviceError("empty push response from the device")
        self.summary = parse_summary(body[1:])
        return body[0]

    def status(self) -> Summary:
        self.summary = parse_summary(self._request(frames.T_SYNC_STATUS))
        return self.summary

    def wake_hint(self) -> tuple[bytes, int] | None:
        return self.status().wake

    def close(self) -> None:
        self.link.close()


class Backend:
    """The backend's sync endpoints, with retries (jittered exponential backoff) on network errors and 5xx."""

    def __init__(self, url: str, retries: int = 5, base: float = 0.25, cap: float = 8.0, timeout: float = 30.0,
                 sleep: Callable[[float], None] = time.sleep):
        self.url = url.rstrip("/")
        self.retries, self.base, self.cap, self.timeout, self.sleep = retries, base, cap, timeout, sleep
        self.up = self.down = 0

    def _call(self, method: str, path: str, progress: Callable[[str], None], **kw: object):
        import httpx

        last = ""
        for attempt in range(self.retries + 1):
            if attempt:
                delay = min(self.cap, self.base * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
                progress(f"backend: {last}; retry {attempt}/{self.retries} in {delay:.1f} s")
                self.sleep(delay)
            try:
                r = httpx.request(method, self.url + path, timeout=self.timeout, **kw)
            except httpx.HTTPError as e:
                last = f"{type(e).__name__}: {e}"
                continue
            if r.status_code >= 500:
                last = f"{r.status_code}"
                continue
            return r
        raise BridgeError("backend", f"backend {self.url}: {last} (after {self.retries + 1} tries)")

    def sync(self, msg1: bytes, progress: Callable[[str], None]) -> bytes | None:
        """Message 2, or None when the backend could not open message 1 (400: damaged on the way)."""
        r = self._call("POST", "/v1/sync", progress, content=msg1,
                       headers={"content-type": "application/octet-stream"})
        if r.status_code == 400:
            return None
        if r.status_code != 200:
            raise BridgeError("backend", f"backend refused POST /v1/sync: {r.status_code} {r.text[:200]}")
        self.up += len(msg1)
        self.down += len(r.content)
        return r.content

    def wake(self, token: bytes, cursor: int, wait: float, progress: Callable[[str], None]) -> tuple[bool, int]:
        r = self._call("GET", f"/v1/wake/{token.hex()}", progress, params={"since": cursor, "wait": wait})
        if r.status_code != 200:
            raise BridgeError("backend", f"backend refused GET /v1/wake: {r.status_code} {r.text[:200]}")
        d = r.json()
        return bool(d["wake"]), int(d["cursor"])


@dataclass
class RelayResult:
    device: str
    syncs: int = 0  # whole syncs (the device had nothing more to say)
    exchanges: int = 0  # message 2s the device took
    applied: int = 0  # updates that changed the device
    refused: int = 0  # message 2s the device refused (damaged on the way) or message 1s the backend could not open
    wakes: int = 0  # long-poll wake-ups that started another sync
    bytes_up: int = 0
    bytes_down: int = 0
    seconds: float = 0.0
    payments: list[Payment] = field(default_factory=list)


def _quiet(_: str) -> None:
    pass


def sync_once(device: DeviceLink, backend: Backend, result: RelayResult, progress: Callable[[str], None] = _quiet,
              rounds: int = 64, busy_s: float = 120.0) -> None:
    """Pull, post, push until the device has nothing more to say (one whole sync)."""
    busy_until = None
    for _ in range(rounds):
        try:
            msg1 = device.pull()
        except DeviceBusy:
            busy_until = busy_until or time.monotonic() + busy_s
            if time.monotonic() > busy_until:
                raise BridgeError("no_answer", f"{device.name}: still paying after {busy_s:g} s") from None
            progress(f"{device.name}: busy paying, asking again")
            time.sleep(1.0)
            continue
        if msg1 is None:
            result.syncs += 1
            summary = getattr(device, "summary", None)
            if summary is not None:
                result.payments = summary.payments
            return
        msg2 = backend.sync(msg1, progress)
        if msg2 is None:
            result.refused += 1
            progress(f"{device.name}: the backend could not open message 1 (damaged on the way); asking again")
            continue
        try:
            n = device.push(msg2)
        except AnswerRefused as e:
            if getattr(e, "final", False):  # the backend refused the device's sync: it is over
                raise DeviceError(f"{device.name}: sync refused: {e.message}") from None
            result.refused += 1
            progress(f"{device.name}: the device refused the answer ({e.message}); asking again")
            continue
        result.exchanges += 1
        result.applied += n
        result.bytes_up, result.bytes_down = backend.up, backend.down
        progress(f"{device.name}: exchange {result.exchanges}: {len(msg1)} B up, {len(msg2)} B down, "
                 f"{n} update(s) applied")
    raise BridgeError("device", f"{device.name}: still had something to say after {rounds} exchanges")


def relay(device: DeviceLink, backend_url: str, progress: Callable[[str], None] = _quiet, retries: int = 5,
          stay: bool = False, wait: float = 25.0, should_stop: Callable[[], bool] = lambda: False,
          backend: Backend | None = None) -> RelayResult:
    """Syncs the device; with stay, then waits on the backend's wake-up long-poll with the device's hint and
    syncs again whenever the device has news, until should_stop() (checked after every poll) or Ctrl-C."""
    backend = backend or Backend(backend_url, retries)
    result = RelayResult(device.name)
    t0 = time.monotonic()
    sync_once(device, backend, result, progress)
    progress(f"{device.name}: synced: {describe(result)}")
    hint = device.wake_hint() if stay else None  # asked right after the sync, while the device has it
    if stay and hint is None:
        progress(f"{device.name}: no wake token from the device; cannot wait for its news")
    while hint is not None and not should_stop():
        woke, _ = backend.wake(hint[0], hint[1], wait, progress)
        if woke and not should_stop():
            result.wakes += 1
            progress(f"{device.name}: news from the backend, syncing")
            sync_once(device, backend, result, progress)
            progress(f"{device.name}: synced: {describe(result)}")
            hint = device.wake_hint() or hint
    result.seconds = time.monotonic() - t0
    return result


def describe(result: RelayResult) -> str:
    counts: dict[str, int] = {}
    for p in result.payments:
        counts[p.status] = counts.get(p.status, 0) + 1
    text = ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) or "no payments"
    return f"{result.exchanges} exchange(s), {result.applied} update(s) applied; {text}"
