"""The sealed sync over BLE end to end: a payer card and a payee terminal that paid each other offline
(demo.pay: main.py in MicroPython processes on the virtual radio at a 30 ms connection interval, their flash images
kept), started again with those images; a long press of CONFIRM puts a device in sync mode (paytoken.app.syncble),
and a relay on the host (paytoken_host.sync_ble.BleDeviceLink over the simulated radio's bleak backend) carries its
sealed exchanges to a real `paytoken-backend serve` on SQLite. Both orders settle in both ledgers; a hostile relay, a
dropped link and malformed frames change nothing, and a retry completes."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

from paytoken import framing, wire
from paytoken.ble import gatt, syncgatt
from paytoken.link import LinkError
from paytoken_host import demo, simdevice
from paytoken_host.hostpayer import BleakLink, Radio
from paytoken_host.simradio.broker import BrokerThread, RadioConfig
from paytoken_host.sync_ble import BleDeviceLink, DeviceRefused, LinkLost
from tests.backend_rig import Database, free_port, init_cli, start_server, stop_server
from tests.harness.mp import FIRMWARE_BUILD
from tests.sync_rig import make_backend

AMOUNT = 2_500
HEAP = "512K"


def relay(link: BleDeviceLink, url: str,
          tamper: Callable[[bytes, bytes], bytes | None] | None = None) -> int:
    """The bridge's relay loop (sync_bridge.relay once the serial branch is merged): each message 1 POSTed to the
    backend, its message 2 pushed back, until the device has nothing more to say. Exchanges completed."""
    if tamper is None:
        try:
            from paytoken_host.sync_bridge import relay as bridge_relay  # type: ignore[import-not-found]
        except ImportError:
            bridge_relay = None
        if bridge_relay is not None:
            return bridge_relay(link, url)
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
                assert not e.final, str(e)
            n += 1
    return n


@dataclass
class Paid:
    dir: Path
    key: str
    payer_id: bytes
    payee_id: bytes


@pytest.fixture(scope="module")
def paid(tmp_path_factory) -> Paid:
    """One offline payment of AMOUNT between a payer and a payee registered with a backend (its database and key file
    made by the operator's CLI); the devices' flash images and the database as they were after it."""
    d = tmp_path_factory.mktemp("paid")
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

    result = demo.pay(d / "run", FIRMWARE_BUILD, AMOUNT, 100_000, 30, {"payer": HEAP, "payee": HEAP},
                      screens=False, provision=provision)
    assert result.paid["amount"] == str(AMOUNT)
    backend.engine.dispose()
    return Paid(d, key, ids["payer"], ids["payee"])


@dataclass
class Rig:
    paid: Paid
    dir: Path
    url: str
    radio: str
    devices: dict[str, demo.Device] = field(default_factory=dict)
    timeline: demo.Timeline = field(default_factory=demo.Timeline)

    def start(self, name: str) -> demo.Device:
        (self.dir / f"{name}.buttons").write_text("")
        env = {"PAYTOKEN_RADIO": self.radio, "PAYTOKEN_SIM_FLASH": str(self.dir / f"{name}.img"),
               "PAYTOKEN_SIM_BUTTONS": str(self.dir / f"{name}.buttons")}
        if name == "payer":
            (self.dir / "scanner").write_text("")
            env["PAYTOKEN_SIM_SCANNER"] = str(self.dir / "scanner")
        dev = demo.Device(name, FIRMWARE_BUILD, HEAP, env, timeline=self.timeline, screens=False)
        self.devices[name] = dev
        dev.until("ready" if name == "payer" else "qr", _quiet)
        return dev

    def sync_mode(self, name: str) -> dict:
        """Holds CONFIRM on the device: it advertises the sync service."""
        dev = self.devices.get(name) or self.start(name)
        with open(self.dir / f"{name}.buttons", "a") as f:
            f.write("confirm long\n")
        return dev.until("sync_ble_ready", _quiet)

    def link(self, name: str) -> BleDeviceLink:
        return BleDeviceLink(name, backend="sim", radio=self.radio)

    def sync(self, name: str) -> tuple[dict, list[str]]:
        """Sync mode, one honest relay: the device's end event and the statuses it reports over BLE."""
        self.sync_mode(name)
        with self.link(name) as link:
            relay(link, self.url)
            statuses = [row[3] for row in link.status()[1]]
        return self.devices[name].until("sync_ble_end", _quiet), statuses


def _quiet(name: str, item: tuple[str, object]) -> None:
    pass


@pytest.fixture
def rig(paid: Paid, tmp_path: Path) -> Iterator[Rig]:
    for f in ("payer.img", "payee.img"):
        shutil.copyfile(paid.dir / "run" / f, tmp_path / f)
    shutil.copyfile(paid.dir / "backend.db", tmp_path / "backend.db")
    port = free_port()
    server = start_server(f"sqlite:///{tmp_path}/backend.db", paid.key, port, workers=1)
    try:
        with BrokerThread(config=RadioConfig(interval_ms=30)) as radio:
            r = Rig(paid, tmp_path, f"http://127.0.0.1:{port}", radio.address)
            try:
                yield r
            finally:
                for name, d in r.devices.items():
                    d.stop()
                    print(f"--- {name}", *d.lines[-30:], sep="\n")  # shown when the test failed
    finally:
        stop_server(server)


@pytest.mark.parametrize("first", ["payer", "payee"])
def test_either_order_settles_in_both_ledgers_over_ble(rig, first):
    second = "payee" if first == "payer" else "payer"
    end, statuses = rig.sync(first)
    assert end["done"] == "1" and statuses == ["settled"] and end["statuses"] == "settled_1"
    end, statuses = rig.sync(second)
    assert end["done"] == "1" and statuses == ["settled"] and end["statuses"] == "settled_1"
    # back to its app: the payer scans again, the payee shows a new QR
    rig.devices["payer"].until("ready", _quiet)
    rig.devices["payee"].until("qr", _quiet)


def flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes((data[i] ^ 1,)) + data[i + 1:]


def test_a_hostile_relay_over_ble_changes_nothing(rig):
    rig.sync_mode("payer")
    with rig.link("payer") as link, httpx.Client(base_url=rig.url, timeout=30) as http:
        before = link.status()[1]
        assert [row[3] for row in before] == ["pending"]
        m1 = link.pull()
        assert m1 is not None
        # altered, truncated or empty message 1: the backend opens nothing, answers 400 in clear
        for bad in (flip(m1, 40), m1[:-1], m1[:31]):
            assert http.post("/v1/sync", content=bad).status_code == 400
        # altered, truncated, extended or duplicated message 2: the device refuses it (not final), applies nothing
        m2 = http.post("/v1/sync", content=m1).content
        for bad in (flip(m2, 0), flip(m2, len(m2) - 1), m2[:-1], m2 + b"\0"):
            assert link.pull() is not None
            with pytest.raises(DeviceRefused, match="answer refused") as e:
                link.push(bad)
            assert not e.value.final
        with pytest.raises(DeviceRefused, match="no request is waiting"):
            link.push(m2)  # the last pull's exchange was used up by the bad answer
        assert link.status()[1] == before
        # an old message 2 in a new exchange does not open; a duplicated push of a good one is refused the second time
        m1 = link.pull()
        assert m1 is not None
        with pytest.raises(DeviceRefused, match="answer refused"):
            link.push(m2)
        m1 = link.pull()
        assert m1 is not None
        good = http.post("/v1/sync", content=m1).content
        http.post("/v1/sync", content=m1)  # message 1 relayed twice: the upload is idempotent
        assert link.push(good) >= 1
        with pytest.raises(DeviceRefused, match="no request is waiting"):
            link.push(good)
        # then honestly to the end
        relay(link, rig.url)
        assert [row[3] for row in link.status()[1]] == ["settled"]
    assert rig.devices["payer"].until("sync_ble_end", _quiet)["done"] == "1"
    end, statuses = rig.sync("payee")
    assert end["done"] == "1" and statuses == ["settled"]


def test_a_dropped_link_loses_nothing_and_a_retry_completes(rig):
    rig.sync_mode("payee")
    # dropped after the device's message 1 left, before the backend saw it
    link = rig.link("payee")
    assert link.pull() is not None
    link.close()
    # dropped after the backend stored the upload: the answer never reaches the device
    link = rig.link("payee")
    m1 = link.pull()
    assert m1 is not None and httpx.post(f"{rig.url}/v1/sync", content=m1, timeout=30).status_code == 200
    link.close()
    left = rig.devices["payee"].until("sync_ble_left", _quiet)
    assert left["finished"] == "0"
    # the same device, still in sync mode, with a new relay: everything arrives, once
    with rig.link("payee") as link:
        assert [row[3] for row in link.status()[1]] == ["pending"]
        relay(link, rig.url)
        assert [row[3] for row in link.status()[1]] == ["settled"]
    assert rig.devices["payee"].until("sync_ble_end", _quiet)["done"] == "1"
    end, statuses = rig.sync("payer")
    assert end["done"] == "1" and statuses == ["settled"]


async def raw_session(radio: str, frames: list[bytes]) -> str:
    """Opens the sync service as a relay would and writes these frames as they are; what came of it: "dropped" when
    the device disconnected, else its answer's first byte in hex."""
    r = Radio("sim", radio)
    from bleak import BleakScanner

    device = await BleakScanner.find_device_by_filter(lambda d, ad: ad.local_name == "payer", timeout=10,
                                                      service_uuids=[syncgatt.SERVICE_UUID], **r.scanner_kwargs())
    assert device is not None
    link = await BleakLink.open(device, r, asyncio.get_running_loop().time() + 10, syncgatt.UUIDS, "device")
    try:
        for f in frames:
            await link.client.write_gatt_char(link.write_char, f, response=True)
        msg = await link.recv(10)
        return msg[:1].hex()
    except LinkError:
        return "dropped"
    finally:
        await link.close()


def test_malformed_frames_on_the_sync_characteristic_are_refused_cleanly(rig):
    rig.sync_mode("payer")
    cases = {
        "reserved bit": [b"\x40\x00\x00\x01\x01"],
        "control frame after READY": [gatt.OPEN_FRAME],
        "longer than the device takes": [b"\x00\x00\x20\x00" + bytes(16)],
        "no first frame": [b"\x80\x01\x01"],
        "short first frame": [b"\x80\x00\x00\x05\x01"],
    }
    for what, frames in cases.items():
        assert asyncio.run(raw_session(rig.radio, frames)) == "dropped", what
        assert rig.devices["payer"].until("sync_ble_left", _quiet)["why"] == "frame", what
    # well framed, but not a request: answered with an error, the link stays up
    bad_requests = [framing.split(b"\x09", 20, 0)[0], framing.split(bytes((syncgatt.PUSH,)), 20, 0)[0]]
    for frame in bad_requests:
        assert asyncio.run(raw_session(rig.radio, [frame])) == "ff"
    # the device is still in sync mode, nothing changed; a good relay completes
    with rig.link("payer") as link:
        assert [row[3] for row in link.status()[1]] == ["pending"]
        relay(link, rig.url)
    assert rig.devices["payer"].until("sync_ble_end", _quiet)["done"] == "1"
    with pytest.raises(LinkLost, match="no device 'payer' in sync mode"):
        BleDeviceLink("payer", backend="sim", radio=rig.radio, timeout=1)
