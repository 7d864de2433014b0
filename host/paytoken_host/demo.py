"""`make demo`: the seed's example in simulation, then its settlement. A merchant terminal shows a QR, a wallet
card pays $100.00 over BLE, both store the signed record, with no internet anywhere; later each comes online and
syncs with the settlement backend, which settles the payment and notifies the bank.

Each device is its own `micropython` process running the firmware's main.py with the unix_sim board: flash
image, display, buttons and QR scanner simulated, BLE through the virtual radio (paytoken_host.simradio, 30 ms
connection interval). Both start blank and are provisioned first by host/provision.py over their USB serial, a
pseudo-terminal (paytoken_host.simstation): their keys are made on the devices, the backend registers them and
issues the card's first load. Between them there is only the radio and what a person does: the QR is read off the
terminal's screen with zxing-cpp and held in front of the card's scanner, and the card's confirm button is pressed
when it asks.

The backend is a real `paytoken-backend serve` on SQLite (paytoken_host.backend.local: key, database and
operator tokens made with its CLI), its webhook target the sample bank receiver (paytoken_host.bank_receiver).
Two payments run, one per sync order (ORDERS): after each, the devices come online one after the other, each
syncing over its own transport (DEVICE_SYNC, SYNC_TRANSPORTS: sync_device(net, name, how)) and then showing the
statuses its ledger holds (the firmware's paytoken.app.wifisync, the 'sync_statuses' screen).

Writes into --out (default build/demo): payer.img and payee.img (the devices' flash), payee_qr.png (the QR
screen), backend/ and bank.sqlite, and summary.json: `devices` [{id, role, identity_public_key, balance}],
`records` [{payer, payee, amount, currency, payment, payer_sig, receipt, payee_sig}] (hex; payment and receipt are
the exact bytes signed), so anyone can check every signature with an independent library; `sync` [{order,
transaction_id, amount, statuses: {device id: the status in that device's own ledger}}] and `bank`
{notifications, balances: {account: minor units}}.
"""

from __future__ import annotations

import argparse
import json
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from paytoken import base45, wire
from paytoken_host import protocol, simdevice
from paytoken_host.bank_receiver import BankReceiver
from paytoken_host.fwbuild import micropython_command
from paytoken_host.simradio.broker import BrokerThread

if TYPE_CHECKING:
    from paytoken_host.simstation import SimStation

ROOT = Path(__file__).resolve().parents[2]
SIG = 64


class DemoError(Exception):
    pass


Launcher = Callable[[str], tuple[list[str], dict[str, str]]]  # heapsize -> (argv, environment) running main.py


def files_launcher(heap: str) -> tuple[list[str], dict[str, str]]:
    """main.py with the firmware's .mpy files on the path (cwd: the built firmware), as `make deploy-files`."""
    return [micropython_command(), "-X", f"heapsize={heap}", "main.py"], dict(
        os.environ, MICROPYPATH=".frozen:lib")


