"""Sync over USB serial end to end: a payer card and a payee terminal that paid each other offline (the two-process
harness of `make demo`, paytoken_host.demo.pay), each then running its app again in main.py with its USB serial on
a pseudo-terminal (paytoken_host.simusb.UsbBridge, paced at 115200 baud), a real `paytoken-backend serve` on SQLite,
and host/sync_bridge.py run as a user runs it (--port <pty>)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from paytoken import wire
from paytoken_host import demo, simdevice
from paytoken_host.simusb import UsbBridge
from tests.backend_rig import Database, free_port, init_cli, start_server, stop_server
from tests.harness.mp import FIRMWARE_BUILD
from tests.sync_rig import make_backend

ROOT = Path(__file__).resolve().parents[1]
BRIDGE = [sys.executable, str(ROOT / "host" / "sync_bridge.py")]


@dataclass
class Paid:
    """Flash images and a backend database after one offline payment, kept as a template (copied per test)."""

    dir: Path
    key: str  # the backend's key file
    payer_id: bytes
    payee_id: bytes
    world: SimpleNamespace  # the test issuer and backend keys

    def voucher(self, db_url: str, device_id: bytes, amount: int) -> None:
        """The treasury loads a device (the backend's service on the database a running server uses)."""
        backend = make_backend(Database("sqlite", db_url), self.world, time.time)
        backend.issue_voucher(device_id, amount)
        backend.engine.dispose()


def paid(tmp: Path, amount: int = 10_000, balance: int = 100_000) -> Paid:
    auth = simdevice.Authority()
    world = SimpleNamespace(issuer=auth.issuer, backend=auth.backend, backend_key=auth.backend)
    tmp.mkdir(parents=True, exist_ok=True)
    url = f"sqlite:///{tmp}/backend.db"
    key = init_cli(url, world, tmp)
    backend = make_backend(Database("sqlite", url), world, time.time)
    ids = {}

    def provision(out_dir: Path, firmware: Path, amount: int, balance: int, say) -> dict:
        found = {}
        for name, role in (("payee", wire.ROLE_PAYEE), ("payer", wire.ROLE_PAYER)):
            k = auth.device(role)
            backend.register(k.cert)
            vouchers = []
            if name == "payer":
                vouchers = [bytes.fromhex(backend.issue_voucher(k.device_id, balance)["voucher"])]
            config = {"name": name, "amount": amount} if name == "payee" else {"name": name}
            simdevice.provision(out_dir / f"{name}.img", auth, k, vouchers, config, firmware)
            ids[name] = k.device_id
            found[name] = demo.Provisioned(k.device_id, role, b"")
        return found

    demo.pay(tmp / "pay", FIRMWARE_BUILD, amount, balance, provision=provision, screens=False)
    backend.engine.dispose()
    return Paid(tmp, key, ids["payer"], ids["payee"], world)


class Rig:
    """A copy of the template: the backend served, the devices' apps started with their USB bridges."""

    def __init__(self, template: Paid, tmp: Path):
        from paytoken_host.simradio import BrokerThread

        shutil.copytree(template.dir, tmp, dirs_exist_ok=True)
        self.dir = tmp
        self.template = template
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.db_url = f"sqlite:///{tmp}/backend.db"
        self.server: subprocess.Popen | None = None
        self.radio = BrokerThread()
        self.radio.__enter__()
        self.timeline = demo.Timeline()
        self.devices: dict[str, demo.Device] = {}
        self.usb: dict[str, UsbBridge] = {}
        self._fresh: dict[str, dict] = {}  # the payee's QR / the payer's ready event that start() already took

    def serve(self) -> None:
        self.server = start_server(self.db_url, self.template.key.replace(str(self.template.dir), str(self.dir)),
                                   self.port, workers=1)

    def start(self, name: str, baud: int = 115200, **extra: str) -> UsbBridge:
        usb = self.usb.get(name) or UsbBridge(baud=baud)
        self.usb[name] = usb
        env = {"PAYTOKEN_RADIO": self.radio.address, "PAYTOKEN_SIM_USB": usb.address,
               "PAYTOKEN_SIM_FLASH": str(self.dir / "pay" / f"{name}.img"), **extra}
        if name == "payer":
            for f in ("scanner", "buttons"):
                (self.dir / "pay" / f).write_text("")
                env[f"PAYTOKEN_SIM_{f.upper()}"] = str(self.dir / "pay" / f)
        self.devices[name] = demo.Device(name, FIRMWARE_BUILD, "512K", env, demo.files_launcher, self.timeline,
                                         screens=False)
        ev = self.devices[name].until("qr" if name == "payee" else "ready", lambda *a: None)
        self._fresh[name] = ev
        usb.wait_device()
        return usb

    def pay(self) -> None:
        """One more payment between the running apps over the simulated radio: the payee's next QR shown to the
        payer's scanner once it is ready, CONFIRM pressed when it asks."""
        from paytoken import base45

        qr = self._fresh.pop("payee", None) or self.until("payee", "qr")
        self._fresh.pop("payer", None) or self.until("payer", "ready")
        pay_dir = self.dir / "pay"
        with open(pay_dir / "scanner", "a") as f:
            f.write(base45.encode(bytes.fromhex(qr["qr"])) + "\n")
        self.until("payer", "ask")
        with open(pay_dir / "buttons", "a") as f:
            f.write("confirm\n")
        self.until("payer", "paid")
        self.until("payee", "paid")

    def until(self, name: str, event: str, timeout: float = 60) -> dict:
        return self.devices[name].until(event, lambda *a: None, timeout)

    def bridge(self, name: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(BRIDGE + ["--port", self.usb[name].port, "--backend", self.url, *args],
                              capture_output=True, text=True, timeout=timeout)

    def bridge_bg(self, name: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(BRIDGE + ["--port", self.usb[name].port, "--backend", self.url, *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def close(self) -> None:
        for d in self.devices.values():
            d.stop()
        for u in self.usb.values():
            u.close()
        if self.server is not None:
            stop_server(self.server)
        self.radio.__exit__(None, None, None)


def statuses(event: dict) -> str:
    return event.get("statuses", "")
