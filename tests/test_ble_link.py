"""paytoken.ble over the simulated radio: a payee (Peripheral) and a payer (central.connect) in two MicroPython
processes, joined by the broker (paytoken_host.simradio), exchange messages as two ESP32s would.

Each device runs tests/harness/ble_side.py with a list of operations on its Link and reports what every call
returned or raised. Rogue devices (a central or a peripheral that breaks the rules) are raw `bluetooth`
scripts on the radio harness's prelude. docs/protocol.md section 9 has the transport; docs/simulator.md the
radio model.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from paytoken_host.simradio import BrokerThread
from tests.harness.mp import ROOT, micropython_command, micropython_path
from tests.harness.radio import DeviceProcess

SIDE = ROOT / "tests" / "harness" / "ble_side.py"
NONCE = "0102030405060708"
_addresses = itertools.count(1)


def new_addr() -> str:
    n = next(_addresses)
    return f"c0:ff:ee:00:{n >> 8:02x}:{n & 0xFF:02x}"


def hexaddr(addr: str) -> str:
    return addr.replace(":", "")


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerThread]:
    with BrokerThread(seed=11) as radio:
        yield radio


@pytest.fixture
def radio(broker: BrokerThread) -> Iterator[BrokerThread]:
    broker.reset()
    broker.config(interval_ms=7.5)  # fast links: the tests are about behaviour, not throughput
    yield broker
    for link in broker.links():
        broker.drop(link["link"])
    broker.reset()


class Side:
    """One ble_side.py process: role and operations in `params`; result() is its RESULT dict."""

    def __init__(self, radio: BrokerThread, name: str, params: dict[str, Any], addr: str | None = None,
                 heapsize: str = "256K"):
        self.name = name
        env = dict(os.environ, MICROPYPATH=micropython_path(), PAYTOKEN_RADIO=radio.address, PAYTOKEN_RADIO_NAME=name)
        if addr:
            env["PAYTOKEN_RADIO_ADDR"] = addr
        self.proc = subprocess.Popen(
            [micropython_command(), "-X", f"heapsize={heapsize}", str(SIDE)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT),
        )
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(params) + "\n")
        self.proc.stdin.flush()

    def result(self, timeout: float = 60) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"{self.name} did not finish in {timeout} s:\n{out}\n{err}") from None
        for line in out.splitlines():
            if line.startswith("RESULT "):
                res = json.loads(line[7:])
                res["output"] = out + err
                return res
        raise AssertionError(f"{self.name} gave no result (exit {self.proc.returncode}):\n{out}\n{err}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


def wait_advertising(radio: BrokerThread, name: str) -> None:
    radio.wait_for(lambda: [d for d in radio.devices() if d["name"] == name and d["advertising"]], timeout=10)


def payee(radio: BrokerThread, ops: list, name: str = "payee", nonce: str = NONCE, **params: Any) -> tuple[Side, str]:
    addr = new_addr()
    side = Side(radio, name, {"role": "payee", "nonce": nonce, "ops": ops, "name": name, **params}, addr)
    try:
        wait_advertising(radio, name)
    except TimeoutError:
        side.kill()
        out = f"{side.proc.stdout.read()}{side.proc.stderr.read()}"
        raise AssertionError(f"{name} is not advertising:\n{out}") from None
    return side, addr


def payer(radio: BrokerThread, addr: str, ops: list, name: str = "payer", nonce: str = NONCE, **params: Any) -> Side:
    return Side(radio, name, {"role": "payer", "nonce": nonce, "addr": hexaddr(addr), "ops": ops, **params})


def results(*sides: Side | DeviceProcess, timeout: float = 60) -> list[dict[str, Any]]:
    try:
        return [s.result(timeout) for s in sides]
    finally:
        for s in sides:
            s.kill()


def clean(res: dict[str, Any]) -> None:
    # Nothing may escape the BLE IRQ handler (MicroPython would switch it off for good) or the firmware.
    assert res.get("irq_error") is None, res["output"]
    assert "Traceback" not in res["output"] and "Unhandled exception" not in res["output"], res["output"]


def frames(n: int, frame_size: int) -> int:
    return math.ceil((n + 2) / (frame_size - 2))


def ping_pong(sizes: list[int], ms: int = 20000) -> tuple[list, list]:
    """Payee and payer ops: the payer sends each size, the payee answers with the same size."""
    payee_ops: list = []
    payer_ops: list = []
    for n in sizes:
        payer_ops += [["air", n], ["air_in", n, ms]]
        payee_ops += [["air_in", n, ms], ["air", n]]
    return payee_ops, payer_ops


def check_air(res: dict[str, Any], sizes: list[int], frame_size: int) -> None:
    # Every message arrived intact, in the frames the framing promises, at this frame size.
    ins = [o for o in res["ops"] if isinstance(o, dict) and "ok" in o]
    outs = [o for o in res["ops"] if isinstance(o, dict) and "ok" not in o]
    assert [o["n"] for o in ins] == sizes and all(o["ok"] for o in ins), res["ops"]
    for o in ins + outs:
        f = frames(o["n"], frame_size)
        assert (o["frames"], o["bytes"]) == (f, o["n"] + 2 * f + 2), o
    assert all(o["frame_size"] == frame_size for o in outs)


# --------------------------------------------------------------------------- messages both ways

SIZES = [1, 2, 16, 17, 18, 19, 20, 37, 100, 242, 243, 244, 245, 394, 1000, 4095, 4096]


def test_exchange_default_mtu(radio):
    # ATT_MTU 23 on both sides: 20-byte frames, every size 1..4096 class both ways (frame boundaries around
    # 16 (first frame full), 18 (second frame starts) and the largest message).
    sizes = [1, 2, 16, 17, 18, 19, 37, 100, 394, 1000, 4096]
    payee_ops, payer_ops = ping_pong(sizes)
    pe, addr = payee(radio, payee_ops, kw={"mtu": 23})
    pr = payer(radio, addr, payer_ops, kw={"mtu": 23})
    e, r = results(pe, pr)
    for res in (e, r):
        clean(res)
        check_air(res, sizes, 20)
    assert r["connect"] == "ok" and r["att_mtu"] == 23 and not r["via_scan"]
    assert e["accept"] == ["ok"]


def test_exchange_after_mtu_exchange(radio):
    # The default preference (247 both sides): 244-byte frames; with data length extension on the links.
    radio.config(ll_payload=251)
    payee_ops, payer_ops = ping_pong(SIZES)
    pe, addr = payee(radio, payee_ops)
    pr = payer(radio, addr, payer_ops)
    e, r = results(pe, pr)
    for res in (e, r):
        clean(res)
        check_air(res, SIZES, 244)
    assert r["att_mtu"] == 247


def test_exchange_largest_mtu_and_unequal_preferences(radio):
    # Payer asks for 517, payee allows 185: the smaller wins on both sides (182-byte frames); then 517 on both.
    radio.config(ll_payload=251)
    sizes = [1, 180, 181, 182, 183, 4096]
    payee_ops, payer_ops = ping_pong(sizes)
    pe, addr = payee(radio, payee_ops, kw={"mtu": 185})
    pr = payer(radio, addr, payer_ops, kw={"mtu": 517})
    e, r = results(pe, pr)
    for res in (e, r):
        clean(res)
        check_air(res, sizes, 182)
    assert r["att_mtu"] == 185
    sizes = [1, 510, 511, 512, 513, 4096]
    payee_ops, payer_ops = ping_pong(sizes)
    pe, addr = payee(radio, payee_ops, kw={"mtu": 517})
    pr = payer(radio, addr, payer_ops, kw={"mtu": 517})
    e, r = results(pe, pr)
    for res in (e, r):
        clean(res)
        check_air(res, sizes, 514)


# --------------------------------------------------------------------------- the radio misbehaves


def test_notify_pacing_under_enomem(radio):
    # 228 notifications in a row at MTU 23 with 12 (then 2) transmit buffers: the stack refuses frames with
    # ENOMEM, the payee sends the same frame again a connection interval later, and nothing is lost.
    for buffers in (12, 2):
        radio.config(tx_buffers=buffers)
        pe, addr = payee(radio, [["recv", 10, 5000], ["send", 4096], ["send", 4096]], kw={"mtu": 23})
        pr = payer(radio, addr, [["send", 10], ["recv", 4096, 30000], ["recv", 4096, 30000]], kw={"mtu": 23})
        e, r = results(pe, pr)
        clean(e)
        clean(r)
        assert e["ops"] == ["ok"] * 3 and r["ops"] == ["ok"] * 3
        assert e["stats"]["frames_out"] == 2 * 228
        assert e["stats"]["stalls"] > (100 if buffers == 2 else 10), e["stats"]  # paced, never dropped


def test_packet_loss(radio):
    # 20 % of LL packets lost: the link layer retransmits, the messages arrive whole and in order.
    radio.config(loss=0.2)
    sizes = [1, 394, 4096]
    payee_ops, payer_ops = ping_pong(sizes, ms=30000)
    pe, addr = payee(radio, payee_ops)
    pr = payer(radio, addr, payer_ops, timeout_ms=15000)
    link = radio.wait_for(lambda: radio.links(), timeout=15)[0]["link"]
    e, r = results(pe, pr)
    for res in (e, r):
        clean(res)
        check_air(res, sizes, 244)
    s = radio.stats(link)["stats"]
    assert s["c2p"]["retransmissions"] + s["p2c"]["retransmissions"] > 10, s


def arm_drop(radio: BrokerThread, after: int) -> None:
    link = radio.wait_for(lambda: radio.links(), timeout=15)[0]["link"]
    radio.drop(link, after=after)


@pytest.mark.parametrize("sender", ["payer", "payee"])
def test_link_drop_mid_message(radio, sender):
    # The radio link drops while one side is half-way through a 4096-byte message (about 40 ATT PDUs in):
    # the sender's send() and the receiver's recv() raise LinkError(CLOSED), and so does every later call.
    send = [["sleep", 400], ["send", 4096], ["send", 10], ["recv", 10, 1000]]
    recv = [["recv", 4096, 20000], ["send", 10], ["recv", 10, 1000]]
    pe, addr = payee(radio, send if sender == "payee" else recv, kw={"mtu": 23})
    pr = payer(radio, addr, send if sender == "payer" else recv, kw={"mtu": 23})
    arm_drop(radio, 60)
    e, r = results(pe, pr)
    s, v = (e, r) if sender == "payee" else (r, e)
    for res in (s, v):
        clean(res)
        assert res["closed"]
    assert s["ops"][0] == "ok" and all(o.startswith("closed") for o in s["ops"][1:]), s["ops"]
    assert all(o.startswith("closed") for o in v["ops"]), v["ops"]
    assert 0 < s["stats"]["frames_out"] < 228  # it did break off mid-message


def test_peer_closes_mid_message(radio):
    # The payer closes while the payee is notifying a long message: the payee's send raises CLOSED.
    pe, addr = payee(radio, [["send", 4096], ["recv", 10, 1000]], kw={"mtu": 23})
    pr = payer(radio, addr, [["sleep", 150], ["close"], ["recv", 4096, 1000], ["send", 10]], kw={"mtu": 23})
    e, r = results(pe, pr)
    clean(e)
    clean(r)
    assert e["ops"][0].startswith("closed") and e["ops"][1].startswith("closed"), e["ops"]
    assert r["ops"][:2] == ["ok", "ok"] and all(o.startswith("closed") for o in r["ops"][2:]), r["ops"]
    assert 0 < e["stats"]["frames_out"] < 228


def test_payer_vanishes_mid_message(radio):
    # The payer's process dies (no disconnect on the air) while the payee sends: the link layer's
    # supervision timeout ends the link and the payee's send raises CLOSED.
    pe, addr = payee(radio, [["recv", 10, 5000], ["send", 4096], ["recv", 10, 5000]], kw={"mtu": 23})
    pr = payer(radio, addr, [["send", 10], ["sleep", 30000]], kw={"mtu": 23})
    radio.wait_for(lambda: [x for x in radio.links() if x["stats"]["p2c"]["pdus"] > 30], timeout=15)
    pr.kill()
    (e,) = results(pe)
    clean(e)
    assert e["ops"][0] == "ok" and e["ops"][1].startswith("closed") and e["ops"][2].startswith("closed"), e["ops"]


# --------------------------------------------------------------------------- one payer at a time


def test_second_central_refused_busy(radio):
    # While payer A is served, payer B's connect() gets BUSY and B is disconnected; A's session goes on
    # undisturbed. After A's session and before the payee's next start(), payer B' is refused too (one payer
    # per start()); after the next start() the payee serves payer C.
    pe, addr = payee(radio, [["recv", 100, 8000], ["send", 100], ["sleep", 1500]], sessions=2, accept_ms=15000)
    a = payer(radio, addr, [["sleep", 1500], ["send", 100], ["recv", 100, 8000]], name="payer-a")
    radio.wait_for(lambda: radio.links(), timeout=10)
    b = payer(radio, addr, [], name="payer-b", timeout_ms=5000)
    (rb,) = results(b)
    (ra,) = results(a)
    b2 = payer(radio, addr, [], name="payer-b2", timeout_ms=5000)  # the payee sleeps 1.5 s before its start()
    (rb2,) = results(b2)
    c = payer(radio, addr, [["send", 100], ["recv", 100, 8000]], name="payer-c", delay_ms=1500)  # after start()
    rc, e = results(c, pe)
    for res in (ra, rb, rb2, rc, e):
        clean(res)
    assert rb["connect"].startswith("busy") and rb2["connect"].startswith("busy"), (rb, rb2)
    assert ra["connect"] == "ok" and ra["ops"] == ["ok"] * 3
    assert rc["connect"] == "ok" and rc["ops"] == ["ok"] * 2
    assert e["accept"] == ["ok", "ok"] and e["ops"] == ["ok"] * 3
    assert [x for x in radio.links(all=True) if x["central"]["name"] == "payer-b"][0]["reason"] is not None


# --------------------------------------------------------------------------- finding the payee


def test_wrong_address_scan_finds_payee_by_nonce(radio):
    # The QR's address answers nobody: the payer scans for the service with the nonce's tag and, of two
    # payees on the air, reaches the one whose QR it holds.
    other, _ = payee(radio, [], name="payee-other", nonce="1111111111111111", accept_ms=3500)
    pe, _addr = payee(radio, [["recv", 50, 5000], ["send", 50]], accept_ms=8000)
    pr = payer(radio, new_addr(), [["send", 50], ["recv", 50, 5000]], timeout_ms=8000)
    r, e, o = results(pr, pe, other)
    for res in (r, e, o):
        clean(res)
    assert r["connect"] == "ok" and r["via_scan"] and r["ops"] == ["ok", "ok"], r
    assert e["accept"] == ["ok"] and o["accept"] == ["timeout: no payer"]
    assert r["connect_ms"] < 5000


NOT_A_PAYEE = r"""
ble.irq(rec)
ble.active(True)
((tx, rx),) = ble.gatts_register_services(((SVC, (TX, RX)),))
ble.gap_advertise(100000, adv(b"speaker"))
pump(2500)
result(events=events())
"""


def test_device_without_service_is_unreachable(radio):
    addr = new_addr()
    dev = DeviceProcess(radio.address, NOT_A_PAYEE, "speaker", env={"PAYTOKEN_RADIO_ADDR": addr})
    wait_advertising(radio, "speaker")
    pr = payer(radio, addr, [], timeout_ms=3000)
    r, d = results(pr, dev)
    clean(r)
    assert r["connect"] == "unreachable: no paytoken service" and r["connect_ms"] < 1500, r
    assert 1 in d["events"] and 2 in d["events"]  # it was connected to, and left again


def test_nobody_there_is_unreachable_in_time(radio):
    pr = payer(radio, new_addr(), [], timeout_ms=2500)
    (r,) = results(pr)
    clean(r)
    # Half the time on the QR's address, then a scan, within the time given.
    assert r["connect"].startswith("unreachable") and 1500 <= r["connect_ms"] <= 3000, r


# --------------------------------------------------------------------------- timeouts


def test_accept_times_out(radio):
    pe, _ = payee(radio, [], accept_ms=300)
    (e,) = results(pe)
    clean(e)
    assert e["accept"] == ["timeout: no payer"]


def test_recv_timeout_keeps_the_session(radio):
    pe, addr = payee(radio, [["sleep", 800], ["send", 5], ["recv", 3, 5000]])
    pr = payer(radio, addr, [["recv", 5, 300], ["recv", 5, 5000], ["send", 3]])
    e, r = results(pe, pr)
    clean(e)
    clean(r)
    assert r["ops"] == ["timeout", "ok", "ok"] and e["ops"] == ["ok", "ok", "ok"]


def test_connect_times_out_without_ready(radio):
    # The payee's service is there but nobody accepts: no READY comes, connect() gives up at its deadline.
    pe, addr = payee(radio, [], no_accept=2500)
    pr = payer(radio, addr, [], timeout_ms=1500)
    r, e = results(pr, pe)
    clean(r)
    clean(e)
    assert r["connect"] == "timeout: no READY" and 1450 <= r["connect_ms"] <= 2000, r


# --------------------------------------------------------------------------- peers that break the rules

# A raw central (radio prelude): connects to ADDR, discovers the payee's service, subscribes and then follows
# SCRIPT: ("open",) writes OPEN and waits for a notification; ("write", hex) writes one frame (with response).
ROGUE_CENTRAL = r"""
from paytoken.ble import gatt
ble.irq(rec)
ble.active(True)
ble.gap_connect(0, ADDR)
wait(lambda: got(7))
c = data(7)[0]
ble.gattc_discover_services(c)
wait(lambda: got(10))
start, end = [(d[1], d[2]) for e, d in EV if e == 9 and gatt.SERVICE_UUID in str(d[3]).lower()][0]
ble.gattc_discover_characteristics(c, start, end)
wait(lambda: got(12))
chars = {str(d[4]).lower(): (d[2], d[1]) for e, d in EV if e == 11}
wh = [v for k, v in chars.items() if gatt.WRITE_UUID in k][0][0]
nh, nend = [v for k, v in chars.items() if gatt.NOTIFY_UUID in k][0]
ble.gattc_discover_descriptors(c, nh, nend)
wait(lambda: got(14))
cccd = [d[1] for e, d in EV if e == 13 and "2902" in str(d[2]).lower()][0]
ble.gattc_write(c, cccd, b"\x01\x00", 1)
wait(lambda: got(17))
notes = []
for step in SCRIPT:
    n = len([1 for e, d in EV if e == 17])
    if step[0] == "open":
        k = len([1 for e, d in EV if e == 18])
        ble.gattc_write(c, wh, gatt.OPEN_FRAME, 1)
        wait(lambda: got(18, k + 1) or got(8))
    else:
        ble.gattc_write(c, wh, bytes.fromhex(step[1]), 1)
        wait(lambda: got(17, n + 1) or got(8))