class Timeline(queue.Queue):
    """Items of every device in the order they happened, and the events already shown, by device."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, list[tuple[str, dict]]] = {}


class Device:
    """One simulated device: main.py in its own process; its event lines and screen frames, in order."""

    def __init__(self, name: str, firmware: Path, heap: str, env: dict[str, str], launch: Launcher = files_launcher,
                 timeline: Timeline | None = None, screens: bool = True):
        self.name = name
        # every device's items go to one timeline, so they are shown in the order they happened
        self.items = timeline if timeline is not None else Timeline()
        argv, base = launch(heap)
        base = {k: v for k, v in base.items() if not k.startswith("PAYTOKEN_SIM_")}
        if screens:  # every frame on stdout too (the simulator's cost, not the device's: off for heap figures)
            base["PAYTOKEN_SIM_TERM"] = "1"
        self.proc = subprocess.Popen(argv, cwd=firmware, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     env=dict(base, **env))

        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        # ("event", (name, {k: v})) or ("frame", [lines]) or ("text", line), in the order the device wrote them
        assert self.proc.stdout
        frame: list[str] | None = None
        rows = 0
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            self.lines.append(line)
            if frame is not None:
                frame.append(line)
                if len(frame) == rows:
                    self.items.put((self.name, ("frame", frame)))
                    frame = None
                continue
            if line.startswith("FRAME "):
                rows = (int(line.split()[2].split("x")[1]) + 1) // 2
                frame = []
            elif line.startswith("EVENT "):
                parts = line.split()
                fields = dict(p.split("=", 1) for p in parts[3:] if "=" in p)
                self.items.put((self.name, ("event", (parts[2], fields))))
            elif line.strip():
                self.items.put((self.name, ("text", line)))
        self.items.put((self.name, None))

    def until(self, event: str, show, timeout: float = 30) -> dict:
        """Hands every frame and event on the timeline to show() until this device's `event`; returns its
        fields. DemoError when any device fails, halts, stops or stalls first."""
        seen = self.items.seen.setdefault(self.name, [])
        for i, (name, fields) in enumerate(seen):
            if name == event:  # it came while the demo waited for another device
                del seen[: i + 1]
                return fields
        deadline = time.monotonic() + timeout
        while True:
            try:
                name, item = self.items.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DemoError(f"{self.name}: no '{event}' within {timeout:.0f} s") from None
            if item is None:
                raise DemoError(f"{name} stopped before {self.name}'s '{event}'")
            show(name, item)
            if item[0] == "event" and item[1][0] in ("failed", "halted", "error"):
                raise DemoError(f"{name}: {item[1][0]} {item[1][1]}")
            if item[0] != "event":
                continue
            if name == self.name and item[1][0] == event:
                seen.clear()
                return item[1][1]
            self.items.seen.setdefault(name, []).append(item[1])

    def cpu_seconds(self) -> float:
        """User + system CPU time of the device's process so far (Linux /proc)."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return float("nan")
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def printer(out):
    def show(name: str, item: tuple[str, object]) -> None:
        kind, value = item
        if kind == "frame":
            print(f"  [{name} screen]", file=out)
            for line in value:  # type: ignore[union-attr]
                print("  |" + line, file=out)
        elif kind == "event":
            event, fields = value  # type: ignore[misc]
            print(f"{name:>6}: {event} " + " ".join(f"{k}={v}" for k, v in fields.items()), file=out)
        else:
            print(f"{name:>6}: {value}", file=out)
        out.flush()

    return show


def read_qr(png: Path) -> str:
    import zxingcpp
    from PIL import Image

    found = zxingcpp.read_barcodes(Image.open(png))
    if not found:
        raise DemoError(f"no QR code found on the terminal's screen ({png})")
    return found[0].text


EXPORT = """
import board
from binascii import hexlify
from paytoken.app import start
from paytoken import wallet_sync
_dev, _trust, _w = start.open_device(board.storage({image!r}, "/flash"))
print("BALANCE", _w.balance)
for _role, _p, _r in wallet_sync.signed_payments(_w):
    print("PAYMENT", _role, hexlify(_p).decode(), hexlify(_r).decode() if _r else "-")
from paytoken import sync_client
for _role, _txid, _amount, _status in sync_client.statuses(_w, 64):
    print("STATUS", hexlify(_txid).decode(), _status)
_w.ledger.close()
board.unmount("/flash")
"""


class Exported(NamedTuple):
    balance: int
    payments: list[tuple[int, bytes, bytes | None]]  # (role, signed payment, signed receipt or None)
    statuses: dict[str, str]  # txid (hex) -> the status the ledger holds (sync_client.statuses)


def export(image: Path, firmware: Path) -> Exported:
    """A device's balance, its signed payments and their statuses, read from its flash image by the firmware
    itself."""
    proc = simdevice.run_firmware(EXPORT.format(image=str(image.resolve())), firmware)
    if proc.returncode != 0:
        raise DemoError(f"reading {image} failed: {proc.stdout}{proc.stderr}")
    balance, payments, statuses = None, [], {}
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["BALANCE"]:
            balance = int(parts[1])
        elif parts[:1] == ["PAYMENT"]:
            receipt = None if parts[3] == "-" else bytes.fromhex(parts[3])
            payments.append((int(parts[1]), bytes.fromhex(parts[2]), receipt))
        elif parts[:1] == ["STATUS"]:
            statuses[parts[1]] = parts[2]
    if balance is None:
        raise DemoError(f"reading {image}: no balance in {proc.stdout!r}")
    return Exported(balance, payments, statuses)


