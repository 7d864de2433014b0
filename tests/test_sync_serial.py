"""Sync over USB serial (issue 9): devices that paid each other offline sync through host/sync_bridge.py on their
USB serial pseudo-terminals while their apps run (tests/serial_sync_rig.py); a real backend settles the payment.
Both orders end "settled" in both devices' own ledgers (their "synced" event lines, from their wallets); the same
records relayed twice through two bridges settle once; --stay brings the second device its status without another
run; a hostile relay changes nothing; bad input gets a clear error and its exit code."""

from __future__ import annotations

import random
import subprocess
import sys
import time

import pytest
from sqlalchemy import text

from paytoken.usb import frames
from paytoken_host import sync_bridge_core as core
from tests.serial_sync_rig import Paid, Rig, paid


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Paid:
    return paid(tmp_path_factory.mktemp("paid"))


@pytest.fixture
def rig(template, tmp_path):
    r = Rig(template, tmp_path)
    r.serve()
    yield r
    r.close()


def settled_rows(rig: Rig) -> list[tuple]:
    from paytoken_host.backend import db

    engine = db.make_engine(rig.db_url)
    try:
        with engine.connect() as conn:
            return list(conn.execute(text("SELECT txid, state FROM payments")))
    finally:
        engine.dispose()


@pytest.mark.parametrize("order", [("payer", "payee"), ("payee", "payer")])
def test_both_orders_settle_in_both_ledgers(rig, order):
    for name in order:
        rig.start(name)
    first, second = order
    p = rig.bridge(first)
    assert p.returncode == 0, p.stderr
    assert "exchange 1:" in p.stderr and "done:" in p.stderr
    ev = rig.until(first, "synced")
    assert ev["statuses"] == "settled_1"  # the payer has the receipt: its upload alone settles; the payee's too
    p = rig.bridge(second)
    assert p.returncode == 0, p.stderr
    assert rig.until(second, "synced")["statuses"] == "settled_1"
    assert [r[1] for r in settled_rows(rig)] == ["settled"]


def test_relayed_twice_through_two_bridges_settles_once(rig):
    rig.start("payer")
    a = rig.bridge("payer")
    assert a.returncode == 0, a.stderr
    first = rig.until("payer", "synced")
    b = rig.bridge("payer")  # a second bridge: the device has already had its answers; nothing changes
    assert b.returncode == 0, b.stderr
    again = rig.until("payer", "synced")
    assert first["statuses"] == again["statuses"] == "settled_1" and first["balance"] == again["balance"]
    assert again["applied"] == first["applied"]  # the handler's running count did not grow: nothing new applied
    assert len(settled_rows(rig)) == 1


def test_stay_brings_the_second_device_its_status(rig):
    # Both devices online, the payer's --stay bridge waiting on the backend's long-poll after its sync. They pay
    # again; the payee's upload (a one-shot bridge) settles that payment, and the payer's bridge, woken, brings the
    # payer its status without another run. A load the treasury issues meanwhile reaches it the same way.
    rig.start("payee")
    rig.start("payer")
    stay = rig.bridge_bg("payer", "--stay", "--wait", "5")
    try:
        first = rig.until("payer", "synced")
        assert first["statuses"] == "settled_1" and first["balance"] == "90000"
        rig.pay()
        p = rig.bridge("payee")
        assert p.returncode == 0, p.stderr
        assert rig.until("payee", "synced")["statuses"] == "settled_2"
        woken = rig.until("payer", "synced", 60)  # no other run: the long-poll woke the payer's bridge
        assert woken["statuses"] == "settled_2" and woken["balance"] == "80000"
        rig.template.voucher(rig.db_url, rig.template.payer_id, 5_000)
        assert rig.until("payer", "synced", 60)["balance"] == "85000"
    finally:
        stay.terminate()
        _, err = stay.communicate(timeout=30)
    assert err.count("news from the backend") >= 2