pump(300)
wait(lambda: got(8), 5000)
result(events=events(), notified=[hx(d[2]) for e, d in EV if e == 18])
"""


def rogue_central(radio: BrokerThread, addr: str, script: list) -> DeviceProcess:
    body = f"ADDR = bytes.fromhex({hexaddr(addr)!r})\nSCRIPT = {script!r}\n" + ROGUE_CENTRAL
    return DeviceProcess(radio.address, body, "rogue-central")


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        ([("open",), ("write", "000500")], "frame: no_first"),  # a frame from the middle of nowhere
        ([("open",), ("write", "4001")], "frame: bad_header"),  # a control frame once the session is open
        ([("open",), ("write", "8000ffff00")], "frame: oversize"),  # 65535 bytes declared
        ([("open",), ("write", "800000640102")], "frame: truncated"),  # says 100 bytes, brings 2, ends
    ],
)
def test_malformed_frame_from_payer_ends_session(radio, script, reason):
    # The payee's recv() raises LinkError(FRAME) with the framing's reason, every later call too, and the
    # payee disconnects the payer at once.
    pe, addr = payee(radio, [["recv", 10, 5000], ["recv", 10, 500], ["send", 10]], kw={"mtu": 23})
    rogue = rogue_central(radio, addr, script)
    e, g = results(pe, rogue)
    clean(e)
    assert e["ops"] == [reason, reason, reason], e["ops"]
    assert g["notified"] == ["4002"] and 8 in g["events"]  # READY, then disconnected by the payee


def test_payer_must_open_first(radio):
    # A central that writes data before OPEN is not served: disconnected, and accept() keeps waiting.
    pe, addr = payee(radio, [], accept_ms=1500)
    rogue = rogue_central(radio, addr, [("write", "8000000141")])
    e, g = results(pe, rogue)
    clean(e)
    assert e["accept"] == ["timeout: no payer"] and g["notified"] == [] and 8 in g["events"]


# A raw peripheral that offers paytoken's service and advertises the nonce's tag, answering OPEN with REPLY
# (a list of hex frames, notified one after the other).
ROGUE_PERIPHERAL = r"""
from paytoken.ble import gatt
W = []
def irq(e, d):
    rec(e, d)
    if e == 3:
        W.append(bytes(ble.gatts_read(d[1])))