@dataclass(frozen=True)
class Provisioned:
    """A provisioned device as the world may know it: public data only."""

    device_id: bytes
    role: int
    identity_pub: bytes  # SEC1 uncompressed


@dataclass
class Payment:
    """What one simulated payment did: timings, CPU, bytes over the air, the devices' logs."""

    seconds: float = 0.0  # from the QR read off the screen to both records durable (both "paid" events)
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per device over the same span
    air: dict[str, int] = field(default_factory=dict)  # ATT bytes over the air: to_payee, to_payer, pdus
    paid: dict[str, str] = field(default_factory=dict)
    keys: dict[str, Provisioned] = field(default_factory=dict)
    logs: dict[str, list[str]] = field(default_factory=dict)


Provisioner = Callable[[Path, Path, int, int, Callable[[str], None]], dict[str, Provisioned]]


def provision_images(out_dir: Path, firmware: Path, amount: int, balance: int, say) -> dict[str, Provisioned]:
    """payee.img and payer.img written directly by the firmware's store code (simdevice): the fast way, for
    the bench's many runs. The demo provisions over USB instead (provision_over_usb)."""
    auth = simdevice.Authority()
    keys = {"payer": auth.device(wire.ROLE_PAYER), "payee": auth.device(wire.ROLE_PAYEE)}
    simdevice.provision(out_dir / "payee.img", auth, keys["payee"], config={"name": "payee", "amount": amount},
                        firmware=firmware)
    simdevice.provision(out_dir / "payer.img", auth, keys["payer"], [auth.voucher(keys["payer"], 1, balance)],
                        {"name": "payer"}, firmware)
    return {name: Provisioned(k.device_id, k.role, protocol.sec1(k.identity.public_key())) for name, k in keys.items()}


def provision_over_usb(out_dir: Path, firmware: Path, amount: int, balance: int, say,
                       station: SimStation | None = None) -> dict[str, Provisioned]:
    """Both devices blank, each main.py in its own process with its USB serial on a pseudo-terminal
    (paytoken_host.simusb), provisioned by host/provision.py as an operator would run it: by `station` (with a
    backend server: registered, the card's first load issued by it), by default a test issuer key file with the
    backend's keys and the card's load voucher from a test authority, no backend server."""
    from paytoken_host import simstation

    station = station or simstation.SimStation(out_dir / "station", firmware)
    found = {}
    for name, args in (("payee", ["--role", "payee", "--name", "payee", "--amount", str(amount)]),
                       ("payer", ["--role", "payer", "--name", "payer", "--balance", str(balance)])):
        res = station.provision(out_dir / f"{name}.img", args)
        say(f"provision.py over {res.port}: {res.line}")
        found[name] = Provisioned(res.device_id, res.role, res.identity_pub)
    return found


def pay(out_dir: Path, firmware: Path, amount: int = 10_000, balance: int = 100_000, interval_ms: float = 30,
        heaps: dict[str, str] | None = None, launch: Launcher = files_launcher, show=None, out=None,
        screens: bool = True, provision: Provisioner = provision_images) -> Payment:
    """Provision a payee terminal and a payer card in out_dir, run one payment between them, return what it did.
    DemoError when a device fails, halts or stalls (the devices' last lines in the message). screens=False
    leaves the simulated displays without their PNG files and terminal pictures (simulator work that a device
    does not do) and takes the QR from the terminal's event instead of its screen: for heap figures."""
    say = sayer(out)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    say(f"provisioning a payee terminal and a payer card (test issuer; card loaded with ${balance / 100:.2f})")
    keys = provision(out_dir, firmware, amount, balance, say)
    result = session(out_dir, firmware, interval_ms, heaps, launch, show, out, screens)
    result.keys = keys
    return result


