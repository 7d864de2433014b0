"""`make bench`, sync over USB serial: a payer card and a payee terminal (main.py, their apps running, each with its
USB serial on a simulated USB-UART bridge paced at 115200 baud) sync through the relay of host/sync_bridge.py
(paytoken_host.sync_bridge_core over the pseudo-terminal) with a real `paytoken-backend serve` on SQLite.
Records per second over serial, and the time from the payee's upload to the payer showing the payment settled
while both are online (the payer's relay waiting on the wake-up long-poll, as `--stay` does)."""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path

from paytoken_host import sync_bridge_core as core
from tests.serial_sync_rig import Rig, paid

EXTRA = 4  # payments made in the bench beside the template's one


def run_serial(rows: list[dict]) -> None:
    print(f"\n== Sync over USB serial (apps running, 115200 baud pseudo-terminal, sync_bridge relay, "
          f"paytoken-backend serve on SQLite, {EXTRA + 1} payments)")
    print(f"{'measure':60} {'payer':>9} {'payee':>9}")
    print("-" * 80)
    with tempfile.TemporaryDirectory(prefix="paytoken-bench-serial-") as tmp_s:
        tmp = Path(tmp_s)
        rig = Rig(paid(tmp / "tpl"), tmp / "run")
        try:
            rig.serve()
            rig.start("payee")
            rig.start("payer")
            for _ in range(EXTRA):
                rig.pay()
            got = {}
            for who in ("payee", "payer"):
                link = core.SerialDeviceLink(rig.usb[who].port, timeout=20)
                try:
                    r = core.relay(link, rig.url)
                finally:
                    link.close()
                ev = rig.until(who, "synced")
                got[who] = {"records": int(ev["uploaded"]), "seconds": r.seconds, "exchanges": r.exchanges,
                            "serial": rig.usb[who].bytes["in"] + rig.usb[who].bytes["out"]}
            # both online: the payer's relay stays on the wake-up long-poll; a new payment; the payee's upload
            # settles it and the payer's relay, woken, brings the payer its status
            stop = threading.Event()
            link = core.SerialDeviceLink(rig.usb["payer"].port, timeout=20)
            waiter = threading.Thread(target=core.relay, args=(link, rig.url), daemon=True,
                                      kwargs={"stay": True, "wait": 5, "should_stop": stop.is_set})
            waiter.start()
            rig.until("payer", "synced")  # the stay relay's first sync (nothing new)
            rig.pay()
            t0 = time.perf_counter()
            plink = core.SerialDeviceLink(rig.usb["payee"].port, timeout=20)
            try:
                core.relay(plink, rig.url)
            finally:
                plink.close()
            ev = rig.until("payer", "synced", 60)
            wake_ms = round((time.perf_counter() - t0) * 1000) if ev["statuses"].startswith("settled") else None
            stop.set()
            waiter.join(timeout=30)
            link.close()
        finally:
            rig.close()
    table = [
        ("records uploaded over serial", lambda g: g["records"]),
        ("sealed exchanges", lambda g: g["exchanges"]),
        ("serial bytes both ways (frames)", lambda g: g["serial"]),
        ("records/s over USB serial at 115200 baud (relay, all included)",
         lambda g: round(g["records"] / g["seconds"], 1)),
    ]
    for name, f in table:
        a, b = f(got["payer"]), f(got["payee"])
        print(f"{name:60} {a!s:>9} {b!s:>9}", flush=True)
        rows.append({"measure": "sync serial: " + name, "payer": a, "payee": b})
    name = "both online: payee's upload -> payer shows settled (ms)"
    print(f"{name:60} {wake_ms!s:>9} {'':>9}", flush=True)
    rows.append({"measure": "sync serial: " + name, "payer": wake_ms, "payee": None})


if __name__ == "__main__":
    run_serial([])