class Hostile:
    """A DeviceLink between the relay and the real serial link that drops, reorders, duplicates, truncates or
    alters the messages it carries."""

    def __init__(self, link: core.SerialDeviceLink, seed: int):
        self.link, self.name, self.rnd = link, "hostile", random.Random(seed)
        self.old: list[bytes] = []
        self.summary = None
        self.tampered = self.duplicated = 0

    def pull(self) -> bytes | None:
        m = self.link.pull()
        if m is not None and (not self.tampered or self.rnd.random() < 0.5):
            self.tampered += 1
            return self._damage(m)
        return m

    def push(self, msg2: bytes) -> int:
        self.old.append(msg2)
        if len(self.old) == 2:  # dropped: the device never gets it; the relay asks again
            self.tampered += 1
            raise core.AnswerRefused("dropped on the way")
        if len(self.old) == 1 or self.rnd.random() < 0.3:  # a bad answer first: the device refuses it and
            bad = self._damage(msg2) if self.rnd.random() < 0.7 else self.old[0]  # the exchange is lost (pull again)
            self.tampered += 1
            try:
                self.link.push(bad)
            except core.AnswerRefused:
                pass
            except core.DeviceError as e:
                assert e.status in (frames.E_STATE, frames.E_REFUSED), e
        n = self.link.push(msg2)
        if not self.duplicated or self.rnd.random() < 0.5:  # duplicated: the same answer, nothing applied twice
            self.duplicated += 1
            assert self.link.push(msg2) == n
        self.summary = self.link.summary
        return n

    def _damage(self, m: bytes) -> bytes:
        k = self.rnd.randrange(3)
        if k == 0:
            return m[: self.rnd.randrange(1, len(m))]
        b = bytearray(m)
        b[self.rnd.randrange(len(b))] ^= 1 << self.rnd.randrange(8)
        return bytes(b) if k == 1 else bytes(b) + b"x"

    def wake_hint(self):
        return self.link.wake_hint()

    def close(self) -> None:
        self.link.close()


def test_hostile_relay_changes_nothing(rig):
    rig.start("payer")
    rig.start("payee")
    for name, seed in (("payer", 1), ("payee", 2)):
        link = Hostile(core.SerialDeviceLink(rig.usb[name].port, timeout=20), seed)
        try:
            r = core.relay(link, rig.url)
        finally:
            link.close()
        assert r.syncs == 1 and link.tampered > 0 and link.duplicated > 0
        assert rig.until(name, "synced")["statuses"] == "settled_1"
    assert [r[1] for r in settled_rows(rig)] == ["settled"]
    assert rig.until("payer", "usb", 10)  # the apps still run


