"""Simulated-radio helpers: MicroPython device processes joined by a broker (paytoken_host.simradio).

A device is one `micropython` process running PRELUDE + a scenario script; the script ends by printing
`RESULT {json}` with what it observed, which `DeviceProcess.result()` returns.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from .mp import ROOT, micropython_command, micropython_path

# MicroPython side: an IRQ recorder that copies everything (the views are only valid during the call) and
# helpers that pump the radio synchronously (bluetooth._pump) while waiting.
PRELUDE = r"""
import bluetooth, json, time, sys, errno
from binascii import hexlify
ble = bluetooth.BLE()
EV = []

def hx(b):
    return hexlify(bytes(b)).decode()

def cp(x):
    if isinstance(x, bluetooth.UUID):
        return str(x)
    if isinstance(x, memoryview):
        return bytes(x)
    return x

def rec(e, d):
    EV.append((e, tuple(cp(x) for x in d)))

def got(e, n=1):
    return len([1 for x in EV if x[0] == e]) >= n

def data(e, i=-1):
    return [x[1] for x in EV if x[0] == e][i]

def events():
    return [x[0] for x in EV]

def result(**kw):
    print("RESULT " + json.dumps(kw))

def wait(pred, ms=4000):
    t0 = time.ticks_ms()
    while not pred():
        if time.ticks_diff(time.ticks_ms(), t0) > ms:
            result(error="timeout", events=events())
            sys.exit(1)
        bluetooth._pump(10)

def pump(ms):
    t0 = time.ticks_ms()
    while time.ticks_diff(time.ticks_ms(), t0) < ms:
        bluetooth._pump(5)

def oserr(f, *a, **k):
    try:
        f(*a, **k)
    except OSError as e:
        return e.errno
    return 0

def adv(name):
    return b"\x02\x01\x06" + bytes((len(name) + 1, 0x09)) + name

def connect_to(name, ms=3000):
    k = len(EV)
    n = len([1 for e, d in EV if e == 7])
    ble.gap_scan(ms, 30000, 30000)
    wait(lambda: [1 for e, d in EV[k:] if e == 5 and name in d[4]])
    at, addr = [(d[0], d[1]) for e, d in EV[k:] if e == 5 and name in d[4]][0]
    ble.gap_connect(at, addr)  # stops the scan (SCAN_DONE)
    wait(lambda: got(7, n + 1))
    return data(7)[0]

SVC = bluetooth.UUID("6E400001-B5A3-F393-E0A9-E50E24DCCA9E")
TX = (bluetooth.UUID("6E400003-B5A3-F393-E0A9-E50E24DCCA9E"), bluetooth.FLAG_READ | bluetooth.FLAG_NOTIFY)
RX = (bluetooth.UUID("6E400002-B5A3-F393-E0A9-E50E24DCCA9E"),
      bluetooth.FLAG_WRITE | bluetooth.FLAG_WRITE_NO_RESPONSE)
"""


class DeviceProcess:
    """A MicroPython device running `body` (after PRELUDE) against the broker at `radio` ("host:port")."""

    def __init__(self, radio: str, body: str, name: str, heapsize: str = "256K", env: dict[str, str] | None = None):
        self.name = name
        env = dict(os.environ, MICROPYPATH=micropython_path(), PAYTOKEN_RADIO=radio, PAYTOKEN_RADIO_NAME=name,
                   **(env or {}))
        self.proc = subprocess.Popen(
            [micropython_command(), "-X", f"heapsize={heapsize}", "-c", PRELUDE + body],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=str(ROOT),
        )
        self.output = ""

    def result(self, timeout: float = 15) -> dict[str, Any]:
        try:
            out, err = self.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
            raise AssertionError(f"{self.name} did not finish in {timeout} s:\n{out}\n{err}") from None
        self.output = out
        for line in out.splitlines():
            if line.startswith("RESULT "):
                res = json.loads(line[7:])
                if "error" in res:
                    raise AssertionError(f"{self.name}: {res}\n{out}\n{err}")
                return res
        raise AssertionError(f"{self.name} gave no result (exit {self.proc.returncode}):\n{out}\n{err}")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()
