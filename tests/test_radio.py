"""The simulated radio: MicroPython devices (boards/unix_sim/lib/bluetooth.py) joined by the broker
(paytoken_host.simradio) behave as ESP32s running MicroPython's NimBLE `bluetooth` would.

Each device is a real `micropython` process running a scenario (tests/harness/radio.py); the broker runs in
this process (BrokerThread) and is the test's control API. docs/simulator.md, "Radio", has the model.
"""

from __future__ import annotations

import ast
import asyncio
import errno
import json
import socket
import subprocess
import sys
from collections.abc import Iterator

import pytest

from paytoken_host.simradio import BrokerThread, RadioClient
from paytoken_host.simradio.att import AttError, Uuid
from tests.harness.mp import ROOT, run_script
from tests.harness.radio import DeviceProcess
from tests.test_esp32_api import stub_file

ENOMEM, EINVAL, ENOTCONN, EALREADY, ENODEV, EBUSY = 12, 22, 107, 114, 19, 16  # unix port errno values
NUS = "6e400001-b5a3-f393-e0a9-e50e24dcca9e"


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerThread]:
    with BrokerThread(seed=7) as radio:
        yield radio


@pytest.fixture
def radio(broker: BrokerThread) -> Iterator[BrokerThread]:
    broker.reset()
    yield broker
    for link in broker.links():
        broker.drop(link["link"])
    broker.reset()


def device(radio: BrokerThread, body: str, name: str, heapsize: str = "256K", **env: str) -> DeviceProcess:
    return DeviceProcess(radio.address, body, name, heapsize, env)


def wait_advertising(radio: BrokerThread, name: str) -> None:
    radio.wait_for(lambda: [d for d in radio.devices() if d["name"] == name and d["advertising"]])


def results(*devices: DeviceProcess) -> list[dict]:
    try:
        return [d.result() for d in devices]
    finally:
        for d in devices:
            d.kill()


# --------------------------------------------------------------------------- the API matches ESP32's


def esp32_stub() -> tuple[dict[str, int], set[str], set[str]]:
    """(module constants with values, other public module names, public BLE methods) from the ESP32 stub."""
    path = stub_file("bluetooth")
    assert path is not None
    consts: dict[str, int] = {}
    names: set[str] = set()
    methods: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if not node.target.id.startswith("_"):
                assert isinstance(node.value, ast.Constant)
                consts[node.target.id] = node.value.value
        elif isinstance(node, ast.ClassDef):
            names.add(node.name)
            if node.name == "BLE":
                methods = {f.name for f in node.body if isinstance(f, ast.FunctionDef) and not f.name.startswith("_")}
    return consts, names, methods


def test_public_names_match_the_esp32_stub():
    consts, names, methods = esp32_stub()
    assert {"FLAG_READ", "FLAG_NOTIFY"} <= set(consts) and {"BLE", "UUID"} <= names and "gattc_write" in methods
    proc = run_script(
        "import bluetooth, json\n"
        "m = {n: getattr(bluetooth, n) for n in dir(bluetooth) if not n.startswith('_')}\n"
        "print(json.dumps({'consts': {n: v for n, v in m.items() if isinstance(v, int)},"
        " 'names': [n for n, v in m.items() if not isinstance(v, int)],"
        " 'methods': [n for n in dir(bluetooth.BLE) if not n.startswith('_')]}))"
    )
    assert proc.returncode == 0, proc.stderr
    sim = json.loads(proc.stdout)
    assert sim["consts"] == consts  # every constant, with the ESP32 value, and no other
    assert set(sim["names"]) == names
    assert set(sim["methods"]) == methods  # l2cap_* and hci_cmd absent, as in the ESP32 build
    # keyword-only parameters (the only ones a caller can name) are spelt as on the ESP32
    tree = ast.parse((ROOT / "boards/unix_sim/lib/bluetooth.py").read_text())
    ble = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "BLE")
    advertise = next(f for f in ble.body if isinstance(f, ast.FunctionDef) and f.name == "gap_advertise")
    assert [a.arg for a in advertise.args.kwonlyargs] == ["resp_data", "connectable"]


# --------------------------------------------------------------------------- one device: API, errors, limits


