# One side of a BLE session in its own MicroPython process, over the simulated radio (tests/test_ble_link.py):
#   echo '<json>' | micropython ble_side.py      prints "RESULT <json>" at the end
# (parameters on stdin: the unix port makes every argv item a qstr, and one over 255 bytes is fatal)
#
# The JSON says the role ("payee": Peripheral + accept, "payer": connect) and a list of operations to run
# on the Link once it is up; each operation's outcome goes into the result, so a test reads what every call
# returned or raised (LinkError reason and detail), in order. Messages are a pattern of their length and
# number, so the receiver checks every byte without the test shipping them.
#
#   ["send", n]            send message n bytes long          -> "ok" | "<reason>: <detail>"
#   ["recv", n, ms]        receive, expect the n-byte message  -> "ok" | "bad <len>" | "<reason>: <detail>"
#   ["sleep", ms]          let time pass (the loop runs)       -> "ok"
#   ["close"]              link.close()                        -> "ok"
#   ["stats"]              the link's counters                 -> {frames_out, bytes_out, ...}
#   ["air", n]             send n bytes and report what it took: {n, frames, bytes, ms}
#   ["air_in", n, ms]      receive the n-byte message and report: {n, frames, bytes, ms}
import asyncio
import gc
import json
import sys
import time

gc.collect()
HEAP0 = gc.mem_alloc()

import bluetooth  # noqa: E402

from paytoken.framing import MAX_MESSAGE  # noqa: E402
from paytoken.link import LinkError  # noqa: E402


def _link_kw(p):
    # The link tests exercise every message size the framing allows; the apps use the session's smaller limit.
    kw = {"max_message": MAX_MESSAGE}
    kw.update(p.get("kw", {}))
    return kw


def pattern(n, k):
    b = bytearray(n)
    for i in range(n):
        b[i] = (i * 7 + n + k * 13) & 0xFF
    return bytes(b)


def why(e):
    return str(e)  # "reason" or "reason: detail"


async def run_ops(link, ops, res):
    sent = 0
    got = 0
    out = []
    for op in ops:
        name = op[0]
        try:
            if name == "send":
                await link.send(pattern(op[1], sent))
                sent += 1
                out.append("ok")
            elif name == "recv":
                m = await link.recv(op[2])
                out.append("ok" if m == pattern(op[1], got) else "bad %d" % len(m))
                got += 1
            elif name == "sleep":
                await asyncio.sleep_ms(op[1])
                out.append("ok")
            elif name == "close":
                link.close()
                out.append("ok")
            elif name == "stats":
                out.append(stats(link))
            elif name == "air":
                f, b, t = link.frames_out, link.bytes_out, time.ticks_ms()
                await link.send(pattern(op[1], sent))
                sent += 1
                out.append({"n": op[1], "frames": link.frames_out - f, "bytes": link.bytes_out - b,
                            "ms": time.ticks_diff(time.ticks_ms(), t), "frame_size": link.frame_size})
            elif name == "air_in":
                f, b, t = link.frames_in, link.bytes_in, time.ticks_ms()
                m = await link.recv(op[2])
                ok = m == pattern(op[1], got)
                got += 1
                out.append({"n": op[1], "ok": ok, "frames": link.frames_in - f, "bytes": link.bytes_in - b,
                            "ms": time.ticks_diff(time.ticks_ms(), t)})
            else:
                out.append("unknown op")
        except LinkError as e:
            out.append(why(e))
    res["ops"] = out
    res["closed"] = link.closed
    res["stats"] = stats(link)


def stats(link):
    return {"frames_out": link.frames_out, "bytes_out": link.bytes_out, "frames_in": link.frames_in,
            "bytes_in": link.bytes_in, "stalls": link.stalls, "frame_size": link.frame_size}


def heap():
    gc.collect()
    return gc.mem_alloc()