def sayer(out) -> Callable[[str], None]:
    def say(text: str) -> None:
        if out is not None:
            print(text, file=out, flush=True)

    return say


def session(out_dir: Path, firmware: Path, interval_ms: float = 30, heaps: dict[str, str] | None = None,
            launch: Launcher = files_launcher, show=None, out=None, screens: bool = True) -> Payment:
    """One payment between the provisioned devices of out_dir (payee.img, payer.img): both main.py processes
    started on the virtual radio, the QR read off the terminal's screen, the card's confirm pressed; both
    processes stopped when both records are stored."""
    from paytoken_host.simradio.broker import RadioConfig

    heaps = heaps or {"payer": "512K", "payee": "512K"}
    show = show or (lambda name, item: None)
    say = sayer(out)
    result = Payment()
    (out_dir / "scanner").write_text("")
    (out_dir / "buttons").write_text("")
    devices: list[Device] = []
    timeline = Timeline()
    with BrokerThread(config=RadioConfig(interval_ms=interval_ms)) as radio:
        try:
            env = {"PAYTOKEN_RADIO": radio.address}
            shots = {name: {"PAYTOKEN_SIM_DISPLAY": str(out_dir / f"{name}_screen.png")} if screens else {}
                     for name in ("payer", "payee")}
            payee = Device("payee", firmware, heaps["payee"], dict(
                env, PAYTOKEN_SIM_FLASH=str(out_dir / "payee.img"), **shots["payee"]), launch, timeline, screens)
            devices.append(payee)
            payer = Device("payer", firmware, heaps["payer"], dict(
                env, PAYTOKEN_SIM_FLASH=str(out_dir / "payer.img"), PAYTOKEN_SIM_SCANNER=str(out_dir / "scanner"),
                PAYTOKEN_SIM_BUTTONS=str(out_dir / "buttons"), **shots["payer"]), launch, timeline, screens)
            devices.append(payer)
            qr = payee.until("qr", show)
            payer.until("ready", show)
            if screens:
                shutil.copy(out_dir / "payee_screen.png", out_dir / "payee_qr.png")
                text = read_qr(out_dir / "payee_qr.png")
            else:
                text = base45.encode(bytes.fromhex(qr["qr"]))
            if wire.decode_qr(base45.decode(text)).nonce.hex() != qr["nonce"]:
                raise DemoError("the QR on the screen is not the one the terminal announced")
            say(f"\nzxing-cpp read the terminal's QR: {text}\nthe card's scanner sees it")
            t0 = time.monotonic()
            cpu0 = {d.name: d.cpu_seconds() for d in devices}
            with open(out_dir / "scanner", "a") as f:
                f.write(text + "\n")
            payer.until("ask", show)
            say("\nthe card holder presses CONFIRM")  # at once: the span measured is the system's alone
            with open(out_dir / "buttons", "a") as f:
                f.write("confirm\n")
            result.paid = payer.until("paid", show)
            payee.until("paid", show)
            result.seconds = time.monotonic() - t0
            result.cpu = {d.name: d.cpu_seconds() - cpu0[d.name] for d in devices}
            links = radio.links(all=True)
            result.air = {"to_payee": sum(k["stats"]["c2p"]["bytes"] for k in links),
                          "to_payer": sum(k["stats"]["p2c"]["bytes"] for k in links),
                          "pdus": sum(k["stats"]["c2p"]["pdus"] + k["stats"]["p2c"]["pdus"] for k in links)}
            time.sleep(0.3)  # the last screens
            while not timeline.empty():
                name, item = timeline.get()
                if item is not None:
                    show(name, item)
        finally:
            for d in devices:
                d.stop()
                result.logs[d.name] = d.lines
    return result


# ---- settlement: the backend, the bank, and each device's sync ----

ORDERS = (("payer-first", ("payer", "payee")), ("payee-first", ("payee", "payer")))
# How each device syncs: a name in SYNC_TRANSPORTS. The terminal has Wi-Fi; the card has none and syncs through a
# relay on its USB serial (host/sync_bridge.py).
DEVICE_SYNC = {"payee": "wifi", "payer": "usb-bridge"}