def test_uuid_config_and_errors_as_on_esp32(radio: BrokerThread):
    r = device(radio, r"""
U = bluetooth.UUID
r = {}
r["reprs"] = [repr(U(0x180D)), repr(U("6E400001-B5A3-F393-E0A9-E50E24DCCA9E")), repr(U(b"\x01\x02\x03\x04"))]
r["le"] = hx(U(0x180D))
r["eq"] = [U(0x180D) == U(b"\x0d\x18"), U(0x180D) == U(0x180E), U(0x2A37) == b"\x37\x2a",
           hash(U(0x180D)) == hash(U(0x180D)), U(U(0x2A37)) == U(0x2A37)]
bad = []
for v in (0x10000, "zzz", "6E400001-B5A3-F393-E0A9-E50E24DCCA9", "6E400001-B5A3-F393-E0A9-E50E24DCCA9E0"):
    try:
        U(v)
    except ValueError as e:
        bad.append(str(e))
r["bad"] = bad
r["inactive"] = [oserr(ble.config, "mac"), oserr(ble.config, mtu=100), oserr(ble.gap_advertise, 100000),
                 ble.config("gap_name").decode(), ble.active()]
ble.irq(rec)
r["active"] = ble.active(True)
r["secret_irqs"] = events()
r["mtu_default"] = ble.config("mtu")
r["mtu_errors"] = [oserr(ble.config, mtu=10), oserr(ble.config, mtu=600), oserr(ble.config, mtu=22),
                   oserr(ble.config, mtu=528)]
ble.config(mtu=527)
ble.config(mtu=23)
r["mtu_set"] = ble.config("mtu")
try:
    ble.config("rxbuf")
except ValueError as e:
    r["rxbuf"] = str(e)
at, mac = ble.config("mac")
r["mac"] = [at, hx(mac)]
ble.config(addr_mode=1)
at, rnd = ble.config("mac")
r["random"] = [at, rnd[0] >> 6]
ble.config(addr_mode=0)
r["name_too_long"] = oserr(ble.config, gap_name=b"x" * 32)
r["adv_errors"] = [oserr(ble.gap_advertise, 100000, b"x" * 32), oserr(ble.gap_advertise, 10000)]
HANDLES = ble.gatts_register_services(((SVC, (TX, (RX[0], RX[1], ((U(0x2901), bluetooth.FLAG_READ),)))),))
r["handles"] = HANDLES
r["db"] = [oserr(ble.gatts_write, 999, b"x"), ble.gatts_read(999), ble.gatts_write(12, b"abc"),
           ble.gatts_read(12).decode(), oserr(ble.gatts_set_buffer, 999, 10)]
ble.gap_advertise(100000, adv(b"one"))
r["busy"] = oserr(ble.gatts_register_services, ((SVC, (TX,)),))
r["no_conn"] = [oserr(ble.gattc_write, 0, 12, b"x"), oserr(ble.gattc_exchange_mtu, 3),
                oserr(ble.gatts_notify, 0, 12, b"x"), oserr(ble.gattc_read, 0, 12), ble.gap_disconnect(3),
                oserr(ble.gap_connect, None)]
r["l2cap"] = hasattr(ble, "l2cap_listen") or hasattr(ble, "hci_cmd")
r["pair"] = oserr(ble.gap_pair, 0)
ble.active(False)
r["off"] = ble.active()
result(**r)
""", "api").result()
    assert r["reprs"] == ["UUID(0x180d)", "UUID('6e400001-b5a3-f393-e0a9-e50e24dcca9e')", "UUID(0x04030201)"]
    assert r["le"] == "0d18"  # bytes(uuid) is little-endian, as on the ESP32
    assert r["eq"] == [True, False, False, True, True]
    # as in C, a str of 2, 4 or 16 characters is taken as the raw bytes, so "zz" would be a valid 16-bit UUID
    assert r["bad"] == ["invalid UUID", "invalid char in UUID", "UUID too short", "UUID too long"]
    assert r["inactive"] == [ENODEV, ENODEV, ENODEV, "MPY ESP32", False]
    assert r["active"] is True
    assert r["secret_irqs"] == [29, 30]  # NimBLE asks the app for its IRK at start-up: GET_SECRET, SET_SECRET
    assert r["mtu_default"] == 256  # CONFIG_BT_NIMBLE_ATT_PREFERRED_MTU
    # NimBLE's ble_att_set_preferred_mtu refuses outside 23..527; MicroPython raises OSError(EINVAL)
    assert r["mtu_errors"] == [EINVAL] * 4 and r["mtu_set"] == 23
    assert r["rxbuf"] == "unknown config param"  # no rxbuf with synchronous events (ESP32)
    assert r["mac"][0] == 0 and len(r["mac"][1]) == 12
    assert r["random"] == [1, 0b11]  # a static random address
    assert r["name_too_long"] == EINVAL
    assert r["adv_errors"] == [EINVAL, -530]  # 32 bytes of adv data; 10 ms is below the 20 ms minimum (HCI)
    assert r["handles"] == [[12, 15, 16]]  # value handles and descriptors; the CCCD (13) is not listed
    assert r["db"] == [EINVAL, "", 3, "abc", EINVAL]
    assert r["busy"] == EBUSY  # services are registered while not advertising
    assert r["no_conn"] == [ENOTCONN, ENOTCONN, ENOTCONN, ENOTCONN, False, EALREADY]
    assert r["l2cap"] is False
    assert r["pair"] == errno.EOPNOTSUPP
    assert r["off"] is False


def test_addresses_assigned_or_requested(radio: BrokerThread):
    async def holder() -> RadioClient:
        return await RadioClient(radio.address, name="holder", addr="02:aa:00:00:00:01").start()

    client = radio.call(holder())
    r = device(radio, r"""
ble.active(True)
mine = hx(ble.config("mac")[1])
ble.active(False)
import os
os.putenv("PAYTOKEN_RADIO_ADDR", "02:aa:00:00:00:01")  # the CPython device has it
try:
    ble.active(True)
    taken = None
except OSError as e:
    taken = [e.args[0], e.args[1]]
os.putenv("PAYTOKEN_RADIO", "127.0.0.1:1")
try:
    ble.active(True)
except OSError as e:
    nobroker = [e.args[0], e.args[1]]
result(mine=mine, taken=taken, nobroker=nobroker)
""", "wants", PAYTOKEN_RADIO_ADDR="02:AA:00:00:00:02").result()
    radio.call(client.close())
    assert client.addr.hex() == "02aa00000001"
    assert r["mine"] == "02aa00000002"
    assert r["taken"] == [ENODEV, "bluetooth sim: the radio broker refused: address 02:aa:00:00:00:01 is in use by "
                                  "another device"]
    assert r["nobroker"] == [ENODEV, "bluetooth sim: no radio broker at PAYTOKEN_RADIO=127.0.0.1:1"]
    assigned = [d["addr"] for d in radio.devices()]
    assert len(set(assigned)) == len(assigned)


# --------------------------------------------------------------------------- advertising and scanning


def test_advertising_and_active_scan(radio: BrokerThread):
    async def beacon() -> RadioClient:  # a CPython device advertising non-connectable
        client = await RadioClient(radio.address, name="beacon").start()
        await client.advertise(50_000, adv_data=b"\x02\x01\x06\x07\x09beacon", connectable=False)
        return client

    peripheral = device(radio, r"""
ble.active(True)
svc_data = bytes((17, 0x07)) + bytes(SVC)  # complete list of 128-bit service UUIDs
ble.gap_advertise(40000, adv(b"payee") + svc_data, resp_data=b"\x05\x09resp")
pump(900)
result(mac=hx(ble.config("mac")[1]))
""", "payee")
    wait_advertising(radio, "payee")
    radio.config(device="payee", rssi=-67)
    client = radio.call(beacon())
    central = device(radio, r"""
ble.irq(rec)
ble.active(True)
ble.gap_scan(500, 30000, 30000, True)
wait(lambda: got(6))
reports = [(d[0], hx(d[1]), d[2], d[3], hx(d[4])) for e, d in EV if e == 5]
result(reports=reports, events=events())
""", "central")
    (p, c) = results(peripheral, central)
    radio.call(client.close())
    mine = [r for r in c["reports"] if r[1] == p["mac"]]
    adv_ind = [r for r in mine if r[2] == 0]
    scan_rsp = [r for r in mine if r[2] == 4]
    assert len(adv_ind) >= 5  # every 40 ms (+ 0..10 ms advDelay) for 500 ms, continuous scanning
    assert {r[0] for r in mine} == {0} and {r[3] for r in mine} == {-67}
    data = bytes.fromhex(adv_ind[0][4])
    assert b"payee" in data and Uuid.parse(NUS).le in data
    assert scan_rsp and bytes.fromhex(scan_rsp[0][4]) == b"\x05\x09resp"
    beacons = [r for r in c["reports"] if b"beacon" in bytes.fromhex(r[4])]
    assert beacons and {r[2] for r in beacons} == {2}  # ADV_SCAN_IND: NimBLE's non-connectable mode
    assert c["events"][-1] == 6  # _IRQ_SCAN_DONE after the duration


# --------------------------------------------------------------------------- GATT: discovery, MTU, truncation

