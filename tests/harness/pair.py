"""A payer and a payee, each in its own MicroPython process as on two devices (tests/harness/app_side.py): flash
images provisioned by paytoken_host.simdevice, the radio through files (file_air.py), the QR carried from the
payee's display to the payer's scanner file, the person's press written to the payer's buttons file. Used by
tests/test_app_heap.py (each role within its heap budget) and, for its Side, by the BLE payment tests."""

from __future__ import annotations

import os
import queue
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from paytoken import base45, wire
from paytoken_host.simdevice import Authority, provision
from tests.harness.mp import FIRMWARE_BUILD, command, micropython_command, micropython_path, romfs_with

HARNESS = Path(__file__).parent
SIDE_MODULES = ("app_side", "file_air")  # what a device process runs beside the firmware
FAST = {"payer": ["card.SCAN_TRIGGER_MS=20", "card.RESULT_MS=10"], "payee": ["terminal.RESULT_MS=10"]}


@dataclass
class Images:
    """Provisioned flash images of one payer and one payee, copied fresh for every run."""

    folder: Path
    auth: Authority = field(default_factory=Authority)
    amount: int = 10_000
    balance: int = 100_000

    def __post_init__(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        payer, payee = self.auth.device(wire.ROLE_PAYER), self.auth.device(wire.ROLE_PAYEE)
        provision(self.folder / "payee.img", self.auth, payee, config={"name": "payee", "amount": self.amount},
                  firmware=FIRMWARE_BUILD)
        provision(self.folder / "payer.img", self.auth, payer, [self.auth.voucher(payer, 1, self.balance)],
                  {"name": "payer"}, FIRMWARE_BUILD)
        self.payer, self.payee = payer, payee


class Side:
    def __init__(self, role: str, heap: str, env: dict, air: Path | str, micropython: str | None = None,
                 romfs: bool = False, sessions: int = 1):
        """air: the file radio's folder, or "ble" for paytoken.ble on the simulated radio (env PAYTOKEN_RADIO)."""
        self.role = role
        args = (str(air), str(sessions), *FAST[role])
        if romfs:  # code in place from a ROMFS image, the harness's stand-ins for the radio in it too
            cmd, base = command(heap, module="app_side", args=args, romfs=True, image=romfs_with(SIDE_MODULES))
        else:
            cmd = [micropython or micropython_command(), "-X", f"heapsize={heap}", str(HARNESS / "app_side.py"),
                   *args]
            base = dict(os.environ, MICROPYPATH=micropython_path([HARNESS]))
        # cwd: a build with the board frozen in reads board/board.json from there
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=FIRMWARE_BUILD, env=dict(base, **env))
        self.lines: list[str] = []
        self._q: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self._q.put(line.rstrip("\n"))
        self._q.put(None)

    def event(self, name: str, timeout: float = 30) -> dict | None:
        """The next EVENT line of that name (fields as a dict); None if the process ended or time ran out."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._q.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            if line is None:
                self._q.put(None)
                return None
            self.lines.append(line)
            parts = line.split()
            if len(parts) >= 3 and parts[0] == "EVENT" and parts[2] == name:
                return dict(p.split("=", 1) for p in parts[3:])

    def finish(self, timeout: float = 30) -> int | None:
        """The heap still allocated at the process's end (after a collection); None if it failed."""
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        while (line := self._q.get()) is not None:
            self.lines.append(line)
        heap = [ln for ln in self.lines if ln.startswith("HEAP ")]
        if rc != 0 or not heap:
            return None
        return int(heap[-1].split("=")[1])

    @property
    def modules(self) -> list[str]:
        return next((ln.split()[1].split(",") for ln in self.lines if ln.startswith("MODULES ")), [])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def run_pair(images: Images, work: Path, payer_heap: str = "2M", payee_heap: str = "2M",
             display_png: bool = False, micropython: str | None = None, romfs: bool = False,
             usb: bool = False) -> dict:
    """One payment between two processes (usb: each with its USB serial on a simulated USB-UART bridge, which
    the app watches for a sync relay). Returns {"ok": bool, "payer": heap left allocated at the end or None if
    it failed, "payee": ..., "events": {...}, "log": {...}, "modules": {...}}."""
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    air = work / "air"
    air.mkdir()
    for name in ("payer", "payee"):
        shutil.copy(images.folder / f"{name}.img", work / f"{name}.img")
    (work / "scanner").write_text("")
    (work / "buttons").write_text("")
    payee_env = {"PAYTOKEN_SIM_FLASH": str(work / "payee.img")}
    if display_png:
        payee_env["PAYTOKEN_SIM_DISPLAY"] = str(work / "payee.png")
    payer_env = {"PAYTOKEN_SIM_FLASH": str(work / "payer.img"), "PAYTOKEN_SIM_SCANNER": str(work / "scanner"),
                 "PAYTOKEN_SIM_BUTTONS": str(work / "buttons")}
    bridges = []
    if usb:
        from paytoken_host.simusb import UsbBridge

        for env in (payee_env, payer_env):
            bridges.append(UsbBridge())
            env["PAYTOKEN_SIM_USB"] = bridges[-1].address
    payee = Side("payee", payee_heap, payee_env, air, micropython, romfs)
    payer = Side("payer", payer_heap, payer_env, air, micropython, romfs)
    events: dict[str, dict | None] = {}
    try:
        events["qr"] = qr = payee.event("qr")
        # the card drops scans from before its ready screen (stale): show it the QR once it is ready
        events["ready"] = payer.event("ready")
        if qr is not None and events["ready"] is not None:
            if display_png:
                import zxingcpp
                from PIL import Image

                text = zxingcpp.read_barcodes(Image.open(work / "payee.png"))[0].text
            else:
                text = base45.encode(bytes.fromhex(qr["qr"]))
            events["qr_text"] = {"text": text}
            with open(work / "scanner", "a") as f:
                f.write(text + "\n")
            events["offer"] = payer.event("offer")
            events["ask"] = payer.event("ask")  # the question is on the screen: a press now counts
            if events["ask"] is not None:
                with open(work / "buttons", "a") as f:
                    f.write("confirm\n")
                events["payer_paid"] = payer.event("paid")
                events["payee_paid"] = payee.event("paid")
        peaks = {"payer": payer.finish(), "payee": payee.finish()}
    finally:
        payer.kill()
        payee.kill()
        for b in bridges:
            b.close()
    ok = all(events.get(k) for k in ("payer_paid", "payee_paid")) and None not in peaks.values()
    story = "\n".join(f"{d.role}: {ln}" for d in (payee, payer) for ln in d.lines[-12:])
    return {"ok": ok, **peaks, "events": events, "log": {"payer": payer.lines, "payee": payee.lines}, "story": story,
            "modules": {"payer": payer.modules, "payee": payee.modules}}
