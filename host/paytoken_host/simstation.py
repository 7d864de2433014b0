"""The provisioning station in simulation: blank simulated boards on pseudo-terminals, provisioned by
host/provision.py exactly as an operator runs it (for the demo, the tests and the bench).

    board = SimBoard(image, firmware)          # a UsbBridge (pty) and the device's main.py process
    board.power_on()                           # boots; blank: it runs the USB provisioning service
    station = SimStation(work, firmware)       # a test issuer (encrypted key file) and backend keys
    res = station.run(board, ["--role", "payer", "--balance", "100000"])   # host/provision.py, subprocess
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives import serialization

from paytoken import wire
from paytoken_host import simdevice
from paytoken_host.simusb import UsbBridge

ROOT = Path(__file__).resolve().parents[2]
PROVISION = ROOT / "host" / "provision.py"
PASSPHRASE = "sim-station-passphrase"


class SimBoard:
    """A simulated ESP32 on a USB cable: its serial port (a pty, stays while the device restarts) and its
    main.py process (power_on / power_off), its flash the image file."""

    def __init__(self, image: Path, firmware: Path, heap: str = "512K", baud: int = 115200, name: str = "device"):
        self.image = Path(image)
        self.firmware = Path(firmware)
        self.heap = heap
        self.name = name
        self.usb = UsbBridge(baud)
        self.port = self.usb.port
        self.device = None

    def power_on(self, service: bool = False, wait: bool = True) -> None:
        """Boots main.py; service=True holds the button that enters the USB service on a provisioned device."""
        from paytoken_host.demo import Device

        self.power_off()
        env = {"PAYTOKEN_SIM_FLASH": str(self.image), "PAYTOKEN_SIM_USB": self.usb.address}
        if service:
            env["PAYTOKEN_SIM_SERVICE"] = "1"
        self.device = Device(self.name, self.firmware, self.heap, env, screens=False)
        if wait and not self.usb.wait_device(30):
            raise RuntimeError(f"{self.name}: no USB serial connection: {self.lines()}")

    def power_off(self) -> None:
        if self.device is not None:
            self.device.stop()
            self.usb.drop_device()

    def wait_exit(self, timeout: float = 30) -> int:
        assert self.device is not None
        return self.device.proc.wait(timeout)

    def lines(self) -> list[str]:
        return list(self.device.lines) if self.device else []

    def close(self) -> None:
        self.power_off()
        self.usb.close()

    def __enter__(self) -> SimBoard:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass
class SimResult:
    returncode: int
    stdout: str
    stderr: str
    record: dict | None  # the log line of the device provisioned
    port: str = ""

    @property
    def line(self) -> str:
        return self.stdout.strip()

    @property
    def device_id(self) -> bytes:
        return bytes.fromhex(self.record["device_id"])

    @property
    def role(self) -> int:
        return {"payer": wire.ROLE_PAYER, "payee": wire.ROLE_PAYEE}[self.record["role"]]

    @property
    def identity_pub(self) -> bytes:
        return bytes.fromhex(self.record["identity_public_key"])


class SimStation:
    """host/provision.py with a test issuer: its key file encrypted with PASSPHRASE (0600), the backend's public
    keys in a JSON file (no server; or backend_url and tokens for a real one), the log in work/provisioned.jsonl.
    """

    def __init__(self, work: Path, firmware: Path, auth: simdevice.Authority | None = None,
                 backend_url: str | None = None, env: dict[str, str] | None = None,
                 issuer_key: Path | None = None, passphrase: str = PASSPHRASE):
        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        self.firmware = Path(firmware)
        self.auth = auth or simdevice.Authority()
        self.backend_url = backend_url
        self.env = dict(env or {})
        self.passphrase = passphrase
        self.issuer_key = Path(issuer_key) if issuer_key else self.work / "issuer.key"
        if not self.issuer_key.exists():
            pem = self.auth.issuer.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.BestAvailableEncryption(PASSPHRASE.encode()))
            fd = os.open(self.issuer_key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(pem)
        self.backend_keys = self.work / "backend-keys.json"
        self.backend_keys.write_text(json.dumps({"backend": self.auth.backend_pub.hex(),
                                                 "backend_kx": self.auth.backend_kx.hex()}) + "\n")
        self.log = self.work / "provisioned.jsonl"

    def command(self, port: str, args: list[str]) -> list[str]:
        cmd = [sys.executable, str(PROVISION), "--port", port, "--issuer-key", str(self.issuer_key),
               "--log", str(self.log), "--timeout", "5"]
        if self.backend_url:
            cmd += ["--backend", self.backend_url]
        else:
            cmd += ["--backend-keys", str(self.backend_keys)]
        return cmd + args

    def offline_load(self, balance: int) -> list[str]:
        """Without a backend server: a device id chosen here and its first load voucher signed by the test
        authority's backend key, as a voucher file (--device-id, --voucher)."""
        device_id = os.urandom(wire.ID_LEN)
        path = self.work / f"voucher-{device_id.hex()}.hex"
        path.write_text(self.auth.voucher(device_id, 1, balance).hex() + "\n")
        return ["--device-id", device_id.hex(), "--voucher", str(path)]

    def run(self, board: SimBoard, args: list[str], timeout: float = 60) -> SimResult:
        """host/provision.py against the board's port; the device's record from the log when it succeeded."""
        if not self.backend_url and "--balance" in args:
            i = args.index("--balance")
            args = args[:i] + self.offline_load(int(args[i + 1])) + args[i + 2:]
        before = len(self.log.read_text().splitlines()) if self.log.exists() else 0
        env = {**os.environ, "PAYTOKEN_KEY_PASSPHRASE": self.passphrase, **self.env}
        proc = subprocess.run(self.command(board.port, args), capture_output=True, text=True, env=env,
                              timeout=timeout)
        lines = self.log.read_text().splitlines()[before:] if self.log.exists() else []
        records = [json.loads(x) for x in lines if "failed" not in json.loads(x)]
        return SimResult(proc.returncode, proc.stdout, proc.stderr, records[-1] if records else None, board.port)

    def provision(self, image: Path, args: list[str], heap: str = "512K") -> SimResult:
        """A blank simulated device at `image` provisioned end to end; it restarts (exits) after finalise."""
        with SimBoard(image, self.firmware, heap) as board:
            board.power_on()
            res = self.run(board, args)
            if res.returncode != 0:
                raise RuntimeError(f"provision.py failed ({res.returncode}): {res.stderr.strip()}\n"
                                   + "\n".join(board.lines()))
            board.wait_exit()
        return res