PERIPHERAL = r"""
APPEND = [0]
def irq(e, d):
    rec(e, d)
    if e == 3:
        if d[1] == RXH and APPEND[0]:  # append mode: let two writes gather, then read twice
            APPEND[0] += 1
            if APPEND[0] == 3:
                WRITES.append(hx(ble.gatts_read(RXH)))
                WRITES.append(hx(ble.gatts_read(RXH)))
                APPEND[0] = 0
                ble.gatts_set_buffer(RXH, 20)
            return
        v = ble.gatts_read(d[1])
        WRITES.append(hx(v))
        if v == b"go":
            ble.gatts_notify(d[0], TXH, bytes(i & 255 for i in range(300)))  # cut to fit the MTU
        elif v == b"bye":
            ble.gap_disconnect(d[0])
        elif v == b"append":
            ble.gatts_set_buffer(RXH, 50, True)
            APPEND[0] = 1
        elif v[:3] == b"buf":
            ble.gatts_set_buffer(RXH, int(v[3:]))
WRITES = []
ble.irq(irq)
ble.active(True)
((TXH, RXH), (BIG,)) = ble.gatts_register_services(
    ((SVC, (TX, RX)), (bluetooth.UUID(0x180F), ((bluetooth.UUID(0x2A19), bluetooth.FLAG_WRITE),))))
ble.gatts_set_buffer(BIG, 200)
ble.gatts_write(TXH, bytes(range(60)))
ble.gap_advertise(30000, adv(b"payee"))
wait(lambda: got(2), 8000)
result(handles=[TXH, RXH, BIG], writes=WRITES, mtu=[d for e, d in EV if e == 21], events=events())
"""


def test_connect_discover_mtu_exchange_and_truncation(radio: BrokerThread):
    peripheral = device(radio, PERIPHERAL, "payee")
    wait_advertising(radio, "payee")
    central = device(radio, r"""
ble.irq(rec)
ble.active(True)
ble.config(mtu=185)
c = connect_to(b"payee")
ble.gattc_discover_services(c)
wait(lambda: got(10))
svcs = [(d[1], d[2], d[3]) for e, d in EV if e == 9]
s, e = [(a, b) for a, b, u in svcs if u == str(SVC)][0]
ble.gattc_discover_characteristics(c, s, e)
wait(lambda: got(12))
chars = [(d[1], d[2], d[3], d[4]) for e2, d in EV if e2 == 11]
tx = [v for end, v, p, u in chars if u == str(TX[0])][0]
rx = [v for end, v, p, u in chars if u == str(RX[0])][0]
ble.gattc_discover_descriptors(c, tx, [end for end, v, p, u in chars if v == tx][0])
wait(lambda: got(14))
dscs = [(d[1], d[2]) for e2, d in EV if e2 == 13]
ble.gattc_discover_services(c, bluetooth.UUID(0x180F))
wait(lambda: got(10, 2))
big_svc = data(9)
ble.gattc_discover_characteristics(c, big_svc[1], big_svc[2])
wait(lambda: got(12, 2))
big = data(11)[2]
ble.gattc_read(c, tx)
wait(lambda: got(16))
before = {"read": len(data(15)[2]), "read_done": data(16)}
ble.gattc_write(c, rx, b"go", 1)
wait(lambda: got(18))
before["notify"] = len(data(18)[2])
ble.gattc_write(c, big, bytes(40), 1)
wait(lambda: got(17, 2))
ble.gattc_exchange_mtu(c)
wait(lambda: got(21))
again = oserr(ble.gattc_exchange_mtu, c)
ble.gattc_write(c, rx, b"go", 1)
wait(lambda: got(18, 2))
ble.gattc_write(c, big, bytes(190), 1)
wait(lambda: got(17, 4))
ble.gattc_read(c, tx)
wait(lambda: got(16, 2))
after = {"notify": len(data(18)[2]), "notify_data": hx(data(18)[2]), "read": len(data(15)[2])}
ble.gattc_write(c, rx, b"bye", 1)
wait(lambda: got(8))
result(svcs=svcs, chars=chars, dscs=dscs, tx=tx, rx=rx, big=big, big_svc=big_svc[1:3], before=before,
       after=after, mtu=data(21), again=again, write_done=[d for e2, d in EV if e2 == 17], events=events())
""", "central")
    (p, c) = results(peripheral, central)
    assert [s[2] for s in c["svcs"]][:3] == ["UUID(0x1800)", "UUID(0x1801)", f"UUID('{NUS}')"]
    assert [c["tx"], c["rx"], c["big"]] == p["handles"]  # discovery finds the handles registration returned
    assert c["dscs"] == [[p["handles"][0] + 1, "UUID(0x2902)"]]  # NimBLE adds the CCCD of a notify char
    assert c["big_svc"][0] == c["svcs"][-1][0]
    # before the exchange the ATT MTU is 23 on both sides: reads return 22 bytes, notifications and writes 20
    assert c["before"] == {"read": 22, "read_done": [0, c["tx"], 0], "notify": 20}
    assert p["writes"][1] == "00" * 20
    # exchange: min(185, the peripheral's default 256), reported on both sides; a second one is refused
    assert c["mtu"] == [0, 185] and [d[1] for d in p["mtu"]] == [185]
    assert c["again"] == EALREADY
    assert c["after"]["notify"] == 182 and c["after"]["notify_data"] == bytes(range(182)).hex()
    assert c["after"]["read"] == 60
    assert p["writes"][3] == "00" * 182  # 190 bytes written, cut to MTU - 3, fits the 200-byte buffer
    assert [d[2] for d in c["write_done"]] == [0] * 5
    assert p["events"][-1] == 2 and c["events"][-1] == 8  # _IRQ_CENTRAL_ / _IRQ_PERIPHERAL_DISCONNECT


def test_write_longer_than_the_buffer_is_cut_until_set_buffer(radio: BrokerThread):
    peripheral = device(radio, PERIPHERAL, "payee")
    wait_advertising(radio, "payee")
    central = device(radio, r"""
ble.irq(rec)
ble.active(True)
ble.config(mtu=247)
c = connect_to(b"payee")
ble.gattc_exchange_mtu(c)
wait(lambda: got(21))
RXH = 15
msg = bytes(range(60))
def w(v, mode=1):
    n = len([1 for e, d in EV if e == 17])
    ble.gattc_write(c, RXH, v, mode)
    if mode:
        wait(lambda: got(17, n + 1))
w(msg)            # default buffer: 20 bytes kept
w(b"buf100")      # the peripheral enlarges the buffer
w(msg)            # now whole
w(b"append")      # append mode, 50 bytes
w(bytes(30), 0)
w(bytes(range(30)), 0)
w(b"bye")
wait(lambda: got(8))
result(events=events(), done=[d[2] for e, d in EV if e == 17])
""", "central")
    (p, c) = results(peripheral, central)
    writes = [bytes.fromhex(w) for w in p["writes"]]
    assert writes[0] == bytes(range(20))  # MTU 247 lets 60 bytes through; the 20-byte buffer keeps 20
    assert writes[2] == bytes(range(60))  # after gatts_set_buffer(rx, 100)
    # append mode: the two writes gather in the buffer up to its 50 bytes; a read empties it
    assert writes[4] == bytes(30) + bytes(range(20)) and writes[5] == b""
    assert writes[6] == b"bye"
    assert c["done"] == [0] * 5


