"""`make demo`: the seed's example in simulation. A merchant terminal shows a QR, a wallet card pays $100.00 over
BLE, both store the signed record, with no internet anywhere.

Each device is its own `micropython` process running the firmware's main.py with the unix_sim board: flash
image, display, buttons and QR scanner simulated, BLE through the virtual radio (paytoken_host.simradio, 30 ms
connection interval). Between them there is only the radio and what a person does: the QR is read off the
terminal's screen with zxing-cpp and held in front of the card's scanner, and the card's confirm button is
pressed when it asks.

Writes into --out (default build/demo): payer.img and payee.img (the devices' flash), payee_qr.png (the QR
screen), and summary.json: `devices` [{id, role, identity_public_key, balance}] and `records` [{payer, payee,
amount, currency, payment, payer_sig, receipt, payee_sig}] (hex; payment and receipt are the exact bytes signed),
so anyone can check every signature with an independent library.
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
from pathlib import Path

from paytoken import base45, wire
from paytoken_host import protocol, simdevice
from paytoken_host.simradio.broker import BrokerThread

ROOT = Path(__file__).resolve().parents[2]
SIG = 64


class DemoError(Exception):
    pass


class Device:
    """One simulated device: main.py in its own process; its event lines and screen frames, in order."""

    def __init__(self, name: str, firmware: Path, heap: str, env: dict[str, str]):
        self.name = name
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PAYTOKEN_SIM_")}
        self.proc = subprocess.Popen(
            [simdevice.micropython_command(), "-X", f"heapsize={heap}", "main.py"],
            cwd=firmware, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env=dict(clean, MICROPYPATH=".frozen:lib", PAYTOKEN_SIM_TERM="1", **env),
        )
        self.items: queue.Queue[tuple[str, object] | None] = queue.Queue()
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
                    self.items.put(("frame", frame))
                    frame = None
                continue
            if line.startswith("FRAME "):
                rows = (int(line.split()[2].split("x")[1]) + 1) // 2
                frame = []
            elif line.startswith("EVENT "):
                parts = line.split()
                fields = dict(p.split("=", 1) for p in parts[3:] if "=" in p)
                self.items.put(("event", (parts[2], fields)))
            elif line.strip():
                self.items.put(("text", line))
        self.items.put(None)

    def until(self, event: str, show, timeout: float = 30) -> dict:
        """Hands every frame and event to show() until `event` arrives; returns its fields."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                item = self.items.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise DemoError(f"{self.name}: no '{event}' within {timeout:.0f} s") from None
            if item is None:
                raise DemoError(f"{self.name} stopped before '{event}':\n" + "\n".join(self.lines[-15:]))
            show(self.name, item)
            if item[0] == "event" and item[1][0] in ("failed", "halted", "error"):
                raise DemoError(f"{self.name}: {item[1][0]} {item[1][1]}")
            if item[0] == "event" and item[1][0] == event:
                return item[1][1]

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
_w.ledger.close()
board.unmount("/flash")
"""


def export(image: Path, firmware: Path) -> tuple[int, list[tuple[int, bytes, bytes | None]]]:
    """A device's balance and its signed payments, read from its flash image by the firmware itself."""
    env = dict(os.environ, MICROPYPATH=f".frozen:{firmware / 'lib'}:{firmware}")
    proc = subprocess.run([simdevice.micropython_command(), "-X", "heapsize=1M", "-c",
                           EXPORT.format(image=str(image.resolve()))],
                          capture_output=True, text=True, env=env, timeout=60)
    if proc.returncode != 0:
        raise DemoError(f"reading {image} failed: {proc.stdout}{proc.stderr}")
    balance, payments = None, []
    for line in proc.stdout.splitlines():
        parts = line.split()
        if parts[:1] == ["BALANCE"]:
            balance = int(parts[1])
        elif parts[:1] == ["PAYMENT"]:
            receipt = None if parts[3] == "-" else bytes.fromhex(parts[3])
            payments.append((int(parts[1]), bytes.fromhex(parts[2]), receipt))
    if balance is None:
        raise DemoError(f"reading {image}: no balance in {proc.stdout!r}")
    return balance, payments


