"""A payer card and two payee terminals as `make demo` runs them (paytoken_host.demo.Device: the firmware's main.py,
each in its own `micropython` process on the unix_sim board) on one virtual radio, for tests/test_e2e_link_drops.py.

Each payment is what a person does: the QR is read off the chosen terminal's display (zxing-cpp, as the demo does)
and written to the card's scanner, CONFIRM is pressed when the card asks. Before it the broker may be armed to drop
the payment's link at one ATT PDU (`drop_at`, docs/simulator.md). The two terminals take turns so that one shows
its result (RESULT_MS) while the other serves the next payment; the card's result is dismissed with a button.
"""

from __future__ import annotations

import queue
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from paytoken import base45, wire
from paytoken_host import demo, simdevice
from paytoken_host.simradio import BrokerThread, att
from tests.harness.mp import FIRMWARE_BUILD
from tests.harness.pair import Images

PAYEES = ("payee", "payee2")
ENDS = {"payer": ("paid", "unconfirmed", "failed"), "payee": ("paid", "failed")}
WAIT_S = 30  # the harness's event timeout (tests/harness/pair.py): a stall fails, nothing is timed


class RigError(Exception):
    pass


@dataclass
class Outcome:
    """What one payment attempt did: every event of each device from the scan to its end, the payer's last screen."""

    events: dict[str, list[tuple[str, dict[str, str]]]] = field(default_factory=dict)
    screen: dict[str, list[str]] = field(default_factory=dict)  # the result screen as text (Rig.settle)
    marks: dict[str, int] = field(default_factory=dict)  # where `events` start in the device's log
    link: dict[str, Any] = field(default_factory=dict)  # the broker's stats of the payment's link
    trace: list[dict[str, Any]] = field(default_factory=list)  # the ATT PDUs the link delivered
    rule: dict[str, Any] | None = None
    error: str = ""

    def end(self, device: str) -> tuple[str, dict[str, str]] | None:
        ends = ENDS["payer" if device == "payer" else "payee"]
        return next((e for e in reversed(self.events.get(device, [])) if e[0] in ends), None)

    def names(self, device: str) -> list[str]:
        return [name for name, _ in self.events.get(device, [])]


class Station:
    """One device: demo.Device with its own timeline, read one item at a time."""

    def __init__(self, device: demo.Device):
        self.device = device
        self.log: list[tuple[str, dict[str, str]]] = []  # every event so far
        self.read = 0  # events of the log handed out by next() (or passed over by it)
        self.frames: list[tuple[int, list[str]]] = []  # (events logged before it, the display as text)

    def _pull(self, timeout: float) -> bool:
        # One item of the device's output into the log or the frames; False if none came within timeout
        try:
            _, item = self.device.items.get(timeout=timeout) if timeout > 0 else self.device.items.get_nowait()
        except queue.Empty:
            return False
        if item is None:
            raise RigError(f"{self.device.name} stopped; last lines: {self.device.lines[-8:]}")
        kind, value = item
        if kind == "frame":
            self.frames.append((len(self.log), value))
        elif kind == "event":
            self.log.append(value)
            if value[0] in ("error", "halted"):
                raise RigError(f"{self.device.name}: {value}")
        return True

    def next(self, names: tuple[str, ...], timeout: float = WAIT_S) -> tuple[str, dict[str, str]]:
        """The device's next event named one of `names` (the ones before it are passed over); RigError on a
        stall, an exit, an error or a halt."""
        deadline = time.monotonic() + timeout
        while True:
            while self.read < len(self.log):
                self.read += 1
                if self.log[self.read - 1][0] in names:
                    return self.log[self.read - 1]
            if not self._pull(deadline - time.monotonic()):
                raise RigError(f"{self.device.name}: none of {names} within {timeout} s; last: {self.log[-3:]}")

    def seen(self, names: tuple[str, ...], timeout: float = WAIT_S) -> tuple[str, dict[str, str]]:
        """Waits for an event named one of `names` among those not handed out yet, and leaves it to next()."""
        deadline = time.monotonic() + timeout
        while True:
            found = [e for e in self.log[self.read:] if e[0] in names]
            if found:
                return found[0]
            if not self._pull(deadline - time.monotonic()):
                raise RigError(f"{self.device.name}: none of {names} within {timeout} s; last: {self.log[-3:]}")

    def pending(self) -> list[tuple[str, dict[str, str]]]:
        """The events that have arrived and were not handed out yet."""
        while self._pull(0):
            pass
        return self.log[self.read:]

    def screen(self, after: int) -> list[str]:
        """The first frame shown after the log's event number `after`, waiting for it if it is not in yet."""
        while not any(n > after for n, _ in self.frames):
            if not self._pull(WAIT_S):
                raise RigError(f"{self.device.name}: no screen after {self.log[after]}")
        return self.screen_after(after)

    def since(self, mark: int) -> list[tuple[str, dict[str, str]]]:
        return self.log[mark:]

    def screen_after(self, event: int) -> list[str]:
        """What the display showed next after the log's event number `event` (an app logs, then shows)."""
        return next((frame for n, frame in self.frames if n > event), [])


