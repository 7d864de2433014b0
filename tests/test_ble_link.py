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