@dataclass
class Online:
    """What a device's sync needs: the backend's URL, the firmware, where the flash images are, the printer."""

    backend_url: str
    firmware: Path
    out_dir: Path
    heap: str
    show: Callable
    say: Callable[[str], None]


def wifisync_launcher(heap: str) -> tuple[list[str], dict[str, str]]:
    """The device syncing itself and showing its statuses (paytoken.app.wifisync), cwd: the built firmware."""
    code = "import board\nfrom paytoken.app import wifisync\nwifisync.run(board)"
    return [micropython_command(), "-X", f"heapsize={heap}", "-c", code], dict(
        os.environ, MICROPYPATH=".frozen:lib:.")


def sync_wifi(net: Online, name: str) -> dict:
    """The device's own Wi-Fi: it POSTs its sealed exchanges to the backend itself (paytoken.sync_http; the
    simulator's online switch PAYTOKEN_SIM_ONLINE), then shows its statuses. The "synced" event's fields."""
    dev = Device(name, net.firmware, net.heap, {
        "PAYTOKEN_SIM_FLASH": str(net.out_dir / f"{name}.img"), "PAYTOKEN_SIM_ONLINE": net.backend_url,
        "PAYTOKEN_SIM_DISPLAY": str(net.out_dir / f"{name}_screen.png")}, wifisync_launcher)
    try:
        fields = dev.until("synced", net.show, timeout=60)
        while (item := dev.items.get(timeout=30)[1]) is not None:  # its statuses, to the end of the process
            net.show(name, item)
        if dev.proc.wait(timeout=30) != 0:
            raise DemoError(f"{name}: the sync process exited with {dev.proc.returncode}")
        return fields
    except DemoError as e:
        last = [x for x in dev.lines if x.strip() and not set(x) <= set(" ▀▄█") and not x.startswith("FRAME")][-8:]
        raise DemoError(f"{e}; {name}'s last lines: " + " / ".join(last)) from None
    finally:
        dev.stop()


def sync_usb_bridge(net: Online, name: str) -> dict:
    """The card has no Wi-Fi: it runs its app (main.py) with its USB serial on a simulated USB-UART bridge, and
    host/sync_bridge.py, run as an operator would with the pseudo-terminal as its --port, relays its sealed
    exchanges (paytoken.app.usbwatch serves them between payments). The "synced" event's fields."""
    from paytoken_host.simusb import UsbBridge

    files = {}
    for f in ("scanner", "buttons"):  # a card's app reads them; nobody scans or presses here
        (net.out_dir / f"{name}.{f}").write_text("")
        files[f"PAYTOKEN_SIM_{f.upper()}"] = str(net.out_dir / f"{name}.{f}")
    with BrokerThread() as radio, UsbBridge() as usb:
        dev = Device(name, net.firmware, net.heap, {
            "PAYTOKEN_SIM_FLASH": str(net.out_dir / f"{name}.img"), "PAYTOKEN_RADIO": radio.address,
            "PAYTOKEN_SIM_USB": usb.address, "PAYTOKEN_SIM_DISPLAY": str(net.out_dir / f"{name}_screen.png"), **files})
        try:
            dev.until("ready" if name == "payer" else "qr", net.show)
            if not usb.wait_device():
                raise DemoError(f"{name}: its USB serial never opened")
            net.say(f"  python host/sync_bridge.py --port {usb.port} --backend {net.backend_url}")
            bridge = subprocess.run([sys.executable, str(ROOT / "host" / "sync_bridge.py"), "--port", usb.port,
                                     "--backend", net.backend_url], capture_output=True, text=True, timeout=120)
            for line in bridge.stderr.splitlines():
                net.say("  " + line)
            if bridge.returncode != 0:
                raise DemoError(f"{name}: sync_bridge.py exited with {bridge.returncode}")
            fields = dev.until("synced", net.show, timeout=60)
            time.sleep(0.3)  # the statuses screen that follows
            while not dev.items.empty():
                item = dev.items.get()[1]
                if item is not None:
                    net.show(name, item)
            return fields
        finally:
            dev.stop()