class Rig:
    """The card and the two terminals on a broker; `pay()` runs one payment attempt."""

    def __init__(self, folder: Path, images: Images, radio: BrokerThread, amount: int):
        self.folder, self.radio = folder, radio
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(images.folder / "payer.img", folder / "payer.img")
        shutil.copy(images.folder / "payee.img", folder / "payee.img")
        self.keys = {"payer": images.payer, "payee": images.payee, "payee2": images.auth.device(wire.ROLE_PAYEE)}
        simdevice.provision(folder / "payee2.img", images.auth, self.keys["payee2"],
                            config={"name": "payee2", "amount": amount}, firmware=FIRMWARE_BUILD)
        for name in ("scanner", "buttons"):
            (folder / name).write_text("")
        self.stations: dict[str, Station] = {}
        self.qr: dict[str, dict[str, str] | None] = {}  # the terminal's QR; None: a new one is coming
        env = {"PAYTOKEN_RADIO": radio.address}
        for name in (*PAYEES, "payer"):
            extra = {"PAYTOKEN_SIM_DISPLAY": str(folder / f"{name}.png")} if name != "payer" else {
                "PAYTOKEN_SIM_SCANNER": str(folder / "scanner"), "PAYTOKEN_SIM_BUTTONS": str(folder / "buttons")}
            device = demo.Device(name, FIRMWARE_BUILD, "512K", dict(
                env, PAYTOKEN_RADIO_NAME=name, PAYTOKEN_SIM_FLASH=str(folder / f"{name}.img"), **extra))
            self.stations[name] = Station(device)
        for name in PAYEES:
            self.qr[name] = self.stations[name].next(("qr",))[1]
        self.stations["payer"].next(("ready",))
        self.result_up = False

    def press(self, button: str) -> None:
        with open(self.folder / "buttons", "a") as f:
            f.write(button + "\n")

    def scan(self, payee: str) -> None:
        """The terminal's QR, read off its display (its last frame saved as PNG), held to the card's scanner."""
        text = demo.read_qr(self.folder / f"{payee}.png")
        shown = wire.decode_qr(base45.decode(text)).nonce.hex()
        if shown != self.qr[payee]["nonce"]:
            raise RigError(f"{payee}: the QR on the screen ({text!r}, nonce {shown}) is not the one announced "
                           f"({self.qr[payee]})")
        with open(self.folder / "scanner", "a") as f:
            f.write(text + "\n")

    def pay(self, payee: str, rule: dict[str, Any] | None = None,
            on_ask: Callable[[Rig, int], None] | None = None) -> Outcome:
        """One payment attempt to `payee`: drop_at(**rule) armed for its link, on_ask(rig, link) when the card asks
        to confirm (default: press CONFIRM). Returns once the card shows its result and the link is down (the
        terminal's end event too, if the link reached it)."""
        out = Outcome(rule=rule)
        payer, terminal = self.stations["payer"], self.stations[payee]
        if self.qr[payee] is None:  # its last session ended: a new QR follows its result screen
            self.qr[payee] = terminal.next(("qr",))[1]
        marks = {"payer": payer.read, payee: terminal.read}
        links_before = {x["link"] for x in self.radio.links(all=True)}
        try:
            if rule is not None:
                self.radio.drop_at(**rule)
            self.scan(payee)
            self._ready()
            payer.next(("scanned",))
            name, _ = payer.next(("ask", *ENDS["payer"]))
            link = self._link(links_before)
            if name == "ask":
                (on_ask or (lambda rig, link: rig.press("confirm")))(self, link)
                payer.next(ENDS["payer"])
            payer.screen(payer.read - 1)  # the result is on the screen (dismissed by the next payment)
            self.result_up = True
            if link is not None:
                self.radio.wait_for(lambda: not self.radio.stats(link)["up"], timeout=WAIT_S)
                out.link, out.trace = self.radio.stats(link), self.radio.trace(link)
                if self._served(out.trace):  # the terminal took the payer: it ends the session, then a new QR
                    terminal.next(ENDS["payee"])
                    self.qr[payee] = None
        except RigError as exc:
            out.error = str(exc)
        finally:
            self.radio.reset()
            out.events = {"payer": payer.since(marks["payer"]), payee: terminal.since(marks[payee])}
            out.marks = marks
        return out

    def _ready(self) -> None:
        # The card's result screen gives way to its ready screen at a button (or after its RESULT_MS); at the ready
        # screen it triggers the scanner, which reads what is held in front of it then.
        payer = self.stations["payer"]
        if self.result_up and "ready" not in [n for n, _ in payer.pending()]:
            self.press("down")
        self.result_up = False

    def settle(self, outcomes: list[Outcome]) -> None:
        """Waits for every terminal's next QR (all screens are in), then fills in each outcome's result screens:
        what each device showed after its end event."""
        for name in PAYEES:
            if self.qr[name] is None:
                self.qr[name] = self.stations[name].next(("qr",))[1]
        self._ready()
        self.stations["payer"].next(("ready",))
        for out in outcomes:
            for device, events in out.events.items():
                ends = [i for i, (name, _) in enumerate(events) if name in ENDS["payer" if device == "payer"
                                                                                  else "payee"]]
                if ends:
                    out.screen[device] = self.stations[device].screen_after(out.marks[device] + ends[-1])

    def _link(self, before: set[int]) -> int | None:
        new = [x["link"] for x in self.radio.links(all=True) if x["link"] not in before]
        return new[-1] if new else None

    @staticmethod
    def _served(trace: list[dict[str, Any]]) -> bool:
        # the terminal accepts a payer at its OPEN (its 2nd write request, after the subscription): a link that
        # dropped before OPEN arrived is no session for the terminal
        return sum(1 for t in trace if t["dir"] == "c2p" and t["att"] == att.WRITE_REQ) >= 2

    def stop(self) -> dict[str, list[str]]:
        logs = {}
        for name, station in self.stations.items():
            station.device.stop()
            logs[name] = station.device.lines
        return logs