def run(out_dir: Path, amount: int, balance: int, interval_ms: float, heap: str, firmware: Path, out) -> dict:
    from paytoken_host.simradio.broker import RadioConfig

    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    show = printer(out)
    auth = simdevice.Authority()
    payer_keys, payee_keys = auth.device(wire.ROLE_PAYER), auth.device(wire.ROLE_PAYEE)
    print(f"provisioning a payee terminal and a payer card (test issuer; card loaded with ${balance / 100:.2f})",
          file=out)
    simdevice.provision(out_dir / "payee.img", auth, payee_keys, config={"name": "payee", "amount": amount},
                        firmware=firmware)
    simdevice.provision(out_dir / "payer.img", auth, payer_keys, [auth.voucher(payer_keys, 1, balance)],
                        {"name": "payer"}, firmware)
    (out_dir / "scanner").write_text("")
    (out_dir / "buttons").write_text("")
    devices: list[Device] = []
    with BrokerThread(config=RadioConfig(interval_ms=interval_ms)) as radio:
        try:
            payee = Device("payee", firmware, heap, {"PAYTOKEN_SIM_FLASH": str(out_dir / "payee.img"),
                                                     "PAYTOKEN_SIM_DISPLAY": str(out_dir / "payee_screen.png"),
                                                     "PAYTOKEN_RADIO": radio.address})
            devices.append(payee)
            qr = payee.until("qr", show)
            shutil.copy(out_dir / "payee_screen.png", out_dir / "payee_qr.png")
            text = read_qr(out_dir / "payee_qr.png")
            print(f"\nzxing-cpp read the terminal's QR: {text}", file=out)
            if wire.decode_qr(base45.decode(text)).nonce.hex() != qr["nonce"]:
                raise DemoError("the QR on the screen is not the one the terminal announced")
            payer = Device("payer", firmware, heap, {"PAYTOKEN_SIM_FLASH": str(out_dir / "payer.img"),
                                                     "PAYTOKEN_SIM_SCANNER": str(out_dir / "scanner"),
                                                     "PAYTOKEN_SIM_BUTTONS": str(out_dir / "buttons"),
                                                     "PAYTOKEN_SIM_DISPLAY": str(out_dir / "payer_screen.png"),
                                                     "PAYTOKEN_RADIO": radio.address})
            devices.append(payer)
            payer.until("ready", show)
            print("\nthe card's scanner sees the QR", file=out)
            with open(out_dir / "scanner", "a") as f:
                f.write(text + "\n")
            payer.until("ask", show)
            print("\nthe card holder presses CONFIRM", file=out)
            with open(out_dir / "buttons", "a") as f:
                f.write("confirm\n")
            paid = payer.until("paid", show)
            payee.until("paid", show)
            print(f"\npaid: {paid}", file=out)
            # the last screens
            time.sleep(0.3)
            for d in devices:
                while not d.items.empty():
                    item = d.items.get()
                    if item is not None:
                        show(d.name, item)
        finally:
            for d in devices:
                d.stop()
    summary = summarise(out_dir, firmware, payer_keys, payee_keys)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


def summarise(out_dir: Path, firmware: Path, payer_keys: simdevice.DeviceKeys,
              payee_keys: simdevice.DeviceKeys) -> dict:
    devices, records = [], []
    for keys, image in ((payee_keys, out_dir / "payee.img"), (payer_keys, out_dir / "payer.img")):
        bal, payments = export(image, firmware)
        devices.append({"id": keys.device_id.hex(), "role": "payer" if keys.role == wire.ROLE_PAYER else "payee",
                        "identity_public_key": protocol.sec1(keys.identity.public_key()).hex(), "balance": bal})
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
    for d in summary["devices"]:
        print(f"{d['role']:>6} {d['id']}  balance ${d['balance'] / 100:.2f}")
    print(f"wrote {args.out / 'payee_qr.png'} and {args.out / 'summary.json'} ({len(summary['records'])} record)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