SyncTransport = Callable[[Online, str], dict]
SYNC_TRANSPORTS: dict[str, SyncTransport] = {"wifi": sync_wifi, "usb-bridge": sync_usb_bridge}


def sync_device(net: Online, name: str, how: str) -> dict:
    """Device `name` (payer or payee) syncs with the backend over transport `how` (SYNC_TRANSPORTS)."""
    transport = SYNC_TRANSPORTS.get(how)
    if transport is None:
        raise DemoError(f"sync transport {how!r}: one of {', '.join(SYNC_TRANSPORTS)}")
    return transport(net, name)


def show_bank(bank: BankReceiver, say: Callable[[str], None]) -> dict:
    got = bank.ledger.summary()
    say(f"  bank: {got['notifications']} notification(s) received, signatures checked; balances:")
    for account, amount in got["balances"].items():
        say(f"    {account:<26} {'-' if amount < 0 else ' '}${abs(amount) / 100:,.2f}")
    return got


def wait_bank(bank: BankReceiver, notifications: int, timeout: float = 20) -> None:
    """Until the bank has received `notifications` events (the backend's worker delivers its outbox)."""
    deadline = time.monotonic() + timeout
    while bank.ledger.summary()["notifications"] < notifications:
        if bank.refused:
            raise DemoError(f"the bank refused a notification: {bank.refused[-1]}")
        if time.monotonic() > deadline:
            raise DemoError(f"the bank got no notification {notifications} within {timeout:g} s")
        time.sleep(0.1)


def issuer_key(work: Path, passphrase: str) -> Path:
    """A new issuer key file made by host/provision.py --new-issuer-key, as an operator does; its path."""
    from paytoken_host.simstation import PROVISION

    work.mkdir(parents=True, exist_ok=True)
    key = work / "issuer.key"
    proc = subprocess.run([sys.executable, str(PROVISION), "--new-issuer-key", str(key)], capture_output=True,
                          text=True, env={**os.environ, "PAYTOKEN_KEY_PASSPHRASE": passphrase})
    if proc.returncode != 0:
        raise DemoError(f"provision.py --new-issuer-key failed: {proc.stderr.strip()}")
    return key