# --------------------------------------------------------------------------- buffers: ENOMEM and recovery


def test_notify_faster_than_the_link_drains_raises_enomem_then_recovers(radio: BrokerThread):
    peripheral = device(radio, r"""
ble.irq(rec)
ble.active(True)
((TXH, RXH),) = ble.gatts_register_services(((SVC, (TX, RX)),))
ble.gap_advertise(30000, adv(b"payee"))
wait(lambda: got(1))
c = data(1)[0]
wait(lambda: got(3))  # the central is ready
seq = 0
burst = 0
while True:  # as fast as Python goes: the 12 transmit buffers fill long before a connection event
    e = oserr(ble.gatts_notify, c, TXH, bytes((seq,)) * 20)
    if e:
        break
    seq += 1
burst = seq
t0 = time.ticks_ms()
while oserr(ble.gatts_notify, c, TXH, bytes((seq,)) * 20) == errno.ENOMEM:
    pass  # busy retry, no pump: buffers come back as packets are delivered, as NimBLE frees them itself
recovered_ms = time.ticks_diff(time.ticks_ms(), t0)
seq += 1
while seq < 40:  # paced: retry after a pause on ENOMEM
    if oserr(ble.gatts_notify, c, TXH, bytes((seq,)) * 20) == errno.ENOMEM:
        pump(5)
    else:
        seq += 1
wait(lambda: got(2), 5000)
result(first_error=e, burst=burst, recovered_ms=recovered_ms)
""", "payee")
    wait_advertising(radio, "payee")
    central = device(radio, r"""
def irq(e, d):
    rec(e, d)
ble.irq(irq)
ble.active(True)
c = connect_to(b"payee")
ble.gattc_write(c, 15, b"ready", 1)
wait(lambda: got(18, 40))
seqs = [d[2][0] for e, d in EV if e == 18]
flood = 0
while not oserr(ble.gattc_write, c, 15, b"w" * 20):  # write without response: the same buffers
    flood += 1
full = oserr(ble.gattc_write, c, 15, b"w" * 20)
ble.gap_disconnect(c)
wait(lambda: got(8))
result(seqs=seqs, flood=flood, full=full)
""", "central")
    (p, c) = results(peripheral, central)
    assert p["first_error"] == ENOMEM
    assert p["burst"] == 12  # tx_buffers: NimBLE's msys_1 block count on ESP32
    assert p["recovered_ms"] < 150  # the next connection events (every 30 ms) deliver packets and free buffers
    assert c["seqs"] == list(range(40))  # nothing lost or reordered: ENOMEM means "not sent"
    assert c["flood"] == 12 and c["full"] == ENOMEM


# --------------------------------------------------------------------------- IRQ data lives only during the call


