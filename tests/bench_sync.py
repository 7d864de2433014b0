"""`make bench`, sealed sync: a payer and a payee (MicroPython unix port, each its own process, its keys and ledger in a
directory) sync straight to a real `paytoken-backend serve` on SQLite over loopback HTTP (the simulator's Wi-Fi:
paytoken.sync_http), and the sync client's smallest heap; then over BLE (run_sync_ble: main.py devices in sync mode on
the virtual radio, a bleak relay on the host). Runs in well under a minute."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import httpx

from tests.backend_rig import Database, free_port, start_server, stop_server
from tests.harness.mp import MicroPython, command, smallest_kb
from tests.protocol_rig import Rig, World
from tests.sync_rig import device_dir, make_backend, run_side, served, unconfirmed_payment

PAYMENTS = 24


class Device:
    """tests/harness/sync_side.py online: `syncs` syncs, the next when go() is called; lines() its SYNCED lines."""

    def __init__(self, source: Path, url: str, syncs: int):
        argv, env = command("2M", module="sync_side", args=(str(source), "4", url, str(syncs)))
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)

    def synced(self) -> dict:
        assert self.proc.stdout
        line = self.proc.stdout.readline().split()
        if line[:1] != ["SYNCED"]:
            raise RuntimeError(f"device failed: {line} {self.proc.stderr.read() if self.proc.stderr else ''}")
        _, done, uploaded, exchanges, ms, token, cursor, statuses = line
        return {"done": done == "True", "uploaded": int(uploaded), "exchanges": int(exchanges), "ms": int(ms),
                "token": token, "cursor": int(cursor), "statuses": statuses.split(",")}

    def go(self) -> None:
        assert self.proc.stdin
        self.proc.stdin.write("\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        self.proc.wait(timeout=30)


def run_sync(rows: list[dict]) -> None:
    print(f"\n== Sealed sync (MicroPython device -> loopback HTTP -> paytoken-backend serve on SQLite, "
          f"{PAYMENTS} payments, 4 records a message)")
    print(f"{'measure':60} {'payer':>9} {'payee':>9}")
    print("-" * 80)
    with tempfile.TemporaryDirectory(prefix="paytoken-bench-sync-") as tmp_s:
        tmp = Path(tmp_s)
        sv = served(tmp, 500_000)
        world, url, key = sv.world, sv.url, sv.key
        sv.backend.engine.dispose()
        shutil.copyfile(tmp / "backend.db", tmp / "fresh.db")  # before any sync: each heap run starts from it
        with MicroPython(heapsize="2M") as mp:
            rig = Rig(mp, world, sv.payer, sv.payee, balance=0)
            assert rig.call(f"pw.apply_update({sv.voucher!r})") is True
            for i in range(PAYMENTS - 1):
                rig.pay(1_000 + i)
            unconfirmed_payment(rig, 5_000)  # its receipt never reaches the payer: the payee's upload settles it
            dirs = {who: device_dir(rig, who, tmp / who) for who in ("payer", "payee")}
        port = free_port()
        server = start_server(url, key, port, workers=1)
        base = f"http://127.0.0.1:{port}"
        try:
            # The payer online first: its payments with receipts settle, the last stays unconfirmed; its relay then
            # waits for news (GET /v1/wake) while the payee comes online and uploads that payment's receipt.
            payer_dev = Device(dirs["payer"], base, 2)
            first = payer_dev.synced()
            woken: dict = {}

            def wait() -> None:
                r = httpx.get(f"{base}/v1/wake/{first['token']}", params={"since": first["cursor"], "wait": 30},
                              timeout=40)
                woken["at"] = time.perf_counter()
                woken.update(r.json())

            waiter = threading.Thread(target=wait)
            waiter.start()
            time.sleep(0.5)  # the long-poll is held before the payee comes online
            t0 = time.perf_counter()
            payee_dev = Device(dirs["payee"], base, 1)
            second = payee_dev.synced()
            waiter.join(timeout=40)
            t_woken = time.perf_counter()
            payer_dev.go()
            again = payer_dev.synced()
            t1 = time.perf_counter()
            payer_dev.close()
            payee_dev.close()
        finally:
            stop_server(server)
        both = {"payer": first, "payee": second}
        table = [
            ("records uploaded", lambda r: r["uploaded"]),
            ("sealed exchanges", lambda r: r["exchanges"]),
            ("records/s, device POSTs over loopback HTTP", lambda r: round(r["uploaded"] / (r["ms"] / 1000), 1)),
            ("ms per sealed exchange (device side, all included)", lambda r: round(r["ms"] / r["exchanges"], 1)),
        ]
        for name, f in table:
            a, b = f(both["payer"]), f(both["payee"])
            print(f"{name:60} {a!s:>9} {b!s:>9}", flush=True)
            rows.append({"measure": "sync: " + name, "payer": a, "payee": b})
        settled = first["statuses"][-1] == "unconfirmed" and again["statuses"][-1] == "settled" \
            and woken.get("wake") is True
        for name, ms in (("both online: payee starts its sync -> payer shows settled (ms)", (t1 - t0) * 1000),
                         ("  of which: payer woken -> payer shows settled (ms)", (t1 - t_woken) * 1000)):
            value = round(ms) if settled else None
            print(f"{name:60} {value!s:>9} {'':>9}", flush=True)
            rows.append({"measure": "sync: " + name, "payer": value, "payee": None})
        # The smallest heap each side's whole first sync needs, the code in place from the ROMFS image (as on a
        # device); every run against a fresh copy of the backend's database from before any sync.
        heaps = {}
        for who in ("payer", "payee"):
            heaps[who] = smallest_kb(lambda kb, who=who: fresh_run(tmp, world, dirs[who], f"{kb}K"), 48, 192)
        name = f"heap: first sync of {PAYMENTS} payments, code in place from ROMFS (KB)"
        print(f"{name:60} {heaps['payer']!s:>9} {heaps['payee']!s:>9}", flush=True)
        rows.append({"measure": "sync: " + name, "payer": heaps["payer"], "payee": heaps["payee"]})
    run_sync_ble(rows)


def run_sync_ble(rows: list[dict]) -> None:
    """The same sealed sync over BLE: a payer and a payee that paid each other offline (main.py on the virtual radio,
    30 ms connection interval) in sync mode, relayed by paytoken_host.sync_ble.BleDeviceLink to `paytoken-backend
    serve` (tests/sync_ble_rig.py)."""
    from tests.sync_ble_rig import paid_images, quiet, relay, running

    print("\n== Sealed sync over BLE (main.py devices on the virtual radio, 30 ms connection interval, bleak relay "
          "on the host -> paytoken-backend serve on SQLite, one payment)")
    print(f"{'measure':60} {'payer':>9} {'payee':>9}")
    print("-" * 80)
    found: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="paytoken-bench-sync-ble-") as tmp_s:
        tmp = Path(tmp_s)
        (tmp / "paid").mkdir()
        paid = paid_images(tmp / "paid")
        with running(paid, tmp) as rig:
            for who in ("payer", "payee"):
                rig.sync_mode(who)
                t0 = time.perf_counter()
                with rig.link(who) as link:
                    t1 = time.perf_counter()
                    exchanges = relay(link, rig.url)
                    t2 = time.perf_counter()
                end = rig.devices[who].until("sync_ble_end", quiet)
                found[who] = {"connect": t1 - t0, "relay": t2 - t1, "exchanges": exchanges,
                              "uploaded": int(end["uploaded"]), "done": end["done"] == "1"}
    table = [
        ("BLE: records uploaded", lambda r: r["uploaded"]),
        ("BLE: sealed exchanges", lambda r: r["exchanges"]),
        ("BLE: records synced/s, relay connected (30 ms interval)", lambda r: round(r["uploaded"] / r["relay"], 2)),
        ("BLE: ms per sealed exchange (BLE both ways + backend)", lambda r: round(r["relay"] * 1000 / r["exchanges"])),
        ("BLE: s to find the device and open the link", lambda r: round(r["connect"], 2)),
    ]
    for name, f in table:
        a, b = (f(found[w]) if found[w]["done"] else None for w in ("payer", "payee"))
        print(f"{name:60} {a!s:>9} {b!s:>9}", flush=True)
        rows.append({"measure": "sync: " + name, "payer": a, "payee": b})


def fresh_run(tmp: Path, world: World, source: Path, heapsize: str) -> bool:
    shutil.copyfile(tmp / "fresh.db", tmp / "run.db")
    backend = make_backend(Database("sqlite", f"sqlite:///{tmp}/run.db"), world, time.time)
    try:
        return run_side(backend, source, heapsize, romfs=True) is not None
    finally:
        backend.engine.dispose()


if __name__ == "__main__":
    run_sync([])
