# Ledger and wallet numbers for `make bench`, run on MicroPython with a 1 MB emulated flash (LittleFS):
# capacity in payment records, append latency, open-and-recover time, flash bytes per record.
# Records have the wallet's exact formats and sizes; their contents are random (no signing needed to
# measure storage). Prints one JSON line.
import json
import os
import struct
import sys
import time

import vfs

from board.flash import FlashDevice
from paytoken import wallet, wire
from paytoken.ledger import Ledger

ROLE = sys.argv[1] if len(sys.argv) > 1 else "payer"
MODE = sys.argv[2] if len(sys.argv) > 2 else "all"


def records():
    # One payment's ledger records for this role.
    if ROLE == "payer":
        sent = bytes((wallet.K_SENT,)) + struct.pack(wallet._SENT, os.urandom(8), 100, os.urandom(8),
                                                     os.urandom(32), 0, os.urandom(32))
        result = bytes((wallet.K_RESULT,)) + struct.pack(wallet._RESULT, 0, 1, 0, os.urandom(64))
        return (sent, result)
    rcvd = bytes((wallet.K_RCVD,)) + struct.pack(wallet._RCVD, os.urandom(8), 100, 840, 1, 0, os.urandom(32),
                                                 os.urandom(8), os.urandom(32), 0, os.urandom(64), 0, 0)
    return (rcvd,)


class _Trust:
    now = None


def main():
    if MODE == "imports":
        return  # the code alone: what the modules above cost in the heap when loaded from .mpy
    path = "/f/ledger"
    if MODE == "heap":
        # The emulated flash is a 1 MB bytearray in the heap; to measure the ledger and wallet alone the
        # ledger goes to a host file instead (argv[3]).
        path = sys.argv[3]
    else:
        dev = FlashDevice(block_size=4096, block_count=256)  # 1 MB
        vfs.VfsLfs2.mkfs(dev)
        vfs.mount(vfs.VfsLfs2(dev), "/f")
    led = Ledger(path)
    per_payment = sum(6 + len(r) + 4 for r in records())
    times = []
    count = 0
    target = 1 << 30 if MODE == "all" else 5000
    while count < target:
        recs = records()
        try:
            for r in recs:
                t0 = time.ticks_us()
                led.append(r)
                if MODE == "all":
                    times.append(time.ticks_diff(time.ticks_us(), t0))
        except OSError:
            break  # the filesystem is full
        count += 1
    led.close()
    out = {"role": ROLE, "capacity": count, "bytes_per_payment": per_payment}
    if times:
        times.sort()
        out["append_us_median"] = times[len(times) // 2]
        out["append_us_p99"] = times[len(times) * 99 // 100]
    if MODE != "all":
        # A restart: the wallet opens the ledger (CRC and chain of every record) and replays it.
        role = wire.ROLE_PAYER if ROLE == "payer" else wire.ROLE_PAYEE
        cert = wire.cert_body(1, os.urandom(8), role, b"\x02" + os.urandom(32),
                              os.urandom(32) if role == wire.ROLE_PAYEE else None, 840, 10, 10, 1 << 31, 0, 0,
                              bytes(4)) + bytes(64)
        t0 = time.ticks_ms()
        w = wallet.Wallet(path, bytes(32), cert, _Trust())
        out["open_ms"] = time.ticks_diff(time.ticks_ms(), t0)
        out["records"] = w.ledger.seq
        out["balance"] = w.balance
        w.ledger.append(records()[0])  # and it goes on writing
    print(json.dumps(out))


main()
