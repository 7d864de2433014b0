"""BLE sync rig (tests/test_sync_ble.py, the sync bench): a payer card and a payee terminal that paid each other
offline (demo.pay: main.py processes on the virtual radio), registered with a backend whose database and key file the
operator's CLI made; then the devices started again from their flash images beside a real `paytoken-backend serve`,
put in BLE sync mode with a long press of CONFIRM, and relayed by paytoken_host.sync_ble.BleDeviceLink."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx

from paytoken import wire
from paytoken_host import demo, simdevice
from paytoken_host.simradio.broker import BrokerThread, RadioConfig
from paytoken_host.sync_ble import BleDeviceLink, DeviceRefused
from paytoken_host.sync_bridge_core import relay as relay_core
from tests.backend_rig import Database, free_port, init_cli, start_server, stop_server
from tests.harness.mp import FIRMWARE_BUILD, command
from tests.sync_rig import make_backend

AMOUNT = 2_500
HEAP = os.environ.get("PAYTOKEN_SYNC_BLE_HEAP", "512K")  # the devices' heap (-X heapsize)


def relay(link: BleDeviceLink, url: str,
          tamper: Callable[[bytes, bytes], bytes | None] | None = None) -> int:
    """The bridge's relay (paytoken_host.sync_bridge_core.relay); with tamper, a hostile relay's loop that hands the
    device tamper(msg1, msg2) instead of the backend's message 2 (None: drops it). Exchanges completed."""
    if tamper is None:
        return relay_core(link, url).exchanges
    n = 0
    with httpx.Client(base_url=url, timeout=30) as http:
        while (msg1 := link.pull()) is not None:
            r = http.post("/v1/sync", content=msg1, headers={"content-type": "application/octet-stream"})
            r.raise_for_status()
            msg2 = r.content if tamper is None else tamper(msg1, r.content)
            if msg2 is None:
                continue
            try:
                link.push(msg2)
            except DeviceRefused as e:
                if e.final:
                    raise
            n += 1
    return n


@dataclass
class Paid:
    dir: Path
    key: str
    payer_id: bytes
    payee_id: bytes


def paid_images(d: Path, interval_ms: float = 30) -> Paid:
    """One offline payment of AMOUNT between a payer and a payee registered with a backend (its database and key file
    made by the operator's CLI); the devices' flash images (d/run) and the database (d) as they were after it."""
    auth = simdevice.Authority()
    url = f"sqlite:///{d}/backend.db"
    key = init_cli(url, SimpleNamespace(backend_key=auth.backend, issuer=auth.issuer), d)
    backend = make_backend(Database("sqlite", url), auth, time.time)  # type: ignore[arg-type]
    ids: dict[str, bytes] = {}

    def provision(out: Path, firmware: Path, amount: int, balance: int, say) -> dict[str, demo.Provisioned]:
        found = {}
        for name, role, config in (("payee", wire.ROLE_PAYEE, {"name": "payee", "amount": amount}),
                                   ("payer", wire.ROLE_PAYER, {"name": "payer"})):
            keys = auth.device(role)
            backend.register(keys.cert)
            vouchers = []
            if role == wire.ROLE_PAYER:
                vouchers = [bytes.fromhex(backend.issue_voucher(keys.device_id, balance)["voucher"])]
            simdevice.provision(out / f"{name}.img", auth, keys, vouchers, config, firmware)
            ids[name] = keys.device_id
            found[name] = demo.Provisioned(keys.device_id, role, b"")
        return found

    result = demo.pay(d / "run", FIRMWARE_BUILD, AMOUNT, 100_000, interval_ms, {"payer": HEAP, "payee": HEAP},
                      screens=False, provision=provision)
    if result.paid.get("amount") != str(AMOUNT):
        raise demo.DemoError(f"the payment did not complete: {result.paid}")
    backend.engine.dispose()
    return Paid(d, key, ids["payer"], ids["payee"])


@dataclass
class Rig:
    paid: Paid
    dir: Path
    url: str
    radio: str
    heap: str = HEAP
    romfs: bool = False  # the firmware's code in place from its ROMFS image (as `make deploy` installs it)
    launch: demo.Launcher | None = None  # another way to start main.py (mp.frozen_launcher); overrides romfs
    devices: dict[str, demo.Device] = field(default_factory=dict)
    timeline: demo.Timeline = field(default_factory=demo.Timeline)

    def start(self, name: str) -> demo.Device:
        (self.dir / f"{name}.buttons").write_text("")
        env = {"PAYTOKEN_RADIO": self.radio, "PAYTOKEN_SIM_FLASH": str(self.dir / f"{name}.img"),
               "PAYTOKEN_SIM_BUTTONS": str(self.dir / f"{name}.buttons")}
        if name == "payer":
            (self.dir / "scanner").write_text("")
            env["PAYTOKEN_SIM_SCANNER"] = str(self.dir / "scanner")
        launch = self.launch or (romfs_launcher if self.romfs else demo.files_launcher)
        dev = demo.Device(name, FIRMWARE_BUILD, self.heap, env, launch, timeline=self.timeline, screens=False)
        self.devices[name] = dev
        dev.until("ready" if name == "payer" else "qr", quiet)
        return dev

    def sync_mode(self, name: str) -> dict:
        """Holds CONFIRM on the device: it advertises the sync service."""
        dev = self.devices.get(name) or self.start(name)
        with open(self.dir / f"{name}.buttons", "a") as f:
            f.write("confirm long\n")
        return dev.until("sync_ble_ready", quiet)

    def link(self, name: str) -> BleDeviceLink:
        return BleDeviceLink(name, backend="sim", radio=self.radio)

    def sync(self, name: str) -> tuple[dict, list[str]]:
        """Sync mode, one honest relay: the device's end event and the statuses it reports over BLE."""
        self.sync_mode(name)
        with self.link(name) as link:
            relay(link, self.url)
            statuses = [row[3] for row in link.status()[1]]
        return self.devices[name].until("sync_ble_end", quiet), statuses


def romfs_launcher(heap: str) -> tuple[list[str], dict[str, str]]:
    """main.py with the firmware's code in place from build/firmware/romfs.img (tests/harness/romboot): `heap` is
    what the firmware gets beyond the image, as on an ESP32 with a romfs partition."""
    return command(heap, source="exec(open('main.py').read())", romfs=True)


def quiet(name: str, item: tuple[str, object]) -> None:
    pass


@contextmanager
def running(paid: Paid, tmp_path: Path, interval_ms: float = 30) -> Iterator[Rig]:
    """The backend served from a copy of the database, a radio broker, and a Rig to start the devices on it."""
    for f in ("payer.img", "payee.img"):
        shutil.copyfile(paid.dir / "run" / f, tmp_path / f)
    shutil.copyfile(paid.dir / "backend.db", tmp_path / "backend.db")
    port = free_port()
    server = start_server(f"sqlite:///{tmp_path}/backend.db", paid.key, port, workers=1)
    try:
        with BrokerThread(config=RadioConfig(interval_ms=interval_ms)) as radio:
            r = Rig(paid, tmp_path, f"http://127.0.0.1:{port}", radio.address)
            try:
                yield r
            except BaseException:
                for name, d in r.devices.items():  # the devices' last lines: pytest shows them with the failure
                    print(f"--- {name}", *d.lines[-30:], sep="\n")
                raise
            finally:
                for d in r.devices.values():
                    d.stop()
    finally:
        stop_server(server)
