"""The USB provisioning station (host/provision.py is its command line): finds a board, optionally flashes
MicroPython and deploys the firmware, then over the device's USB serial (paytoken.usb.frames, docs/protocol.md
§11) has it make its keys on-chip, checks its proof of possession, issues its certificate with the issuer key,
registers it with the backend, installs its first load voucher and finalises it.

    station = Station(issuer_key, Backend(url, provisioning_token, treasury_token))
    with SerialLink(port) as link:
        result = station.provision(link, Spec(role=wire.ROLE_PAYER, balance=100_000))

Every step is idempotent on the device, so a station run cut anywhere (power, cable, station) is simply run
again: the device reports where it got to and keeps its keys and device id.
"""

from __future__ import annotations

import json
import os
import secrets
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric import ec

from paytoken import wire
from paytoken.usb import frames
from paytoken_host import protocol

# Failure kinds and their exit codes (provision.py --help lists them).
EXIT_CODES = {
    "ok": 0,
    "usage": 2,
    "port": 3,  # no board found, several found, or the port does not open
    "no_answer": 4,  # the device stopped answering (or never did)
    "device": 5,  # the device refused a step or failed (storage, wrong state)
    "proof": 6,  # the device's proof of key possession or its keys do not check
    "locked": 7,  # the device is already provisioned and finalised (a full wipe is needed)
    "issuer": 8,  # the device, or the backend, belongs to another issuer
    "backend": 9,  # the backend refused or could not be reached
    "flash": 10,  # esptool or mpremote failed
    "key": 11,  # the issuer key file does not open (missing, wrong passphrase)
    "firmware": 12,  # the device runs another firmware than --firmware's build
}

# USB serial chips of ESP32 boards: VID:PID -> name.
KNOWN_USB = {
    (0x10C4, 0xEA60): "CP210x",
    (0x1A86, 0x7523): "CH340",
    (0x1A86, 0x55D4): "CH9102",
    (0x0403, 0x6001): "FTDI FT232R",
    (0x0403, 0x6010): "FTDI FT2232",
    (0x0403, 0x6014): "FTDI FT232H",
    (0x0403, 0x6015): "FTDI FT-X",
    (0x303A, 0x1001): "ESP32-S3/C3/C6 USB Serial/JTAG",
    (0x303A, 0x4001): "ESP32-S2/S3 USB CDC (TinyUSB)",
    (0x303A, 0x0002): "ESP32-S2 USB CDC (ROM)",
}

# esptool's flash offset of a MicroPython image, per chip.
FLASH_OFFSET = {"esp32": "0x1000", "esp32s2": "0x1000", "esp32s3": "0x0", "esp32c3": "0x0", "esp32c6": "0x0"}

ROLES = {"payer": wire.ROLE_PAYER, "payee": wire.ROLE_PAYEE}
ROLE_NAMES = {v: k for k, v in ROLES.items()}
DAY = 86_400


class StationError(Exception):
    def __init__(self, kind: str, message: str, status: int | None = None):
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.status = status  # the device's response status, when it refused

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.kind]


# ---- finding the board ----

def find_ports() -> list[tuple[str, str]]:
    """(device, chip name) of every serial port whose USB VID:PID is a known ESP32 USB serial chip."""
    from serial.tools import list_ports

    found = []
    for p in list_ports.comports():
        name = KNOWN_USB.get((p.vid, p.pid)) if p.vid is not None else None
        if name:
            found.append((p.device, name))
    return sorted(found)


def choose_port(port: str | None) -> str:
    if port:
        if port.startswith("/dev/") and not os.path.exists(port):
            raise StationError("port", f"{port}: no such port")
        return port
    found = find_ports()
    if not found:
        raise StationError("port", "no ESP32 board found (known USB serial chips: "
                           + ", ".join(sorted(set(KNOWN_USB.values()))) + "); plug one in or pass --port")
    if len(found) > 1:
        raise StationError("port", "several boards found, pass --port: "
                           + ", ".join(f"{d} ({n})" for d, n in found))
    return found[0][0]


# ---- flashing (hardware only) ----

