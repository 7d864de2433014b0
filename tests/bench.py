"""`make bench`: speed and memory of the firmware on the real MicroPython unix port, as a printed table.

Each firmware operation is timed in its own `micropython` process (median of many runs) twice: with
a roomy heap and inside the ESP32-like 32 KB heap, where garbage collection costs what it would on
the device. "min heap" is the smallest -X heapsize (1 KB steps) in which importing the module and
running the operation once succeeds: the RAM it needs, code included (modules loaded from .mpy files go
into the heap). The protocol and ledger tables also run the code in place from the firmware's ROMFS
image, as `make deploy` puts it on an ESP32's romfs partition: there only the working set is in the heap.
All heap figures are for the 64-bit unix port (8-byte pointers, 32-byte GC blocks); the same objects are
smaller on the 32-bit ESP32 (4-byte pointers, 16-byte blocks).
The host column is the `cryptography` package on CPython for the same operation.
The provisioning table times the USB provisioning station (host/provision.py) against a simulated device over its
pseudo-terminal at 115200 baud, without flashing, and counts the serial bytes.
Then the sealed sync (tests/bench_sync.py): records per second from a simulated device straight to the backend over
loopback HTTP, the time until the other device shows the status when both are online, and the sync client's heap;
then the same over USB serial (tests/bench_sync_serial.py): the apps running, host/sync_bridge.py's relay on the
simulated USB-UART bridge's pseudo-terminal at 115200 baud.
The last table is the settlement backend's (tests/bench_backend.py): settled payments per second through its HTTP
API on SQLite and PostgreSQL beside the machine's P-256 verification limit (PostgreSQL, which has the target, is
run five times, each against the limit measured right before and after it: its row is the median run).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from paytoken_host import fwbuild
from tests.harness.mp import (
    FIRMWARE_BUILD,
    FROZEN,
    command,
    frozen_launcher,
    romfs_with,
    run_script,
    smallest_kb,
    word_bits,
)

RUNS = 41
TIMING = """
import time, gc
{setup}
def _op():
    {expr}
_op()
ts = []
for _ in range({runs}):
    t0 = time.ticks_us()
    _op()
    ts.append(time.ticks_diff(time.ticks_us(), t0))