def run(out_dir: Path, amount: int, balance: int, interval_ms: float, heap: str, firmware: Path, out) -> dict:
    """The whole demo: backend and bank, provisioning, then per sync order a payment and both devices' syncs;
    writes out_dir/summary.json and returns it."""
    import secrets

    from paytoken_host.backend.local import LocalBackend
    from paytoken_host.bank_receiver import Ledger
    from paytoken_host.simstation import SimStation

    show, say = printer(out), sayer(out)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    passphrase, bank_secret = secrets.token_urlsafe(16), secrets.token_urlsafe(32)
    key = issuer_key(out_dir / "station", passphrase)
    with BankReceiver(bank_secret.encode(), Ledger(out_dir / "bank.sqlite")) as bank, LocalBackend.create(
            out_dir / "backend", Path(f"{key}.pub"), passphrase, bank.url, bank_secret, 0.2) as backend:
        say(f"settlement backend: paytoken-backend serve at {backend.url} (SQLite, {out_dir / 'backend'})")
        say(f"bank: the sample receiver at {bank.url}, the backend's webhook target (HMAC-signed events)")
        station = SimStation(out_dir / "station", firmware, backend_url=backend.url, issuer_key=key,
                             passphrase=passphrase, env={"PAYTOKEN_PROVISIONING_TOKEN": backend.tokens["provisioning"],
                                                         "PAYTOKEN_TREASURY_TOKEN": backend.tokens["treasury"]})
        say(f"\n== provisioning over USB: a payee terminal and a payer card, registered with the backend, the card "
            f"loaded with ${balance / 100:.2f} by it")
        keys = provision_over_usb(out_dir, firmware, amount, balance, say, station)
        wait_bank(bank, 1)
        show_bank(bank, say)
        net = Online(backend.url, firmware, out_dir, heap, show, say)
        sync = []
        for order, first_second in ORDERS:
            say(f"\n== {order}: a payment offline over BLE, then the {first_second[0]} comes online first")
            result = session(out_dir, firmware, interval_ms, {"payer": heap, "payee": heap}, show=show, out=out)
            say(f"\npaid in {result.seconds:.2f} s from the QR scan to both records stored")
            txid = wire.txid(keys["payer"].device_id, int(result.paid["counter"])).hex()
            for i, name in enumerate(first_second):
                how = DEVICE_SYNC[name]
                say(f"\n-- the {name} comes online ({how}) and syncs")
                before = bank.ledger.summary()["notifications"]
                sync_device(net, name, how)
                if i == 0:  # its upload settled the payment: the backend notifies the bank
                    wait_bank(bank, before + 1)
                show_bank(bank, say)
            statuses = {keys[name].device_id.hex(): export(out_dir / f"{name}.img", firmware).statuses.get(txid)
                        for name in ("payer", "payee")}
            sync.append({"order": order, "transaction_id": txid, "amount": int(result.paid["amount"]),
                         "statuses": statuses})
        summary = summarise(out_dir, firmware, keys["payer"], keys["payee"])
        summary["sync"] = sync
        summary["bank"] = bank.ledger.summary()
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarise(out_dir: Path, firmware: Path, payer_keys: Provisioned, payee_keys: Provisioned) -> dict:
    devices, records = [], []
    for keys, image in ((payee_keys, out_dir / "payee.img"), (payer_keys, out_dir / "payer.img")):
        bal, payments, _ = export(image, firmware)
        devices.append({"id": keys.device_id.hex(), "role": "payer" if keys.role == wire.ROLE_PAYER else "payee",
                        "identity_public_key": keys.identity_pub.hex(), "balance": bal})
        if keys.role == wire.ROLE_PAYEE:
            for _, payment, receipt in payments:
                p = wire.decode_payment(payment)
                records.append({"payer": p.payer_id.hex(), "payee": p.payee_id.hex(), "amount": p.amount,
                                "currency": p.currency, "payment": payment[:-SIG].hex(),
                                "payer_sig": payment[-SIG:].hex(),
                                "receipt": receipt[:-SIG].hex() if receipt else None,
                                "payee_sig": receipt[-SIG:].hex() if receipt else None})
    return {"devices": devices, "records": records}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT / "build" / "demo", help="output folder (default build/demo)")
    ap.add_argument("--amount", type=int, default=10_000, help="amount in cents (default 10000: $100.00)")
    ap.add_argument("--balance", type=int, default=100_000, help="the card's load in cents (default $1000.00)")
    ap.add_argument("--interval-ms", type=float, default=30, help="BLE connection interval (default 30)")
    ap.add_argument("--heap", default="512K", help="-X heapsize of each device (default 512K)")
    ap.add_argument("--firmware", type=Path, default=ROOT / "build" / "firmware", help="built firmware (make firmware)")
    args = ap.parse_args(argv)
    if not (args.firmware / "main.py").exists():
        print(f"demo: no firmware in {args.firmware}: run `make firmware`", file=sys.stderr)
        return 2
    try:
        summary = run(args.out, args.amount, args.balance, args.interval_ms, args.heap, args.firmware.resolve(),
                      sys.stdout)
    except DemoError as e:
        print(f"demo failed: {e}", file=sys.stderr)
        return 1
    print("\n== done")
    for d in summary["devices"]:
        print(f"{d['role']:>6} {d['id']}  balance ${d['balance'] / 100:.2f}")
    for s in summary["sync"]:
        print(f"{s['order']:>11}: {s['transaction_id']} ${s['amount'] / 100:.2f} "
              + " ".join(f"{dev}={st}" for dev, st in s["statuses"].items()))
    print(f"bank: {summary['bank']['notifications']} notifications")
    print(f"wrote {args.out / 'payee_qr.png'} and {args.out / 'summary.json'} ({len(summary['records'])} records)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