ble.irq(irq)
ble.active(True)
svc = (bluetooth.UUID(gatt.SERVICE_UUID), ((bluetooth.UUID(gatt.WRITE_UUID), bluetooth.FLAG_WRITE),
                                           (bluetooth.UUID(gatt.NOTIFY_UUID), bluetooth.FLAG_NOTIFY)))
((rx, tx),) = ble.gatts_register_services((svc,))
ble.gatts_set_buffer(rx, 244)
ble.gap_advertise(100000, gatt.adv_payload(bytes.fromhex(NONCE)))
wait(lambda: W, 10000)
c = data(1)[0]
for f in REPLY:
    ble.gatts_notify(c, tx, bytes.fromhex(f))
    pump(30)
wait(lambda: got(2), 5000)
result(writes=[hx(w) for w in W], events=events())
"""


def rogue_peripheral(radio: BrokerThread, reply: list[str]) -> tuple[DeviceProcess, str]:
    addr = new_addr()
    body = f"NONCE = {NONCE!r}\nREPLY = {reply!r}\n" + ROGUE_PERIPHERAL
    dev = DeviceProcess(radio.address, body, "rogue-peripheral", env={"PAYTOKEN_RADIO_ADDR": addr})
    wait_advertising(radio, "rogue-peripheral")
    return dev, addr


@pytest.mark.parametrize(
    ("reply", "connect", "ops"),
    [
        (["1234"], "frame: expected READY or BUSY", []),  # junk instead of READY
        (["4002", "4002"], "ok", ["frame: bad_header"] * 2),  # READY twice
        (["4002", "810001"], "ok", ["frame: future_seq"] * 2),  # a frame of message 1 first
        (["4002", "8000000341424344"], "ok", ["frame: overrun"] * 2),  # declares 3 bytes, carries 4
    ],
)
def test_malformed_frame_from_payee_ends_session(radio, reply, connect, ops):
    dev, addr = rogue_peripheral(radio, reply)
    pr = payer(radio, addr, [["recv", 3, 3000], ["send", 5]], timeout_ms=3000)
    r, d = results(pr, dev)
    clean(r)
    assert r["connect"] == connect, r
    assert r.get("ops", []) == ops
    assert d["writes"] == ["4001"] and 2 in d["events"]  # OPEN only (no data after a FRAME), then dropped


# --------------------------------------------------------------------------- cost: air and heap

# The four messages of a payment (docs/protocol.md section 2) for a payer-only and a payee-only certificate:
# 189 + 205 bytes payer -> payee, 228 + 124 bytes payee -> payer (make bench: 394 and 352).
PAYMENT = [("payer", 189), ("payee", 228), ("payer", 205), ("payee", 124)]


def payment_ops() -> tuple[list, list]:
    e: list = []
    r: list = []
    for who, n in PAYMENT:
        (r if who == "payer" else e).append(["air", n])
        (e if who == "payer" else r).append(["air_in", n, 10000])
    return e, r


def att_cost(n: int, frame_size: int, by: str) -> tuple[int, int, int]:
    """(ATT PDUs, ATT bytes, L2CAP bytes incl. its 4-byte header) of one message both ways on the link: writes
    with response (3-byte header, and a 1-byte response each) from the payer, notifications (3-byte header)
    from the payee."""
    f = frames(n, frame_size)
    payload = n + 2 * f + 2
    pdus, att = f, payload + 3 * f
    if by == "payer":
        pdus, att = 2 * f, att + f  # + Write Responses
    return pdus, att, att + 4 * pdus


def link_totals(radio: BrokerThread) -> dict[str, int]:
    s = [x for x in radio.links(all=True)][-1]["stats"]
    return {k: s["c2p"][k] + s["p2c"][k] for k in ("pdus", "bytes", "ll_bytes")}


@pytest.mark.parametrize("mtu", [23, 247])
def test_bytes_on_air_per_message(radio, mtu):
    # The broker's count of what crossed the air for a whole payment, minus a session without messages,
    # is exactly the framing's frames with their ATT headers and write responses: nothing else is sent.
    pe, addr = payee(radio, [], kw={"mtu": mtu})
    pr = payer(radio, addr, [], kw={"mtu": mtu})
    for res in results(pe, pr):
        clean(res)
    base = link_totals(radio)
    e_ops, r_ops = payment_ops()
    pe, addr = payee(radio, e_ops, kw={"mtu": mtu})
    pr = payer(radio, addr, r_ops, kw={"mtu": mtu})
    e, r = results(pe, pr)
    for res in (e, r):
        clean(res)
        assert all(o["ok"] for o in res["ops"] if "ok" in o)
    run = link_totals(radio)
    fs = mtu - 3
    want = [att_cost(n, fs, who) for who, n in PAYMENT]
    got = {k: run[k] - base[k] for k in run}
    assert got == {k: sum(w[i] for w in want) for i, k in enumerate(("pdus", "bytes", "ll_bytes"))}
    timing = {n: o["ms"] for o in e["ops"] + r["ops"] if "ok" in o for n in [o["n"]]}
    print(f"\nMTU {mtu}: " + ", ".join(f"{who} {n} B -> {w[0]} PDUs {w[1]} ATT B {w[2]} L2CAP B {timing[n]} ms"
                                       for (who, n), w in zip(PAYMENT, want, strict=True)))


def test_heap_of_each_role(radio):
    # A payment's four messages with each role's BLE layer in a 96 KB heap (the simulator's `bluetooth` module,
    # C in an ESP32's flash, is in it here too: about 47 KB). What the layer itself takes (unix port, 64-bit
    # pointers): its code, loaded from .mpy (none of it in the heap with the firmware frozen), and its data:
    # the 4 KB reassembly buffer, one frame buffer, a few small objects, plus the simulator's own records of
    # the service and the connection (about 1.5 KB).
    e_ops, r_ops = payment_ops()
    pe, addr = payee(radio, e_ops, heapsize="96K")
    pr = payer(radio, addr, r_ops, heapsize="96K")
    e, r = results(pe, pr)
    for res in (e, r):
        clean(res)
        assert all(o["ok"] for o in res["ops"] if "ok" in o)
        code = res["heap_import"]
        data = res["heap_link"] - code
        print(f"\ncode {code} B, data {data} B, after the payment {res['heap_after'] - code} B, "
              f"simulator {res['heap_sim']} B, asyncio parts {res['heap_asyncio']} B")
        assert code < 20_000 and data < 10_000 and res["heap_after"] - code < 11_000, res


# --------------------------------------------------------------------------- more than one role, set-up drops


def test_payee_and_payer_on_one_radio(radio):
    # One device serves payer Z as a payee while it pays payee Y as a payer: one BLE IRQ handler, events
    # routed to the role that owns each connection (MTU 23 with Z, 185 with Y).
    radio.config(ll_payload=251)
    y, y_addr = payee(radio, [["recv", 1000, 10000], ["send", 300]], name="payee-y", kw={"mtu": 185})
    x_addr = new_addr()
    x = Side(radio, "dual", {
        "role": "both",
        "payee": {"nonce": "2222222222222222", "ops": [["recv", 500, 10000], ["send", 700]], "name": "dual"},
        "payer": {"addr": hexaddr(y_addr), "nonce": NONCE, "ops": [["send", 1000], ["recv", 300, 10000]],
                  "delay_ms": 200},
    }, x_addr)
    wait_advertising(radio, "dual")
    z = payer(radio, x_addr, [["send", 500], ["recv", 700, 10000]], name="payer-z", nonce="2222222222222222",
              kw={"mtu": 23})
    rx, ry, rz = results(x, y, z)
    for res in (ry, rz, rx["payee"], rx["payer"]):
        assert res.get("irq_error") is None
    assert "Traceback" not in rx["output"] + ry["output"] + rz["output"]
    assert rx["payee"]["ops"] == ["ok", "ok"] and rx["payee"]["stats"]["frame_size"] == 20
    assert rx["payer"]["ops"] == ["ok", "ok"] and rx["payer"]["stats"]["frame_size"] == 182
    assert ry["ops"] == ["ok", "ok"] and rz["ops"] == ["ok", "ok"]


def test_link_drop_during_set_up(radio):
    # The link drops while the payer waits for READY: connect() raises CLOSED; the payee serves nobody.
    pe, addr = payee(radio, [], delay_ms=1500, accept_ms=500)
    pr = payer(radio, addr, [], timeout_ms=5000)
    # the 8th PDU from the payer is OPEN: every set-up step before it is done
    link = radio.wait_for(lambda: [x for x in radio.links() if x["stats"]["c2p"]["pdus"] >= 8], timeout=10)
    radio.drop(link[0]["link"])
    r, e = results(pr, pe)
    clean(r)
    clean(e)
    assert r["connect"].startswith("closed"), r
    assert e["accept"] == ["timeout: no payer"]


def test_backlog_of_unread_messages_ends_session(radio):
    # Four complete messages wait for recv(); a fifth before the payee reads any ends the session (FRAME),
    # after the four already received are handed out.
    pe, addr = payee(radio, [["sleep", 1500]] + [["recv", 10, 1000]] * 6)
    pr = payer(radio, addr, [["send", 10]] * 5 + [["sleep", 500], ["send", 10]])
    e, r = results(pe, pr)
    clean(e)
    clean(r)
    assert e["ops"] == ["ok"] * 5 + ["frame: backlog"] * 2, e["ops"]
    assert r["ops"][:6] == ["ok"] * 6 and r["ops"][6].startswith("closed"), r["ops"]


def test_link_drop_during_discovery(radio):
    # Slow connection events (100 ms) so the drop lands in service discovery: CLOSED, not UNREACHABLE.
    radio.config(interval_ms=100)
    pe, addr = payee(radio, [], accept_ms=3000)
    pr = payer(radio, addr, [], timeout_ms=8000)
    link = radio.wait_for(lambda: radio.links(), timeout=10)[0]["link"]
    radio.drop(link, after=2)
    r, e = results(pr, pe)
    clean(r)
    clean(e)
    assert r["connect"] == "closed: disconnected during discovery", r
    assert e["accept"] == ["timeout: no payer"]