ts.sort()
print(ts[len(ts) // 2])
"""


@dataclass
class Op:
    name: str
    setup: str  # MicroPython source run once
    expr: str  # MicroPython statement timed
    target_ms: float | None
    host: Callable[[], Callable[[], object]] | None  # builds the cryptography-side callable


def median_us(setup: str, expr: str, heapsize: str) -> float | None:
    proc = run_script(TIMING.format(setup=setup, expr=expr, runs=RUNS), heapsize=heapsize, timeout=600)
    if proc.returncode != 0:
        return None
    return float(proc.stdout.split()[-1])


def min_heap_kb(setup: str, expr: str, lo: int = 8, hi: int = 256) -> int | None:
    source = f"{setup}\n{expr}\n"
    return smallest_kb(lambda kb: run_script(source, heapsize=f"{kb}K").returncode == 0, lo, hi)


def host_median_us(factory: Callable[[], Callable[[], object]]) -> float:
    fn = factory()
    fn()
    samples = []
    for _ in range(200):
        t0 = time.perf_counter_ns()
        fn()
        samples.append((time.perf_counter_ns() - t0) / 1000)
    return statistics.median(samples)


def crypto_ops() -> list[Op]:
    from paytoken_host.devtools import benchhost as h

    key = f"d = bytes.fromhex('{os.urandom(32).hex()}')"
    peer = f"from paytoken.crypto import p256\npeer = p256.public_key(bytes.fromhex('{os.urandom(32).hex()}'))"
    msg = f"msg = bytes.fromhex('{os.urandom(100).hex()}')"
    # Random data: zero bytes would become small ints in MicroPython and flatter the timings.
    gcm = f"k, n, pt, ad = [bytes.fromhex(x) for x in {[os.urandom(n).hex() for n in (32, 12, 256, 32)]!r}]"
    return [
        Op("P-256 public key", f"from paytoken.crypto import p256\n{key}", "p256.public_key(d)", None,
           h.p256_keygen),
        Op("P-256 sign (RFC 6979)", f"from paytoken.crypto import p256\n{key}\n{msg}", "p256.sign(d, msg)", 2.5,
           h.p256_sign),
        Op("P-256 verify", f"from paytoken.crypto import p256\n{key}\n{msg}\npub = p256.public_key(d)\n"
           "sig = p256.sign(d, msg)", "p256.verify(pub, msg, sig)", 6.0, h.p256_verify),
        Op("P-256 ECDH", f"{peer}\n{key}", "p256.ecdh(d, peer)", 5.0, h.p256_ecdh),
        Op("X25519 shared", f"from paytoken.crypto import x25519\n{key}\npub = x25519.public_key(d)",
           "x25519.shared(d, pub)", 3.0, h.x25519_shared),
        Op("X25519 public key", f"from paytoken.crypto import x25519\n{key}", "x25519.public_key(d)", 3.0,
           h.x25519_public),
        Op("AES-256-GCM encrypt 256 B", f"from paytoken.crypto import aesgcm\n{gcm}",
           "aesgcm.encrypt(k, n, pt, ad)", 1.0, h.aesgcm_encrypt),
        Op("AES-256-GCM decrypt 256 B", f"from paytoken.crypto import aesgcm\n{gcm}\nct = aesgcm.encrypt(k, n, pt, ad)",
           "aesgcm.decrypt(k, n, ct, ad)", 1.0, h.aesgcm_decrypt),
        Op("HMAC-SHA256 64 B", "from paytoken.crypto import kdf\nk = bytes(32)\nm = bytes(64)",
           "kdf.hmac_sha256(k, m)", None, h.hmac_sha256),
        Op("HKDF-SHA256 64 B out", "from paytoken.crypto import kdf\nk = bytes(32)",
           "kdf.hkdf_sha256(b'salt', k, b'info', 64)", None, h.hkdf_sha256),
    ]


def ui_ops() -> list[Op]:
    from paytoken import base45, wire

    qr = base45.encode(wire.qr_payload(os.urandom(4), os.urandom(6), False, os.urandom(32), os.urandom(8)))
    fb = "import framebuf\nbuf = bytearray(128 * 64 // 8)\nfb = framebuf.FrameBuffer(buf, 128, 64, framebuf.MONO_HLSB)"
    return [
        Op("QR encode, 77-char payload, L", f"from paytoken import qr\ntext = {qr!r}", "qr.encode(text, 'L')", None,
           None),
        Op("payee QR screen 128x64", f"from paytoken.ui import screens\n{fb}\ntext = {qr!r}",
           "screens.render(fb, 128, 64, ('payee_qr', text))", None, None),
    ]


def run_ops(title: str, ops: list[Op], rows: list[dict]) -> None:
    header = (
        f"{'operation':28} {'uPy ms':>8} {'uPy ms@32K':>10} {'target':>7} {'host us':>8} {'min heap':>9} "
        f"{'32K ok':>6}"
    )
    print(title)
    print(header)
    print("-" * len(header))
    for op in ops:
        roomy = median_us(op.setup, op.expr, "1M")
        small = median_us(op.setup, op.expr, "32K")
        host = host_median_us(op.host) if op.host else None
        heap = min_heap_kb(op.setup, op.expr)
        row = {
            "operation": op.name,
            "upy_ms": roomy and roomy / 1000,
            "upy_ms_32k": small and small / 1000,
            "target_ms": op.target_ms,
            "host_ms": host and host / 1000,
            "min_heap_kb": heap,
            "fits_32k": heap is not None and heap <= 32,
        }
        rows.append(row)
        met = "" if op.target_ms is None or roomy is None else (" ok" if roomy / 1000 <= op.target_ms else " MISS")
        print(
            f"{op.name:28} {fmt(row['upy_ms']):>8} {fmt(row['upy_ms_32k']):>10} "
            f"{fmt(op.target_ms, 1):>7} {fmt(row['host_ms'] and row['host_ms'] * 1000, 1):>8} {str(heap) + ' KB':>9} "
            f"{'yes' if row['fits_32k'] else 'NO':>6}{met}",
            flush=True,
        )


def fmt(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def run_crypto(rows: list[dict]) -> None:
    run_ops("\n== Firmware crypto core (MicroPython unix port; host = cryptography on CPython)", crypto_ops(), rows)


BENCH_SCRIPTS = ("payment_side", "ledger_bench")
HEAP_RUNS = 4  # payments that must all succeed at a heap size for it to count
FROZEN_RUNS = 3  # the same for the BLE payment with the firmware frozen in (3 s each)


def bench_image() -> Path:
    """A ROMFS image of the firmware with the bench's scripts compiled beside it (on a device the application's
    code sits in the image too); its lib/ also serves the runs with code loaded from .mpy files."""
    return romfs_with(BENCH_SCRIPTS)


def script_args(romfs: bool) -> dict:
    return {"romfs": romfs, "extra_path": [] if romfs else [bench_image().parent / "lib"], "image": bench_image()}


def side_process(role: str, heapsize: str, *extra: str, romfs: bool = False) -> subprocess.Popen:
    argv, env = command(heapsize, module="payment_side", args=(role, *extra), **script_args(romfs))
    return subprocess.Popen(
        argv,
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )


def payment_setup(tmp: str) -> tuple[list[str], list[str], int]:
    from paytoken import wire
    from tests.protocol_rig import NOW, World

    world = World()
    payer, payee = world.device(wire.ROLE_PAYER), world.device(wire.ROLE_PAYEE)
    qr = wire.qr_payload(payee.device_id[:4], bytes(6), False, payee.static[1], os.urandom(8))
    amount = 10_000
    common = [world.issuer.public.hex(), world.backend_pub.hex()]
    payer_lines = common + [payer.priv.hex(), payer.cert.hex(), "00", "00", qr.hex(),
                            world.voucher(payer, 1, 100_000).hex(), f"{tmp}/payer.log", f"{NOW} {amount}"]
    payee_lines = common + [payee.priv.hex(), payee.cert.hex(), payee.static[0].hex(), payee.static[1].hex(),
                            qr.hex(), "", f"{tmp}/payee.log", f"{NOW} {amount}"]
    return payer_lines, payee_lines, amount


def run_payment(payer_heap: str, payee_heap: str, romfs: tuple[str, ...] = ()) -> dict | None:
    """A whole payment between two MicroPython processes; None if either side failed (e.g. out of heap).

    The roles named in romfs run their code in place from the ROMFS image (mp.command)."""
    with tempfile.TemporaryDirectory() as tmp:
        return _run_payment(payer_heap, payee_heap, tmp, romfs)


def _run_payment(payer_heap: str, payee_heap: str, tmp: str, romfs: tuple[str, ...]) -> dict | None:
    payer_lines, payee_lines, _ = payment_setup(tmp)
    # The payer's top-up came in through an earlier sync: its ledger holds the voucher when it pays.
    topup = side_process("payer", "2M", "topup")
    out, err = topup.communicate("\n".join(payer_lines) + "\n", timeout=60)
    if topup.returncode != 0 or not out.startswith("topped up"):
        raise RuntimeError(f"top-up failed: {out} {err}")
    payer_lines[-3] = ""  # no voucher to apply in the payment itself
    a = side_process("payer", payer_heap, romfs="payer" in romfs)
    b = side_process("payee", payee_heap, romfs="payee" in romfs)
    sizes = {"to_payee": 0, "to_payer": 0, "round_trips": 0}
    try:
        a.stdin.write("\n".join(payer_lines) + "\n")
        a.stdin.flush()
        b.stdin.write("\n".join(payee_lines) + "\n")
        b.stdin.flush()
        for _ in range(2):
            msg = a.stdout.readline().strip()
            if not msg:
                return None
            sizes["to_payee"] += len(msg) // 2
            b.stdin.write(msg + "\n")
            b.stdin.flush()
            reply = b.stdout.readline().strip()
            if not reply:
                return None
            sizes["to_payer"] += len(reply) // 2
            sizes["round_trips"] += 1
            a.stdin.write(reply + "\n")
            a.stdin.flush()
        done_a, done_b = a.stdout.readline().split(), b.stdout.readline().split()
    except BrokenPipeError:
        return None  # a side died, typically out of heap
    finally:
        for proc in (a, b):
            try:
                proc.stdin.close()
            except BrokenPipeError:
                pass
            proc.wait(timeout=60)
    if len(done_a) != 4 or len(done_b) != 4 or done_a[1] != "done" or done_b[1] != "done":
        return None
    return {**sizes, "cpu_payer_ms": int(done_a[3]) / 1000, "cpu_payee_ms": int(done_b[3]) / 1000}


def min_side_heap(role: str, imports_only: bool = False, romfs: bool = False, lo: int = 8, hi: int = 512
                  ) -> int | None:
    def fits(kb: int) -> bool:
        if imports_only:
            proc = side_process(role, f"{kb}K", "imports", romfs=romfs)
            proc.stdin.close()
            return proc.wait(timeout=60) == 0
        heaps = {"payer": f"{kb}K", "payee": "2M"} if role == "payer" else {"payer": "2M", "payee": f"{kb}K"}
        # Fresh keys and nonces change big-int sizes and so the heap's layout: a size counts only if
        # several payments all fit in it.
        return all(run_payment(heaps["payer"], heaps["payee"], (role,) if romfs else ()) for _ in range(HEAP_RUNS))

    return smallest_kb(fits, lo, hi)


def run_protocol(rows: list[dict]) -> None:
    print("\n== Offline payment protocol (payer and payee each in its own MicroPython process)")
    runs = [run_payment("2M", "2M") for _ in range(9)]
    ok = [r for r in runs if r]
    if not ok:
        print("payment failed")
        return
    first = ok[0]
    cpu_payer = statistics.median(r["cpu_payer_ms"] for r in ok)
    cpu_payee = statistics.median(r["cpu_payee_ms"] for r in ok)
    total = first["to_payee"] + first["to_payer"]
    print(f"{'measure':44} {'value':>10} {'target':>10}")
    print("-" * 66)
    table = [
        ("bytes over the air, payer -> payee", first["to_payee"], None),
        ("bytes over the air, payee -> payer", first["to_payer"], None),
        ("bytes over the air, total", total, "<= 1500"),
        ("round trips after connect", first["round_trips"], "<= 2"),
        ("CPU per payment, payer (ms, median of 9)", round(cpu_payer, 2), "<= 25"),
        ("CPU per payment, payee (ms, median of 9)", round(cpu_payee, 2), "<= 25"),
    ]
    for role in ("payer", "payee"):
        table.append((f"heap, {role}: code loaded from .mpy files (KB)", min_side_heap(role, True), None))
        table.append((f"heap, {role}: whole payment, .mpy files (KB)", min_side_heap(role), None))
        table.append((f"heap, {role}: code in place from ROMFS (KB)", min_side_heap(role, True, True), None))
        table.append((f"heap, {role}: whole payment, ROMFS (KB)", min_side_heap(role, romfs=True), "<= 64"))
    for name, value, target in table:
        print(f"{name:44} {value!s:>10} {target or '':>10}", flush=True)
        rows.append({"measure": name, "value": value, "target": target})


def ledger_script(role: str, mode: str, heapsize: str, romfs: bool = False) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory() as tmp:
        argv, env = command(heapsize, module="ledger_bench", args=(role, mode, f"{tmp}/ledger"),
                            **script_args(romfs))
        return subprocess.run(
            argv,
            capture_output=True, text=True, env=env, timeout=600,
        )


def run_ledger(rows: list[dict]) -> None:
    print("\n== Flash ledger and wallet (1 MB emulated NOR flash with LittleFS v2, MicroPython)")
    print(f"{'measure':52} {'payer':>9} {'payee':>9} {'target':>9}")
    print("-" * 82)
    res = {}
    for role in ("payer", "payee"):
        full = json.loads(ledger_script(role, "all", "2M").stdout)
        opened = json.loads(ledger_script(role, "open", "2M").stdout)

        def min_heap(mode: str, romfs: bool, role: str = role) -> int | None:
            return smallest_kb(lambda kb: ledger_script(role, mode, f"{kb}K", romfs).returncode == 0, 4, 160)

        res[role] = {**full, "open_ms": opened["open_ms"], "code_kb": min_heap("imports", False),
                     "heap_kb": min_heap("heap", False), "rom_code_kb": min_heap("imports", True),
                     "rom_heap_kb": min_heap("heap", True)}
    table = [
        ("payment records in a 1 MB filesystem", "capacity", ">= 5000"),
        ("flash bytes per payment (records + framing)", "bytes_per_payment", None),
        ("append latency, median (us)", "append_us_median", None),
        ("append latency, p99 (us)", "append_us_p99", None),
        ("open and recover with 5,000 payments (ms)", "open_ms", None),
        ("heap: code loaded from .mpy files (KB)", "code_kb", None),
        ("heap: open + replay 5,000 + append, .mpy files (KB)", "heap_kb", None),
        ("heap: code in place from ROMFS (KB)", "rom_code_kb", None),
        ("heap: open + replay 5,000 + append, ROMFS (KB)", "rom_heap_kb", "<= 64"),
    ]
    for name, key, target in table:
        a, b = res["payer"][key], res["payee"][key]
        print(f"{name:52} {a!s:>9} {b!s:>9} {target or '':>9}", flush=True)
        rows.append({"measure": name, "payer": a, "payee": b, "target": target})


def romfs_launcher(heap: str) -> tuple[list[str], dict[str, str]]:
    """main.py as on an ESP32 with a romfs partition: the firmware in place from its image (mp.command)."""
    return command(heap, source="import boot\nimport main", romfs=True)


def run_ble(rows: list[dict]) -> None:
    """The seed's payment between two devices over the virtual BLE radio (host/paytoken_host/demo.py): each
    device is main.py in its own MicroPython process with display, scanner, buttons, flash image and radio."""
    from paytoken_host.demo import DemoError, Launcher, files_launcher, pay

    print("\n== Offline payment over BLE (two simulated ESP32s, 30 ms connection interval)")
    print(f"{'measure':52} {'payer':>9} {'payee':>9} {'target':>9}")
    print("-" * 82)
    firmware = FIRMWARE_BUILD

    def once(work: Path):
        try:
            return pay(work, firmware, launch=files_launcher)
        except DemoError:
            return None

    def paid(work: Path, heaps: dict[str, str], launch: Launcher) -> bool:
        try:
            pay(work, firmware, heaps=heaps, launch=launch, screens=False)
            return True
        except DemoError:
            return False

    def min_heap(work: Path, role: str, launch: Launcher, lo: int = 32, hi: int = 512, runs: int = 1
                 ) -> int | None:
        # runs > 1: a size counts only if that many payments in a row succeed in it (fresh keys and nonces
        # change big-int sizes, the radio's timing the heap's layout)
        heaps = {"payer": "1M", "payee": "1M"}
        return smallest_kb(lambda kb: all(paid(work, {**heaps, role: f"{kb}K"}, launch) for _ in range(runs)),
                           lo, hi)

    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp) / "run"
        runs = [r for r in (once(work) for _ in range(3)) if r is not None]
        if not runs:
            print("payment failed")
            return
        seconds = statistics.median(r.seconds for r in runs)
        cpu = {role: statistics.median(r.cpu[role] for r in runs) * 1000 for role in ("payer", "payee")}
        air = runs[0].air
        heap = {role: {"rom": min_heap(work, role, romfs_launcher), "mpy": min_heap(work, role, files_launcher),
                       "frozen": min_heap(work, role, frozen_launcher, 32, 192, FROZEN_RUNS) if FROZEN else "-"}
                for role in ("payer", "payee")}
        both = "-"
        if FROZEN:  # the budget itself: both devices at once at 96 KB, a few payments
            ok = sum(paid(work, {"payer": "96K", "payee": "96K"}, frozen_launcher) for _ in range(FROZEN_RUNS))
            both = f"{ok} of {FROZEN_RUNS}"
    bits = word_bits(FROZEN) if FROZEN else None
    table = [
        ("QR scanned -> both records stored (s, median of 3)", round(seconds, 2), "", None),
        ("CPU over that span, whole process (ms)", round(cpu["payer"]), round(cpu["payee"]), None),
        ("ATT bytes over the air, sent by (bytes)", air["to_payee"], air["to_payer"], None),
        ("ATT PDUs over the air, both ways", air["pdus"], "", None),
        ("heap: main.py, code in place from ROMFS (KB) [2]", heap["payer"]["rom"], heap["payee"]["rom"], None),
        ("heap: main.py, code from .mpy files (KB) [2]", heap["payer"]["mpy"], heap["payee"]["mpy"], None),
        (f"heap: main.py, firmware frozen in, {bits or '?'}-bit (KB) [1]", heap["payer"]["frozen"],
         heap["payee"]["frozen"], "<= 96" if bits == 32 else None),
        ("both at once in -X heapsize=96K, frozen [1] (paid)", both, "", "all" if bits == 32 else None),
    ]
    for name, a, b, target in table:
        print(f"{name:52} {a!s:>9} {b!s:>9} {target or '':>9}", flush=True)
        rows.append({"measure": name, "payer": a, "payee": b, "target": target})
    print("[1] a unix port with the firmware frozen in, as a production ESP32 image: "
          + (f"PAYTOKEN_FROZEN_MICROPYTHON, {bits}-bit" if FROZEN
             else "not measured: set PAYTOKEN_FROZEN_MICROPYTHON") + " (make frozen-unix MICROPYTHON_SRC=...). "
          "The 96 KB budget is an ESP32's, so it is held by the 32-bit build (FROZEN_BITS=32, the default).")
    print("[2] the stock unix port from PyPI: 64-bit, so each object takes up to twice its ESP32 size (8-byte "
          "pointers, 32-byte GC blocks), and the code's strings, functions and classes are in the heap too.")


def run_provisioning(rows: list[dict]) -> None:
    """USB provisioning of one simulated device (paytoken_host.simstation): the station's steps from IDENTIFY to
    FINALISE over the pty at 115200 baud, and host/provision.py as an operator runs it (its start-up included)."""
    from paytoken import wire
    from paytoken_host import simdevice, station
    from paytoken_host.simstation import SimBoard, SimStation

    print("\n== USB provisioning (simulated device, pty at 115200 baud, no flashing)")
    print(f"{'measure':52} {'payer':>9} {'payee':>9} {'target':>9}")
    print("-" * 82)
    auth = simdevice.Authority()
    st = station.Station(auth.issuer.key, None, {"backend": auth.backend_pub, "backend_kx": auth.backend_kx})
    secs: dict[str, list[float]] = {"payer": [], "payee": []}
    sent: dict[str, int] = {}
    received: dict[str, int] = {}
    cli: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        ss = SimStation(work / "station", FIRMWARE_BUILD, auth=auth)
        for role, code in (("payer", wire.ROLE_PAYER), ("payee", wire.ROLE_PAYEE)):
            for i in range(3):
                device_id = os.urandom(wire.ID_LEN)
                voucher = auth.voucher(device_id, 1, 100_000) if code == wire.ROLE_PAYER else None
                with SimBoard(work / f"{role}{i}.img", FIRMWARE_BUILD) as board:
                    board.power_on()
                    with station.SerialLink(board.port) as link:
                        res = st.provision(link, station.Spec(code, device_id=device_id, voucher=voucher))
                    board.wait_exit()
                secs[role].append(res.seconds)
                sent[role], received[role] = res.bytes_sent, res.bytes_received
            with SimBoard(work / f"{role}-cli.img", FIRMWARE_BUILD) as board:
                board.power_on()
                args = ["--role", role] + (["--balance", "100000"] if role == "payer" else [])
                t0 = time.monotonic()
                proc = ss.run(board, args)
                cli[role] = time.monotonic() - t0
                if proc.returncode != 0:
                    print(f"provision.py failed: {proc.stderr.strip()}")
                    return
    table = [
        ("IDENTIFY -> FINALISE, station library (s, median 3)", round(statistics.median(secs["payer"]), 2),
         round(statistics.median(secs["payee"]), 2), None),
        ("host/provision.py end to end, start-up incl. (s)", round(cli["payer"], 2), round(cli["payee"], 2), None),
        ("serial bytes, station -> device", sent["payer"], sent["payee"], None),
        ("serial bytes, device -> station", received["payer"], received["payee"], None),
    ]
    for name, a, b, target in table:
        print(f"{name:52} {a!s:>9} {b!s:>9} {target or '':>9}", flush=True)
        rows.append({"measure": name, "payer": a, "payee": b, "target": target})


def main() -> int:
    fwbuild.build(FIRMWARE_BUILD)
    rows: list[dict] = []
    run_crypto(rows)
    run_protocol(rows)
    run_ble(rows)
    run_provisioning(rows)
    run_ledger(rows)
    run_ops("\n== QR code and screens (MicroPython unix port)", ui_ops(), rows)
    from tests.bench_backend import run_backend
    from tests.bench_sync import run_sync
    from tests.bench_sync_serial import run_serial

    run_sync(rows)
    run_serial(rows)
    run_backend(rows)
    out = fwbuild.ROOT / "build" / "bench.json"
    out.write_text(json.dumps(rows, indent=2))
    print(f"\n(rows also written to {out.relative_to(fwbuild.ROOT)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