def flash_micropython(port: str, chip: str, image: Path, baud: int = 460800,
                      run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """Erase the flash and write a MicroPython image with esptool at the chip's offset (the full wipe too)."""
    if chip not in FLASH_OFFSET:
        raise StationError("usage", f"--chip: one of {', '.join(FLASH_OFFSET)}")
    base = [sys.executable, "-m", "esptool", "--chip", chip, "--port", port, "--baud", str(baud)]
    for args in (["erase-flash"], ["write-flash", "-z", FLASH_OFFSET[chip], str(image)]):
        proc = run(base + args, capture_output=True, text=True)
        if proc.returncode != 0:
            raise StationError("flash", f"esptool {args[0]} failed: {(proc.stdout + proc.stderr).strip()[-400:]}")


def deploy_firmware(port: str, build: Path, romfs: bool = True,
                    run: Callable[..., subprocess.CompletedProcess] = subprocess.run) -> None:
    """Copy build/firmware onto the board with mpremote, as `make deploy` (the board's mip packages, then the
    ROMFS image) or `make deploy-files`."""
    mpremote = [sys.executable, "-m", "mpremote", "connect", port]
    info = build / "board" / "board.json"
    for pkg in json.loads(info.read_text()).get("mip", []) if info.exists() else []:
        proc = run(mpremote + ["mip", "install", pkg], capture_output=True, text=True, cwd=str(build))
        if proc.returncode != 0:
            raise StationError("flash", f"mpremote mip install {pkg} failed: {(proc.stdout + proc.stderr)[-400:]}")
    if romfs:
        cmd = mpremote + ["romfs", "deploy", "romfs.img", "+", "fs", "cp", "boot.py", "main.py", ":", "+", "reset"]
    else:
        cmd = mpremote + ["fs", "cp", "-r", "boot.py", "main.py", "lib", "board", ":", "+", "reset"]
    proc = run(cmd, capture_output=True, text=True, cwd=str(build))
    if proc.returncode != 0:
        raise StationError("flash", f"mpremote failed: {(proc.stdout + proc.stderr).strip()[-400:]}")


# ---- the serial link ----

def answer(status: int, body: bytes) -> bytes:
    """A response's body when its status is OK; else the StationError it means."""
    if status == frames.OK:
        return body
    kind = {frames.E_LOCKED: "locked"}.get(status, "device")
    raise StationError(kind, f"device refused: {frames.ERRORS.get(status, status)}: {body.decode(errors='replace')}",
                       status)


class SerialLink:
    """Request/response frames over a serial port (pyserial): one request at a time, each retried when no
    answer comes (every step is idempotent on the device)."""

    def __init__(self, port: str, baud: int = 115200, timeout: float = 10.0, retries: int = 1):
        import serial

        self.timeout = timeout
        self.retries = retries
        self.sent = self.received = 0
        try:
            # DTR and RTS left released: on the ESP32 boards' auto-reset circuit they drive EN and GPIO0
            self.ser = serial.Serial(None, baud, timeout=timeout, write_timeout=timeout)
            self.ser.port = port
            self.ser.dtr = self.ser.rts = False
            self.ser.open()
        except (serial.SerialException, OSError, ValueError) as e:
            raise StationError("port", f"{port}: {e}") from None
        self.ser.reset_input_buffer()

    def read(self, n: int, ms: int) -> bytes:
        self.ser.timeout = None if ms < 0 else ms / 1000
        data = self.ser.read(n)
        self.received += len(data)
        return data

    def request(self, rtype: int, payload: bytes = b"") -> bytes:
        """The OK response's body; StationError for an error status or when the device does not answer."""
        frame = frames.encode(rtype, payload)
        for _ in range(self.retries + 1):
            self.ser.write(frame)
            self.ser.flush()
            self.sent += len(frame)
            got = self._response(rtype)
            if got is None:
                continue
            return answer(got[0], got[1:])
        raise StationError("no_answer", f"the device did not answer within {self.timeout:g} s "
                           f"({self.retries + 1} tries)")

    def _response(self, rtype: int) -> bytes | None:
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                got = frames.read_frame(self, int(left * 1000), int(self.timeout * 1000))
            except frames.FrameError:
                continue
            if got is None:
                return None
            t, body = got
            if t == rtype | frames.RESPONSE:
                return body
            if t == frames.T_BAD_FRAME:
                return None  # our frame arrived damaged: send it again

    def close(self) -> None:
        self.ser.close()

    def __enter__(self) -> SerialLink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- the backend ----

class Backend:
    """The settlement backend's HTTP API, as far as the station uses it."""

    def __init__(self, url: str, provisioning_token: str | None, treasury_token: str | None = None,
                 timeout: float = 15.0):
        self.url = url.rstrip("/")
        self.provisioning_token = provisioning_token
        self.treasury_token = treasury_token
        self.timeout = timeout

    def _call(self, method: str, path: str, token: str | None = None, **kw: object) -> dict:
        import httpx

        headers = kw.pop("headers", {})
        if token:
            headers["Authorization"] = f"Bearer {token}"
        try:
            r = httpx.request(method, self.url + path, headers=headers, timeout=self.timeout, **kw)
        except httpx.HTTPError as e:
            raise StationError("backend", f"backend {self.url}: {e}") from None
        if r.status_code >= 400:
            try:
                reason = r.json().get("error", r.text)
            except ValueError:
                reason = r.text
            raise StationError("backend", f"backend refused {method} {path}: {r.status_code} {reason}")
        return r.json()

    def keys(self) -> dict[str, bytes]:
        d = self._call("GET", "/v1/keys")
        return {k: bytes.fromhex(d[k]) for k in ("issuer", "backend", "backend_kx")}

    def register(self, cert: bytes) -> dict:
        if not self.provisioning_token:
            raise StationError("usage", "no provisioning token (PAYTOKEN_PROVISIONING_TOKEN)")
        return self._call("POST", "/v1/devices", self.provisioning_token, json={"cert": cert.hex()})

    def voucher(self, device_id: bytes, amount: int) -> bytes:
        if not self.treasury_token:
            raise StationError("usage", "a load needs a treasury token (PAYTOKEN_TREASURY_TOKEN) or --voucher")
        d = self._call("POST", f"/v1/devices/{device_id.hex()}/vouchers", self.treasury_token,
                       json={"amount": amount}, headers={"Idempotency-Key": f"provision-{device_id.hex()}-1"})
        return bytes.fromhex(d["voucher"])


# ---- provisioning ----

@dataclass
class Spec:
    """What to make of the next device."""

    role: int
    name: str | None = None
    amount: int | None = None  # a payee's requested amount (config.json)
    balance: int = 0  # a payer's first load from the backend (minor units); 0: none
    voucher: bytes | None = None  # or a backend-signed voucher from a file
    device_id: bytes | None = None  # default: random (a resumed device keeps its own)
    limits: protocol.Limits = field(default_factory=protocol.Limits)
    valid_days: int = 365
    serial: int | None = None  # certificate serial (default random)
    expect_fw_hash: str | None = None

    def config(self) -> bytes:
        cfg: dict[str, object] = {}
        if self.name:
            cfg["name"] = self.name
        if self.amount is not None:
            cfg["amount"] = self.amount
        return json.dumps(cfg, separators=(",", ":")).encode() if cfg else b""


STEPS = ("identify", "keys", "certificate", "install", "register", "voucher", "finalise")


@dataclass
class Result:
    device_id: bytes
    role: int
    identity_pub: bytes
    x25519_pub: bytes | None
    cert: bytes
    serial: int
    fw_hash: str | None
    chip: str
    balance: int
    resumed: bool
    seconds: float
    bytes_sent: int
    bytes_received: int

    def record(self, operator: str) -> dict:
        """The JSON-lines log entry: public data only."""
        return {"time": int(time.time()), "operator": operator, "device_id": self.device_id.hex(),
                "role": ROLE_NAMES.get(self.role, str(self.role)), "identity_public_key": self.identity_pub.hex(),
                "x25519_public_key": self.x25519_pub.hex() if self.x25519_pub else None,
                "certificate_serial": self.serial, "certificate": self.cert.hex(), "firmware_hash": self.fw_hash,
                "chip": self.chip, "balance": self.balance, "resumed": self.resumed,
                "seconds": round(self.seconds, 3), "serial_bytes": self.bytes_sent + self.bytes_received}

    def line(self) -> str:
        role = ROLE_NAMES.get(self.role, str(self.role))
        return (f"provisioned {role} {self.device_id.hex()} cert serial {self.serial} balance {self.balance}"
                f"{' (resumed)' if self.resumed else ''} in {self.seconds:.1f} s")


class Station:
    def __init__(self, issuer_key: ec.EllipticCurvePrivateKey, backend: Backend | None = None,
                 keys: dict[str, bytes] | None = None, progress: Callable[[str], None] | None = None,
                 now: Callable[[], float] = time.time):
        """keys: the backend's public keys {"backend", "backend_kx"} when working without a backend (tests,
        the demo); otherwise they come from GET /v1/keys, which must name this station's issuer."""
        self.issuer = protocol.Issuer(issuer_key)
        self.backend = backend
        self._keys = keys
        self.progress = progress or (lambda msg: None)
        self.now = now

    def backend_keys(self) -> dict[str, bytes]:
        if self._keys is None:
            if self.backend is None:
                raise StationError("usage", "no backend: pass --backend URL")
            keys = self.backend.keys()
            if keys["issuer"] != self.issuer.public:
                raise StationError("issuer", "the backend trusts another issuer key (key id "
                                   f"{protocol.key_id(keys['issuer']).hex()}, ours {self.issuer.key_id.hex()})")
            self._keys = keys
        return self._keys

    def provision(self, link: SerialLink, spec: Spec,
                  after: Callable[[str], None] | None = None) -> Result:
        """One device from whatever state it is in to finalised. after(step) runs after each step (tests cut
        there). StationError on failure, with the device left resumable."""
        t0 = time.monotonic()
        sent0, recv0 = link.sent, link.received
        done = after or (lambda step: None)
        keys = self.backend_keys()

        self.progress("identify")
        info = json.loads(link.request(frames.T_IDENTIFY))
        state = info.get("state")
        if spec.expect_fw_hash and info.get("fw_hash") != spec.expect_fw_hash:
            raise StationError("firmware", f"the device runs firmware {info.get('fw_hash')}, "
                               f"not the build {spec.expect_fw_hash}")
        if info.get("issuer") and bytes.fromhex(info["issuer"]) != self.issuer.key_id:
            raise StationError("issuer", f"device {info.get('id')} holds a certificate of another issuer "
                               f"(key id {info['issuer']}, ours {self.issuer.key_id.hex()})")
        if state == "final":
            raise StationError("locked", f"device {info.get('id')} is already provisioned and finalised "
                               "(only a full wipe makes it blank again)")
        resumed = state in ("keys", "certified")
        if resumed:
            if info.get("role") != spec.role:
                raise StationError("device", f"device {info.get('id')} was being provisioned as "
                                   f"{ROLE_NAMES.get(info.get('role'), info.get('role'))}: finish it as that")
            device_id = bytes.fromhex(info["id"])
        else:
            device_id = spec.device_id or secrets.token_bytes(wire.ID_LEN)
        done("identify")

        self.progress("keys")
        challenge = secrets.token_bytes(32)
        body = link.request(frames.T_KEYS, bytes((spec.role,)) + device_id + challenge)
        xlen = 32 if spec.role & wire.ROLE_PAYEE else 0
        if len(body) != 65 + xlen + wire.SIG_LEN:
            raise StationError("proof", f"keys answer of {len(body)} bytes")
        pub, xpub, sig = body[:65], body[65:65 + xlen], body[65 + xlen:]
        msg = frames.pop_message(challenge, device_id, spec.role, pub, xpub)
        if not protocol.signed_by(pub, msg + sig):
            raise StationError("proof", "the device's proof of key possession does not verify")
        if xlen and (xpub == bytes(32) or len(set(xpub)) < 8):
            raise StationError("proof", "the device's X25519 key is degenerate")
        done("keys")

        self.progress("certificate")
        cert = installed = self._installed(info, pub)
        if cert is None:  # a resumed device keeps the certificate it has (the backend may hold it already)
            now = int(self.now())
            serial = spec.serial if spec.serial is not None else secrets.randbelow(2**32 - 1) + 1
            cert = self.issuer.issue(device_id, spec.role, pub, xpub or None, spec.limits, now - DAY,
                                     now + spec.valid_days * DAY, serial)
        serial = wire.decode_cert(cert).serial
        done("certificate")

        if installed is None:
            self.progress("install")
            kx = keys.get("backend_kx") or b""
            link.request(frames.T_INSTALL, struct.pack(">H", len(cert)) + cert + self.issuer.public
                         + keys["backend"] + bytes((len(kx),)) + kx + spec.config())
        done("install")

        if self.backend is not None:
            self.progress("register")
            self.backend.register(cert)
        done("register")

        balance = 0
        if spec.role & wire.ROLE_PAYER and (spec.voucher or spec.balance):
            self.progress("voucher")
            voucher = spec.voucher
            if voucher is None:
                if self.backend is None:
                    raise StationError("usage", "a load without a backend needs --voucher")
                voucher = self.backend.voucher(device_id, spec.balance)
            balance = struct.unpack(">IB", link.request(frames.T_VOUCHER, voucher))[0]
        done("voucher")

        self.progress("finalise")
        link.request(frames.T_FINALISE, device_id)
        done("finalise")
        return Result(device_id, spec.role, pub, xpub or None, cert, serial, info.get("fw_hash"),
                      info.get("chip", "?"), balance, resumed, time.monotonic() - t0, link.sent - sent0,
                      link.received - recv0)


    def _installed(self, info: dict, pub: bytes) -> bytes | None:
        """The certificate a resumed device already holds, if it is ours and names the keys it just proved."""
        if info.get("state") != "certified" or not info.get("cert"):
            return None
        raw = bytes.fromhex(info["cert"])
        try:
            cert = protocol.verify_cert(raw, self.issuer.public)
        except ValueError:
            return None
        compressed = bytes((2 + (pub[64] & 1),)) + pub[1:33]
        return raw if cert.identity_pub == compressed else None


def load_issuer_key(path: Path, passphrase: bytes) -> ec.EllipticCurvePrivateKey:
    from paytoken_host.backend.keys import load_key_file

    try:
        return load_key_file(path, passphrase)
    except FileNotFoundError:
        raise StationError("key", f"{path}: no such issuer key file") from None
    except (ValueError, TypeError) as e:
        raise StationError("key", f"{path}: does not open ({e}: wrong passphrase?)") from None


def append_log(path: Path, entry: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(entry, sort_keys=True) + "\n")