async def payee(p, res):
    from paytoken.ble.peripheral import Peripheral

    res["heap_import"] = heap() - res["heap_base"]
    per = Peripheral(ble, p.get("name", "paytoken-test"), **_link_kw(p))
    per.start(bytes.fromhex(p["nonce"]))
    res["heap_ready"] = heap() - res["heap_base"]
    res["address"] = [per.address()[0], per.address()[1].hex()]
    if p.get("delay_ms"):
        await asyncio.sleep_ms(p["delay_ms"])
    if p.get("no_accept"):  # advertise and let centrals connect, but never serve one
        await asyncio.sleep_ms(p["no_accept"])
        per.stop()
        return
    for k in range(p.get("sessions", 1)):
        if k:  # as the payee app does: one payer per start(), a fresh start for the next
            per.stop()
            per.start(bytes.fromhex(p["nonce"]))
        t = time.ticks_ms()
        try:
            link = await per.accept(p.get("accept_ms", 10000))
        except LinkError as e:
            res.setdefault("accept", []).append(why(e))
            continue
        res.setdefault("accept", []).append("ok")
        res["accept_ms"] = time.ticks_diff(time.ticks_ms(), t)
        res["heap_link"] = heap() - res["heap_base"]
        await run_ops(link, p.get("ops", []), res)
        res["heap_after"] = heap() - res["heap_base"]
        if p.get("close", True):
            link.close()
    # A device keeps running after a session: wait as it would until the payer has left (or the payee's
    # linger ended the connection), so that notifications still queued in the radio are delivered.
    t = time.ticks_ms()
    while per._conns and time.ticks_diff(time.ticks_ms(), t) < 5000:
        await asyncio.sleep_ms(20)
    if p.get("stop", True):
        per.stop()
    res["irq_error"] = repr(per.irq_error) if per.irq_error else None


async def payer(p, res):
    from paytoken.ble import central

    res["heap_import"] = heap() - res["heap_base"]
    addr = bytes.fromhex(p["addr"])
    if p.get("delay_ms"):
        await asyncio.sleep_ms(p["delay_ms"])
    t = time.ticks_ms()
    try:
        link = await central.connect(ble, p.get("addr_type", 0), addr, bytes.fromhex(p["nonce"]),
                                     p.get("timeout_ms", 8000), **_link_kw(p))
    except LinkError as e:
        res["connect"] = why(e)
        res["connect_ms"] = time.ticks_diff(time.ticks_ms(), t)
        await asyncio.sleep_ms(200)  # a device runs on: its disconnect reaches the air before the process ends
        return
    res["connect"] = "ok"
    res["connect_ms"] = time.ticks_diff(time.ticks_ms(), t)
    from paytoken.ble.irq import dispatcher

    c = dispatcher(ble).central
    res["via_scan"] = c.via_scan
    res["att_mtu"] = c.att_mtu
    res["heap_link"] = heap() - res["heap_base"]
    await run_ops(link, p.get("ops", []), res)
    res["heap_after"] = heap() - res["heap_base"]
    if p.get("close", True):
        link.close()
    await asyncio.sleep_ms(p.get("linger_ms", 100))
    res["irq_error"] = repr(c.irq_error) if c.irq_error else None


async def main(p):
    res = {}
    global ble
    ble = bluetooth.BLE()
    ble.active(True)
    if "mtu" in p:
        ble.config(mtu=p["mtu"])
    # Not the BLE layer's cost: the simulator's GATT halves (in C on an ESP32), loaded on first use, the
    # framing and link modules the rest of the firmware shares, and asyncio's parts loaded on first use.
    import _bluetooth_gattc  # noqa: F401
    import _bluetooth_gatts  # noqa: F401

    import paytoken.framing  # noqa: F401
    import paytoken.link  # noqa: F401

    res["heap_asyncio"] = heap()
    asyncio.ThreadSafeFlag  # noqa: B018
    asyncio.wait_for_ms  # noqa: B018
    res["heap_asyncio"] = heap() - res["heap_asyncio"]

    res["heap_base"] = heap()
    res["heap_sim"] = res["heap_base"] - HEAP0
    try:
        if p["role"] == "both":  # payee and payer at once on one radio (one IRQ dispatcher for both)
            res["payee"] = {"heap_base": res["heap_base"]}
            res["payer"] = {"heap_base": res["heap_base"]}
            await asyncio.gather(payee(p["payee"], res["payee"]), payer(p["payer"], res["payer"]))
        else:
            await (payee(p, res) if p["role"] == "payee" else payer(p, res))
    finally:
        print("RESULT " + json.dumps(res))


ble = None
asyncio.run(main(json.loads(sys.stdin.readline())))