def test_bad_input(rig, tmp_path):
    # wrong port
    p = subprocess.run(core_cli("--port", str(tmp_path / "nope"), "--backend", rig.url), capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == core.EXIT_CODES["port"] and "No such file" in p.stderr
    # no device behind the port: it never answers
    usb = rig.usb.setdefault("ghost", __import__("paytoken_host.simusb", fromlist=["UsbBridge"]).UsbBridge())
    p = subprocess.run(core_cli("--port", usb.port, "--backend", rig.url, "--timeout", "1"), capture_output=True,
                       text=True, timeout=60)
    assert p.returncode == core.EXIT_CODES["no_answer"] and "did not answer" in p.stderr
    # a malformed frame: the device answers "bad frame" and goes on serving
    rig.start("payer")
    link = core.SerialDeviceLink(rig.usb["payer"].port, timeout=5)
    try:
        link.link.ser.write(b"PT\x01\x10\x00\x00garbage!")
        got = frames.read_frame(link.link, 5000, 5000)
        assert got is not None and got[0] == frames.T_BAD_FRAME and got[1][0] == frames.E_FRAME
        with pytest.raises(core.DeviceError) as e:
            link.push(b"not a message 2")
        assert e.value.status == frames.E_STATE  # no pull first
    finally:
        link.close()
    # backend down: retries, then a clear error; the device loses nothing (a later sync settles)
    from tests.backend_rig import stop_server

    stop_server(rig.server)
    rig.server = None
    p = subprocess.run(core_cli("--port", rig.usb["payer"].port, "--backend", rig.url, "--retries", "2"),
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == core.EXIT_CODES["backend"], p.stderr
    assert "retry 2/2" in p.stderr and "after 3 tries" in p.stderr
    time.sleep(2)  # the device's watcher ends its idle serving before the next bridge starts
    rig.serve()
    p = rig.bridge("payer")
    assert p.returncode == 0, p.stderr
    assert rig.until("payer", "synced")["statuses"] == "settled_1"


def core_cli(*args: str) -> list[str]:
    from tests.serial_sync_rig import BRIDGE

    return BRIDGE + list(args)


def test_busy_answer_and_unloading(mp):
    # The watcher's BUSY frame is the codec's own response; while the app pays, a request gets it and nothing is
    # imported; when idle, a request is served and every module the serving loaded is gone again.
    assert frames.decode(mp.eval("__import__('paytoken.app.usbwatch').app.usbwatch.busy_frame(0x10)")) == \
        frames.decode(frames.response(frames.T_SYNC_PULL, frames.E_BUSY, b"busy: paying"))
    mp.exec(
        "import sys, asyncio\n"
        "from paytoken.app import usbwatch\n"
        "class _P:\n"
        "    def __init__(self, data): self.data = bytearray(data); self.out = bytearray()\n"
        "    def read(self, n, ms):\n"
        "        b = bytes(self.data[:n]); self.data = self.data[n:]; return b\n"
        "    def write(self, d): self.out += d\n"
        "class _A: busy = True\n"
        "class _S:\n"
        "    state = None\n"
        "    def show(self, *s): self.state = s\n"
        f"_p = _P({frames.encode(frames.T_SYNC_STATUS)!r})\n"
        "_w = usbwatch.UsbWatch(_p, _A(), None, None, _S(), lambda *a: None)\n"
        "_b = set(sys.modules)\n"
        "_w._busy(_p.read(64, 0))\n"
        "_busy_loaded = sorted(set(sys.modules) - _b)\n"
    )
    assert mp.eval("_busy_loaded") == []
    assert frames.decode(mp.eval("bytes(_p.out)"))[1][0] == frames.E_BUSY
    mp.exec(  # idle: an unknown-type request is served by the USB service, which is unloaded afterwards
        "_A.busy = False\n"
        f"_p = _P({frames.encode(0x1f)!r})\n"
        "_w.port = _p\n"
        "_b = set(sys.modules)\n"
        "asyncio.run(_w._serve(_p.read(64, 0)))\n"
        "_left = sorted(set(sys.modules) - _b)\n"
    )
    t, body = frames.decode(mp.eval("bytes(_p.out)"))
    assert t == 0x1f | frames.RESPONSE and body[0] == frames.E_UNKNOWN
    assert mp.eval("_left") == []


def test_ble_without_its_transport_is_a_usage_error(monkeypatch, capsys):
    # an installation without paytoken_host.sync_ble (None in sys.modules makes its import fail)
    from paytoken_host import sync_bridge_cli

    monkeypatch.setitem(sys.modules, "paytoken_host.sync_ble", None)
    assert sync_bridge_cli.main(["--ble", "till-1", "--backend", "http://127.0.0.1:9"]) == core.EXIT_CODES["usage"]
    assert "no BLE sync transport" in capsys.readouterr().err


def test_a_terminal_online_syncs_itself_between_sales(rig):
    # Wi-Fi (the simulator's online switch) and "sync_every_s" in its config: the running terminal syncs by itself,
    # its upload settles the payment, and it goes back to its QR; nothing of sync stays loaded
    from paytoken_host.simdevice import run_firmware

    image = rig.dir / "pay" / "payee.img"
    src = ("import json\nimport board\nfrom paytoken import store\n"
           f"r = board.storage({str(image)!r}, '/flash')\n"
           "c = json.loads(store.read(r, 'config.json'))\nc['sync_every_s'] = 1\n"
           "store.write(r, 'config.json', json.dumps(c).encode())\nprint(store.load(r).config)\n"
           "board.unmount('/flash')\n")
    proc = run_firmware(src)
    assert proc.returncode == 0 and "'sync_every_s': 1" in proc.stdout, proc.stdout + proc.stderr
    rig.start("payee", PAYTOKEN_SIM_ONLINE=rig.url)
    synced = rig.until("payee", "synced")
    assert synced["applied"] == "2"  # its acknowledgement and the payment's status
    status = rig.until("payee", "status")
    assert status["status"] == "settled" and status["amount"] == "10000"
    assert [state for _, state in settled_rows(rig)] == ["settled"]
    rig.until("payee", "synced")  # again a second later: nothing new, nothing applied twice
    assert [state for _, state in settled_rows(rig)] == ["settled"]