def test_irq_memoryviews_are_invalid_after_the_handler(radio: BrokerThread):
    peripheral = device(radio, PERIPHERAL, "payee")
    wait_advertising(radio, "payee")
    central = device(radio, r"""
KEPT = {}
def irq(e, d):
    rec(e, d)
    if e == 5 and "adv" not in KEPT:
        KEPT["adv"] = (d[1], d[4], bytes(d[1]), bytes(d[4]))  # the views, and copies
    if e == 9 and "uuid" not in KEPT:
        KEPT["uuid"] = (d[3], bluetooth.UUID(d[3]))
    if e == 18:
        KEPT["notify"] = (d[2], bytes(d[2]))
ble.irq(irq)
ble.active(True)
c = connect_to(b"payee")
ble.gattc_discover_services(c)
wait(lambda: got(10))
ble.gattc_write(c, 15, b"go", 1)
wait(lambda: got(18))
va, vd, ca, cd = KEPT["adv"]
u, uc = KEPT["uuid"]
vn, cn = KEPT["notify"]
out = {"addr": [hx(va), hx(ca)], "adv": [hx(vd), hx(cd)], "uuid": [str(u), str(uc)], "notify": [hx(vn), hx(cn)]}
# an exception in the handler is printed and disables the handler, as on the ESP32
def bad(e, d):
    EV.append(("bad", e))
    raise RuntimeError("handler bug")
ble.irq(bad)
ble.gattc_write(c, 15, b"bye", 1)
pump(300)
result(out=out, bad=[x for x in EV if x[0] == "bad"])
""", "central")
    (p, c) = results(peripheral, central)
    out = c["out"]
    assert out["addr"][0] == "00" * 6 and out["addr"][1] != "00" * 6  # the kept view reads zeros, the copy not
    assert out["adv"][0] == "00" * (len(out["adv"][1]) // 2) and b"payee" in bytes.fromhex(out["adv"][1])
    assert out["uuid"] == ["UUID(0x0000)", "UUID(0x1800)"]
    assert out["notify"][0] == "00" * 20 and out["notify"][1] == bytes(range(20)).hex()
    assert c["bad"] == [["bad", 17]]  # one call, then the handler is off: no disconnect event reached it
    assert "Unhandled exception in IRQ callback handler" in central.output
    assert "RuntimeError: handler bug" in central.output


# --------------------------------------------------------------------------- at most 4 connections


def test_fifth_connection_is_refused(radio: BrokerThread):
    async def peripherals() -> list[RadioClient]:
        clients = []
        for i in range(5):
            client = await RadioClient(radio.address, name=f"p{i}").start()
            await client.advertise(20_000, adv_data=bytes((6, 0x09)) + f"per{i}".encode())
            clients.append(client)
        return clients

    clients = radio.call(peripherals())
    addrs = [c.addr.hex() for c in clients]
    central = device(radio, f"ADDRS = {addrs!r}\n" + r"""
ble.irq(rec)
ble.active(True)
for i, a in enumerate(ADDRS[:4]):
    ble.gap_connect(0, bytes.fromhex(a))
    wait(lambda: got(7, i + 1))
fifth = oserr(ble.gap_connect, 0, bytes.fromhex(ADDRS[4]))
adv_conn = oserr(ble.gap_advertise, 100000, adv(b"me"))
adv_nonconn = oserr(ble.gap_advertise, 100000, adv(b"me"), connectable=False)
result(handles=[d[0] for e, d in EV if e == 7], fifth=fifth, adv_conn=adv_conn, adv_nonconn=adv_nonconn)
""", "central")
    (c,) = results(central)
    assert c["handles"] == [0, 1, 2, 3]
    assert c["fifth"] == ENOMEM  # ble_gap_connect: no connection slot (CONFIG_BT_NIMBLE_MAX_CONNECTIONS=4)
    assert c["adv_conn"] == ENOMEM and c["adv_nonconn"] == 0  # connectable advertising needs a free slot too

    async def close() -> None:
        for client in clients:
            await client.close()

    radio.call(close())


# --------------------------------------------------------------------------- link drops


def test_link_drops_reach_both_sides(radio: BrokerThread):
    peripheral = device(radio, r"""
ble.irq(rec)
ble.active(True)
((TXH, RXH),) = ble.gatts_register_services(((SVC, (TX, RX)),))
for n in range(1, 4):
    ble.gap_advertise(20000, adv(b"payee"))
    wait(lambda: got(2, n), 6000)  # each connection ends without this side doing anything
def conns(ev):
    return [(d[0], d[1], hx(d[2])) for e, d in EV if e == ev]
result(connects=conns(1), disconnects=conns(2), mac=hx(ble.config("mac")[1]),
       writes=len([1 for e, d in EV if e == 3]))
""", "payee")
    wait_advertising(radio, "payee")
    central = device(radio, r"""
ble.irq(rec)
ble.active(True)
c = connect_to(b"payee")
wait(lambda: got(8))                         # 1: the test drops the link now
c = connect_to(b"payee")
wait(lambda: got(27))                        # 2: the test arms "drop after 1 packet", then changes the interval
ble.gattc_write(c, 15, b"x", 1)              # the request goes out, the link drops before the response
wait(lambda: got(8, 2))
c = connect_to(b"payee")
wait(lambda: got(27, 2))                     # 3: total loss, short supervision timeout
t0 = time.ticks_ms()
wait(lambda: got(8, 3))
def conns(ev):
    return [(d[0], d[1], hx(d[2])) for e, d in EV if e == ev]
result(connects=conns(7), disconnects=conns(8), mac=hx(ble.config("mac")[1]),
       write_done=[d for e, d in EV if e == 17], updates=[d for e, d in EV if e == 27],
       order=[e for e in events() if e in (17, 8)], timeout_ms=time.ticks_diff(time.ticks_ms(), t0))
""", "central")

    def link_up(n: int) -> int:
        return radio.wait_for(lambda: [x["link"] for x in radio.links() if x["link"] >= n], timeout=5)[0]

    first = link_up(1)
    radio.drop(first)
    second = link_up(first + 1)
    radio.drop(second, after=1)
    radio.config(link=second, interval_ms=20)
    third = link_up(second + 1)
    radio.config(link=third, loss=1.0, supervision_ms=300)
    (p, c) = results(peripheral, central)
    # every drop reaches both sides, each with its own handle and the peer's address
    assert [d[2] for d in c["disconnects"]] == [p["mac"]] * 3
    assert [d[2] for d in p["disconnects"]] == [c["mac"]] * 3
    assert [d[0] for d in c["disconnects"]] == [d[0] for d in c["connects"]]
    assert [d[0] for d in p["disconnects"]] == [d[0] for d in p["connects"]]
    # the write whose response never came fails with BLE_HS_ENOTCONN (7) before the disconnect event
    assert c["write_done"] == [[c["connects"][1][0], 15, 7]] and c["order"][:3] == [8, 17, 8]
    assert p["writes"] == 1
    assert c["updates"][0] == [c["connects"][1][0], 16, 0, 256, 0]  # interval 20 ms = 16 x 1.25 ms
    assert c["updates"][1][3] == 30  # supervision timeout 300 ms = 30 x 10 ms
    assert 250 <= c["timeout_ms"] <= 1500
    reasons = [radio.stats(n)["reason"] for n in (first, second, third)]
    assert reasons == [{"central": 8, "peripheral": 8}] * 3  # HCI 0x08, connection timeout
    assert radio.stats(third)["stats"]["events_lost"] >= 5


# --------------------------------------------------------------------------- packet loss is delay


def test_packet_loss_delays_but_delivers(radio: BrokerThread):
    radio.config(loss=0.3)
    peripheral = device(radio, r"""
def irq(e, d):
    rec(e, d)
    if e == 3:
        GOT.append(ble.gatts_read(d[1])[0])
GOT = []
ble.irq(irq)
ble.active(True)
((TXH, RXH),) = ble.gatts_register_services(((SVC, (TX, RX)),))
ble.gap_advertise(20000, adv(b"payee"))
wait(lambda: got(2), 10000)
result(got=GOT)
""", "payee")
    wait_advertising(radio, "payee")
    central = device(radio, r"""
ble.irq(rec)
ble.active(True)
c = connect_to(b"payee")
t0 = time.ticks_ms()
seq = 0
while seq < 40:
    if oserr(ble.gattc_write, c, 15, bytes((seq,)) * 20):
        pump(5)
    else:
        seq += 1
while oserr(ble.gattc_write, c, 15, b"\xff", 1):
    pump(5)
wait(lambda: got(17), 8000)
ms = time.ticks_diff(time.ticks_ms(), t0)
ble.gap_disconnect(c)
wait(lambda: got(8), 8000)
result(ms=ms)
""", "central")
    link = radio.wait_for(lambda: radio.links(), timeout=5)[0]["link"]
    (p, c) = results(peripheral, central)
    assert p["got"] == list(range(40)) + [255]  # every write, in order
    stats = radio.stats(link)["stats"]
    assert stats["c2p"]["retransmissions"] > 0 and stats["events_lost"] > 0
    assert stats["c2p"]["pdus"] == 41 and stats["p2c"]["pdus"] == 1  # the writes; the one write response
    lossless_ms = 41 / 4 * 30  # 4 packets per 30 ms event
    assert c["ms"] > lossless_ms


# --------------------------------------------------------------------------- broken input: clear errors, no crash


def test_protocol_errors_are_reported_not_fatal(radio: BrokerThread):
    host, port = radio.address.split(":")
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        stream = sock.makefile("rwb")

        def ask(line: bytes) -> dict:
            stream.write(line + b"\n")
            stream.flush()
            return json.loads(stream.readline())

        assert ask(b"garbage")["msg"].startswith("not JSON")
        assert ask(b"[1, 2]")["msg"] == 'a message must be a JSON object with a string field "t"'
        assert ask(b'{"t": "tx", "c": 0, "p": "00"}')["msg"] == '"tx" before "hello": a device introduces itself first'
        welcome = ask(b'{"t": "hello", "name": "raw"}')
        assert welcome["t"] == "welcome" and welcome["cfg"] == {"tx_buffers": 12, "max_conn": 4}
        assert ask(b'{"t": "hello"}')["msg"] == '"hello" twice on one connection'
        assert ask(b'{"t": "warp"}')["msg"].startswith('unknown message type "warp"')
        assert ask(b'{"t": "tx", "c": 0, "p": "zz"}')["msg"] == 'tx: field "p" is not hex: \'zz\''
        assert ask(b'{"t": "tx", "c": 3, "p": "00"}')["msg"] == "tx: no connection with handle 3"
        assert ask(b'{"t": "adv", "iv": 5}')["msg"] == 'adv: field "iv" must be an integer in 20000..10240000, got 5'
        assert ask(b'{"t": "ctl", "op": "fly"}')["msg"].startswith("unknown control operation 'fly'")
        assert ask(b'{"t": "ctl", "op": "config", "loss": 2}')["msg"] == "loss must be in 0.0..1.0, got 2"
        assert ask(b'{"t": "ctl", "op": "ping"}')["result"]["version"] == 1  # still serving this client
    assert radio.ping()["version"] == 1  # and everyone else

    # a device that receives garbage says so and carries on
    dev = device(radio, r"""
ble.irq(rec)
ble.active(True)
ble.gap_scan(0)
wait(lambda: got(6))
result(events=events())
""", "victim")
    radio.wait_for(lambda: [d for d in radio.devices() if d["name"] == "victim" and d["scanning"]])
    radio.inject("victim", "this is not json")
    radio.inject("victim", '{"t": "advrep", "atype": 0}')
    radio.inject("victim", '{"t": "scan_done"}')
    (r,) = results(dev)
    assert r["events"] == [29, 30, 6]
    assert "bluetooth sim: bad message from the radio broker ignored" in dev.output
    assert dev.output.count("ignored") == 2


# --------------------------------------------------------------------------- asyncio: the firmware's way


def test_asyncio_firmware_gets_irqs_from_the_reader_task(radio: BrokerThread):
    radio.config(tx_buffers=1)
    peripheral = device(radio, r"""
import asyncio
written = asyncio.Event()
acked = asyncio.Event()
def irq(e, d):
    rec(e, d)
    if e == 3:
        (acked if ble.gatts_read(d[1]) == b"ack" else written).set()  # hand over to asyncio, as firmware does
async def main():
    ble.irq(irq)
    ble.active(True)
    ((tx, rx),) = ble.gatts_register_services(((SVC, (TX, RX)),))
    ble.gap_advertise(20000, adv(b"apayee"))
    await asyncio.wait_for_ms(written.wait(), 5000)
    conn = data(1)[0]
    ble.gatts_notify(conn, tx, bytes(reversed(ble.gatts_read(rx))))
    t0 = time.ticks_ms()
    await asyncio.sleep_ms(100)  # events keep flowing while asyncio sleeps in real time
    slept = time.ticks_diff(time.ticks_ms(), t0)
    # Busy retry without yielding: 253 bytes need 2 transmit buffers of the 1 there is, so every try looks
    # for freed buffers and reads everything that arrives meanwhile, the central's "ack" included.
    t0 = time.ticks_ms()
    refused = 0
    while time.ticks_diff(time.ticks_ms(), t0) < 300:
        refused += oserr(ble.gatts_notify, conn, tx, bytes(253)) == errno.ENOMEM
    try:
        await asyncio.wait_for_ms(acked.wait(), 300)  # nothing else arrives: the reader must still see it
    except asyncio.TimeoutError:
        result(error="the ack read during the busy loop was never delivered", events=events())
        return
    while not got(2):
        await asyncio.sleep_ms(10)
    result(events=[e for e in events() if e != 3], slept=slept, refused=refused)
asyncio.run(main())
""", "apayee")
    wait_advertising(radio, "apayee")
    central = device(radio, r"""
import asyncio
notified = asyncio.Event()
def irq(e, d):
    rec(e, d)
    if e == 18:
        notified.set()
async def main():
    ble.irq(irq)
    ble.active(True)
    ble.gap_scan(2000, 30000, 30000)
    while not [1 for e, d in EV if e == 5 and b"apayee" in d[4]]:
        await asyncio.sleep_ms(10)
    at, addr = [(d[0], d[1]) for e, d in EV if e == 5 and b"apayee" in d[4]][0]
    ble.gap_connect(at, addr)
    while not got(7):
        await asyncio.sleep_ms(10)
    conn = data(7)[0]
    ble.gattc_exchange_mtu(conn)
    while not got(21):
        await asyncio.sleep_ms(10)
    ble.gattc_write(conn, 15, b"olleh", 1)
    await asyncio.wait_for_ms(notified.wait(), 5000)
    await asyncio.sleep_ms(150)
    ble.gattc_write(conn, 15, b"ack")
    await asyncio.sleep_ms(1000)
    ble.gap_disconnect(conn)
    while not got(8):
        await asyncio.sleep_ms(10)
    result(events=[e for e in events() if e != 5], notify=bytes(data(18)[2]).decode())
asyncio.run(main())
""", "acentral")
    (p, c) = results(peripheral, central)
    assert c["notify"] == "hello"
    assert c["events"] == [29, 30, 6, 7, 21, 17, 18, 8]  # SCAN_DONE: gap_connect stops the scan
    assert p["events"] == [29, 30, 1, 21, 2]
    assert 100 <= p["slept"] < 300
    assert p["refused"] > 10


# --------------------------------------------------------------------------- a CPython central (bleak backend)


def test_cpython_central_talks_to_a_micropython_peripheral(radio: BrokerThread):
    peripheral = device(radio, PERIPHERAL, "payee")
    wait_advertising(radio, "payee")

    async def central() -> dict:
        async with RadioClient(radio.address, name="phone") as client:
            reports = await client.scan(300)
            payee = next(r for r in reports if b"payee" in r.data)
            conn = await client.connect(payee.addr, payee.atype)
            mtu = await conn.exchange_mtu(100)
            services = await conn.discover_services()
            nus = next(s for s in services if s.uuid == Uuid.parse(NUS))
            chars = await conn.discover_characteristics(nus.start, nus.end)
            tx = next(c for c in chars if c.uuid == Uuid.parse("6e400003-b5a3-f393-e0a9-e50e24dcca9e"))
            rx = next(c for c in chars if c.uuid == Uuid.parse("6e400002-b5a3-f393-e0a9-e50e24dcca9e"))
            descriptors = await conn.discover_descriptors(tx.value_handle, tx.end_handle)
            await conn.subscribe(descriptors[0].handle)
            value = await conn.read(tx.value_handle)
            name = await conn.read(3)
            with pytest.raises(AttError) as refused:
                await conn.read(rx.value_handle)
            await conn.write(rx.value_handle, b"go")
            handle, note = await asyncio.wait_for(conn.notifications.get(), 5)
            with pytest.raises(ValueError):
                await conn.write(rx.value_handle, bytes(98))
            await conn.write(rx.value_handle, b"bye", response=False)
            await asyncio.wait_for(conn.disconnected.wait(), 5)
            return dict(mtu=mtu, services=[str(s.uuid) for s in services], tx=tx.value_handle,
                        props=[tx.properties, rx.properties], descriptors=[str(d.uuid) for d in descriptors],
                        value=value, name=name, note=(handle, len(note)), reason=conn.reason, link=conn.link,
                        rx_read=refused.value.code)

    c = radio.call(central())
    (p,) = results(peripheral)
    assert c["mtu"] == 100
    assert c["services"] == ["0x1800", "0x1801", NUS, "0x180f"]
    assert c["tx"] == p["handles"][0] and c["props"] == [0x12, 0x0C]
    assert c["descriptors"] == ["0x2902"]
    assert c["value"] == bytes(range(60)) and c["name"] == b"MPY ESP32"
    assert c["note"] == (c["tx"], 97)
    assert c["reason"] == 0x13  # the peripheral disconnected: "remote user terminated"
    assert c["rx_read"] == 0x02  # read not permitted: RX has no FLAG_READ
    assert radio.stats(c["link"])["mtu"] == 100
    # the peripheral's handler saw one _IRQ_GATTS_READ_REQUEST: the TX read (GAP's device name is NimBLE's own)
    assert p["events"].count(4) == 1


# --------------------------------------------------------------------------- memory, CLI


def test_heap_used_by_the_simulated_module(radio: BrokerThread):
    dev = device(radio, r"""
import gc
def free():
    gc.collect()
    return gc.mem_free()
a = free()
import _bluetooth_gatts
b = free()
import _bluetooth_gattc
c = free()
import asyncio  # firmware imports it anyway; active(True) starts the IRQ reader task on it
c2 = free()
ble.active(True)
d = free()
ble.gatts_register_services(((SVC, (TX, RX)),))
e = free()
result(gatts=a - b, gattc=b - c, asyncio=c - c2, active=c2 - d, services=d - e)
""", "heap", heapsize="96K")
    r = dev.result()
    core = run_script("import gc\ngc.collect()\na = gc.mem_free()\nimport bluetooth\ngc.collect()\n"
                      "print(a - gc.mem_free())", heapsize="96K")
    assert core.returncode == 0, core.stderr
    # On an ESP32 all of this is C in flash; here the code sits in the heap (docs/simulator.md gives the numbers).
    print(f"heap: bluetooth {int(core.stdout)} B, then {r}")
    assert int(core.stdout) < 26 * 1024  # bluetooth.py
    assert r["gatts"] < 6 * 1024 and r["gattc"] < 4 * 1024  # loaded on first use
    assert r["active"] < 8 * 1024 and r["services"] < 3 * 1024  # buffers, connection state, attribute table


def test_broker_command_line(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "paytoken_host.simradio.broker", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert "PAYTOKEN_RADIO" in help_text and "--loss" in help_text
    proc = subprocess.Popen([sys.executable, "-m", "paytoken_host.simradio.broker", "--interval-ms", "15"],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("PAYTOKEN_RADIO=127.0.0.1:")
        address = line.strip().split("=", 1)[1]

        async def ask() -> dict:
            async with RadioClient(address) as client:
                return await client.control("config")

        assert asyncio.run(ask())["interval_ms"] == 15
    finally:
        proc.terminate()
        proc.wait(5)


# --------------------------------------------------------------------------- subscriptions and indications


def test_updates_reach_subscribers_notify_reaches_everyone(radio: BrokerThread):
    peripheral = device(radio, r"""
def irq(e, d):
    rec(e, d)
    if e == 3 and ble.gatts_read(d[1]) == b"go":
        ble.gatts_write(TXH, b"update", True)  # only to clients that wrote the CCCD
        for c in [x[0] for x in [d2 for e2, d2 in EV if e2 == 1]]:
            ble.gatts_notify(c, TXH, b"direct")  # to every client, subscribed or not
        ble.gatts_indicate(d[0], TXH, b"ind")
ble.irq(irq)
ble.active(True)
((TXH, RXH),) = ble.gatts_register_services(((SVC, (TX, RX)),))
ble.gap_advertise(20000, adv(b"payee"))
wait(lambda: got(1))
ble.gap_advertise(20000, adv(b"payee"))  # advertising stopped with the first connection
wait(lambda: got(2, 2), 6000)
result(indicate_done=data(20))
""", "payee")
    wait_advertising(radio, "payee")
    central = device(radio, r"""
ble.irq(rec)
ble.active(True)
c = connect_to(b"payee")
ble.gattc_write(c, 13, b"\x01\x00", 1)  # subscribe: notifications on
wait(lambda: got(17))
wait(lambda: got(27))  # the test's signal: the other client is connected too
ble.gattc_write(c, 15, b"go", 1)
wait(lambda: got(19))
ble.gap_disconnect(c)
wait(lambda: got(8))
result(notified=[d[2].decode() for e, d in EV if e == 18], indicated=[d[2].decode() for e, d in EV if e == 19])
""", "subscriber")
    first = radio.wait_for(lambda: radio.links(), timeout=5)[0]["link"]
    payee = next(d for d in radio.devices() if d["name"] == "payee")["addr"]

    async def bystander() -> list[bytes]:
        async with RadioClient(radio.address, name="bystander") as client:
            conn = await client.connect(payee)
            radio.broker.control("config", link=first, interval_ms=25)  # signal the subscriber
            values = [(await asyncio.wait_for(conn.notifications.get(), 5))[1]]
            await asyncio.sleep(0.2)
            while not conn.notifications.empty():
                values.append(conn.notifications.get_nowait()[1])
            await conn.disconnect()
            return values

    seen = radio.submit(bystander())
    (p, c) = results(peripheral, central)
    assert seen.result(5) == [b"direct"]  # no "update": it did not subscribe
    assert c["notified"] == ["update", "direct"] and c["indicated"] == ["ind"]
    assert p["indicate_done"][2] == 0  # confirmed


def test_a_link_the_broker_ended_is_gone_for_sending_before_its_irq(radio: BrokerThread):
    """As on an ESP32, where NimBLE's own task ends a link while Python computes: once the broker's `disc` has
    arrived, a notification or write on that link raises ENOTCONN although the disconnect IRQ comes only at the next
    pump (the simulator used to send it into the void, as if the link were still up)."""
    peripheral = device(radio, r"""
ble.irq(rec)
ble.active(True)
((TXH, RXH),) = ble.gatts_register_services(((SVC, (TX, RX)),))
ble.gap_advertise(20000, adv(b"busy"))
wait(lambda: got(3))                         # the central's write; the test drops the link once it arrived
c = data(1)[0]
time.sleep_ms(400)                           # busy (a signature check), no IRQs handled meanwhile
before = got(2)
err = oserr(ble.gatts_notify, c, TXH, b"receipt")
wait(lambda: got(2))
result(before=before, err=err, after=got(2))
""", "busy")
    wait_advertising(radio, "busy")
    central = device(radio, r"""
ble.irq(rec)
ble.active(True)
c = connect_to(b"busy")
ble.gattc_write(c, 15, b"payment", 1)
wait(lambda: got(8))
time.sleep_ms(200)
result(notified=got(18), err=oserr(ble.gattc_write, c, 15, b"x", 0))
""", "central")
    link = radio.wait_for(lambda: [x["link"] for x in radio.links()])[0]
    radio.wait_for(lambda: radio.stats(link)["stats"]["c2p"]["pdus"] >= 1)
    radio.drop(link)
    p, c = results(peripheral, central)
    assert p == {"before": False, "err": ENOTCONN, "after": True}
    assert c == {"notified": False, "err": ENOTCONN}


def test_drop_at_a_chosen_pdu_before_or_after_it_arrives(radio: BrokerThread):
    """drop_at: the next link drops at the 2nd write request to handle 0x20 (lost with the link), another link
    right after the peripheral's first notification arrives; `trace` lists the PDUs delivered, in order."""
    from paytoken_host.simradio import att
    from paytoken_host.simradio.broker import BrokerError

    async def scenario() -> dict:
        ctl = radio.broker.control
        async with RadioClient(radio.address, name="dp") as per, RadioClient(radio.address, name="dc") as cen:
            armed = ctl("drop_at", nth=2, dir="c2p", att=att.WRITE_REQ, handle=0x20, deliver=False)
            await per.advertise(20_000)
            conn = await cen.connect(per.addr, interval_us=20_000)
            pconn = await per.incoming.get()
            writes: list[tuple[int, bytes]] = []
            pconn.on_write = lambda handle, value: writes.append((handle, value))
            await conn.write(0x20, b"a")  # the 1st match
            await conn.write(0x21, b"b")  # another handle: no match
            await conn.write(0x20, b"c", response=False)  # a write command: no match
            with pytest.raises(ConnectionError):
                await conn.write(0x20, b"d")  # the 2nd match: the link drops, the write never arrives
            await pconn.disconnected.wait()
            lost = dict(writes=list(writes), info=ctl("stats", link=conn.link), trace=ctl("trace", link=conn.link),
                        reasons=(conn.reason, pconn.reason), armed=armed)

            await per.advertise(20_000)
            conn = await cen.connect(per.addr, interval_us=20_000)
            pconn = await per.incoming.get()
            ctl("drop_at", link=conn.link, dir="p2c", att=att.NOTIFY, reason=0x13)
            await pconn.notify(0x30, b"n1")
            await conn.disconnected.wait()
            arrived = dict(notes=[conn.notifications.get_nowait() for _ in range(conn.notifications.qsize())],
                           trace=ctl("trace", link=conn.link), reasons=(conn.reason, pconn.reason))
            refused = []
            for bad in (dict(dir="up"), dict(nth=0), dict(att=256), dict(handle=True), dict(deliver=1),
                        dict(link=conn.link)):
                try:
                    ctl("drop_at", **bad)
                except BrokerError as exc:
                    refused.append(str(exc))
            ctl("drop_at", nth=5)
            armed = radio.broker.armed is not None
            ctl("reset")  # disarms it
            return dict(lost=lost, arrived=arrived, refused=refused, armed=armed, next_link=radio.broker.armed)

    r = radio.call(scenario())
    lost, arrived = r["lost"], r["arrived"]
    assert lost["armed"]["link"] is None and lost["armed"]["nth"] == 2  # armed for the next link made
    assert lost["writes"] == [(0x20, b"a"), (0x21, b"b"), (0x20, b"c")]
    assert lost["reasons"] == (8, 8)
    assert lost["info"]["up"] is False and lost["info"]["drop_at"] is None
    assert lost["info"]["stats"]["c2p"]["discarded"] == 1
    w, rsp, cmd = att.WRITE_REQ, att.WRITE_RSP, att.WRITE_CMD
    assert [(t["dir"], t["att"], t["handle"]) for t in lost["trace"]] == [
        ("c2p", w, 0x20), ("p2c", rsp, None), ("c2p", w, 0x21), ("p2c", rsp, None), ("c2p", cmd, 0x20)]
    assert arrived["notes"] == [(0x30, b"n1")]  # delivered, then the link dropped
    assert arrived["trace"] == [{"dir": "p2c", "att": att.NOTIFY, "handle": 0x30, "len": 5}]
    assert arrived["reasons"] == (0x13, 0x13)
    assert len(r["refused"]) == 6, r["refused"]
    assert "already down" in r["refused"][-1]
    assert r["armed"] and r["next_link"] is None


# --------------------------------------------------------------------------- the link layer's timing


def test_timing_interval_latency_packets_per_event_fragmentation(radio: BrokerThread):
    async def scenario() -> dict:
        loop = asyncio.get_running_loop()
        async with RadioClient(radio.address, name="tp") as per, RadioClient(radio.address, name="tc") as cen:
            await per.advertise(20_000)
            conn = await cen.connect(per.addr, interval_us=20_000)
            pconn = await per.incoming.get()
            arrivals: list[float] = []
            pconn.on_write = lambda handle, value: arrivals.append(loop.time())

            async def delays(n: int) -> list[float]:
                out = []
                for i in range(n):
                    t0 = loop.time()
                    await conn.write(0x20, bytes([i]), response=False)
                    while len(arrivals) <= i:
                        await asyncio.sleep(0.001)
                    out.append(arrivals[i] - t0)
                    await asyncio.sleep(0.007 * (i % 3))  # land at different points between events
                arrivals.clear()
                return out

            plain = await delays(8)
            radio.broker.control("config", link=conn.link, latency=4)
            sleepy = await delays(8)
            radio.broker.control("config", link=conn.link, latency=0, ppe=2)
            for i in range(10):
                await conn.write(0x20, bytes([i]), response=False)
            while len(arrivals) < 10:
                await asyncio.sleep(0.001)
            spread = arrivals[-1] - arrivals[0]
            await conn.exchange_mtu(247)
            before = radio.broker.control("stats", link=conn.link)["stats"]["c2p"]["ll_packets"]
            await conn.write(0x20, bytes(200), response=False)
            await asyncio.sleep(0.2)
            after = radio.broker.control("stats", link=conn.link)["stats"]["c2p"]["ll_packets"]
            return dict(plain=plain, sleepy=sleepy, spread=spread, fragments=after - before)

    r = radio.call(scenario())
    assert max(r["plain"]) < 0.020 + 0.015  # delivered at the next connection event (20 ms interval)
    assert max(r["sleepy"]) > 0.025  # peripheral latency 4: it listens at every 5th event only
    assert max(r["sleepy"]) < 5 * 0.020 + 0.015
    assert r["spread"] > 4 * 0.020 - 0.008  # 10 packets, 2 per event: 5 events
    assert r["fragments"] == 8  # 203-byte ATT PDU + 4-byte L2CAP header in 27-byte LL packets
