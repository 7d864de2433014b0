"""The unix_sim board's NOR flash (boards/unix_sim/flash.py) on MicroPython: block protocol, NOR
semantics, power cuts, and LittleFS (vfs.VfsLfs2) surviving a cut at every write of an append workload.

Runs the compiled board/flash.mpy from build/firmware, in its own process (the 1 MB flash images need a
bigger heap than the shared `mp` fixture's).
"""

from __future__ import annotations

import hashlib

import pytest

from tests.harness.mp import MicroPython, MicroPythonError

PRELUDE = """
import gc, hashlib, os, vfs
from board.flash import FlashDevice, PowerCut

def ops(dev, seq):
    # Run (kind, block, offset, data) operations; return how many completed before a PowerCut.
    done = 0
    try:
        for kind, block, off, data in seq:
            if kind == "p":
                dev.writeblocks(block, data, off)
            else:
                dev.ioctl(6, block)
            done += 1
    except PowerCut:
        pass
    return done

def read(dev, block, off, n):
    buf = bytearray(n)
    dev.readblocks(block, buf, off)
    return bytes(buf)

def raises_powercut(fn, *args):
    try:
        fn(*args)
    except PowerCut:
        return True
    return False

def ls(path):
    return sorted(os.listdir(path))

def slurp(path):
    with open(path, "rb") as f:
        return f.read()

def spit(path, data):
    with open(path, "wb") as f:
        f.write(data)
"""


@pytest.fixture(scope="module")
def upy(firmware_build):
    with MicroPython(heapsize="16M") as proc:
        proc.exec(PRELUDE)
        yield proc


def test_block_protocol(upy):
    upy.exec("dev = FlashDevice(block_size=4096, block_count=64)")
    assert upy.eval("[dev.ioctl(1, 0), dev.ioctl(4, 0), dev.ioctl(5, 0), dev.ioctl(3, 0), dev.ioctl(2, 0)]") == [
        0,
        64,
        4096,
        0,
        0,
    ]
    assert upy.eval("dev.ioctl(99, 0)") is None
    assert upy.eval("bytes(dev.data) == b'\\xff' * 64 * 4096")  # new flash is erased
    upy.exec("dev.writeblocks(3, b'hello', 100)")
    assert upy.eval("read(dev, 3, 98, 9)") == b"\xff\xffhello\xff\xff"
    assert upy.eval("read(dev, 3, 100, 5)") == b"hello"
    # the simple interface reads whole blocks from offset 0
    upy.exec("whole = bytearray(8192)\ndev.readblocks(2, whole)")
    assert upy.eval("bytes(whole[4096 + 98 : 4096 + 107])") == b"\xff\xffhello\xff\xff"
    for bad in ("read(dev, 63, 4095, 2)", "dev.writeblocks(64, b'x', 0)", "dev.ioctl(6, 64)", "dev.ioctl(6, -1)"):
        with pytest.raises(MicroPythonError) as exc:
            upy.eval(bad)
        assert exc.value.kind == "ValueError", bad
    assert upy.eval("[dev.writes, dev.programs, dev.erases]") == [1, 1, 0]


def test_nor_programs_only_one_to_zero_and_erase_restores_ff(upy):
    upy.exec("dev = FlashDevice(block_count=8)")
    upy.exec("dev.writeblocks(2, b'\\x0f\\xff\\x00\\xaa', 10)")
    upy.exec("dev.writeblocks(2, b'\\xf0\\x00\\xff\\x55', 10)")  # without an erase: NOR ANDs
    assert upy.eval("read(dev, 2, 10, 4)") == b"\x00\x00\x00\x00"
    upy.exec("dev.writeblocks(2, b'\\x3c', 20)")
    upy.exec("dev.writeblocks(2, b'\\xf5', 20)")
    assert upy.eval("read(dev, 2, 20, 1)") == bytes([0x3C & 0xF5])
    # the neighbours are untouched, and an erase brings the whole block back to 0xFF
    assert upy.eval("read(dev, 1, 0, 4096) + read(dev, 3, 0, 4096)") == b"\xff" * 8192
    upy.exec("dev.ioctl(6, 2)")
    assert upy.eval("read(dev, 2, 0, 4096)") == b"\xff" * 4096
    # simple interface writeblocks(n, buf): erases the blocks first, as esp32.Partition does
    upy.exec("dev.writeblocks(4, b'\\x00' * 4096, 0)")
    upy.exec("dev.writeblocks(4, bytes(range(256)) * 32)")
    assert upy.eval("read(dev, 4, 0, 8192)") == bytes(range(256)) * 32  # two blocks: 2 erases, 1 program
    assert upy.eval("[dev.programs, dev.erases]") == [6, 3]
    with pytest.raises(MicroPythonError) as exc:
        upy.eval("dev.writeblocks(4, b'short')")
    assert exc.value.kind == "ValueError"


def test_littlefs_formats_mounts_and_remounts(upy):
    upy.exec(
        "dev = FlashDevice()\n"
        "vfs.VfsLfs2.mkfs(dev)\n"
        "vfs.mount(vfs.VfsLfs2(dev), '/sim')\n"
        "os.mkdir('/sim/d')\n"
        "spit('/sim/a.bin', bytes(range(256)) * 40)\n"
        "spit('/sim/d/b.txt', b'ledger')\n"
        "vfs.umount('/sim')\n"
    )
    assert upy.eval("dev.writes > 0 and dev.erases > 0")
    upy.exec("vfs.mount(vfs.VfsLfs2(dev), '/sim')")
    try:
        assert upy.eval("ls('/sim')") == ["a.bin", "d"]
        assert upy.eval("slurp('/sim/a.bin')") == bytes(range(256)) * 40
        assert upy.eval("slurp('/sim/d/b.txt')") == b"ledger"
        assert upy.eval("os.statvfs('/sim')[0]") == 4096
    finally:
        upy.exec("vfs.umount('/sim')")


def test_image_survives_a_process_restart(upy, tmp_path, firmware_build):
    image = tmp_path / "flash.img"
    upy.exec(
        f"dev = FlashDevice(path={str(image)!r})\n"
        "vfs.VfsLfs2.mkfs(dev)\n"
        "vfs.mount(vfs.VfsLfs2(dev), '/img')\n"
        "spit('/img/keep', b'survives' * 100)\n"
        "vfs.umount('/img')\n"
    )
    # LittleFS syncs (ioctl 3) after each commit: the image on the host is the flash, atomically replaced
    assert image.stat().st_size == 256 * 4096
    assert not (tmp_path / "flash.img.tmp").exists()
    assert hashlib.sha256(image.read_bytes()).digest() == upy.eval("hashlib.sha256(dev.data).digest()")
    with MicroPython(heapsize="4M") as fresh:
        fresh.exec(PRELUDE)
        fresh.exec(f"dev = FlashDevice(path={str(image)!r})\nvfs.mount(vfs.VfsLfs2(dev), '/img')")
        assert fresh.eval("slurp('/img/keep')") == b"survives" * 100
        assert fresh.eval("dev.writes") == 0  # nothing written by loading and mounting
    # a cut saves the flash as it is at that instant (flash keeps what was programmed)
    upy.exec("dev.cut_at(1, 'tear', seed=5)\nok = raises_powercut(dev.ioctl, 6, 7)")
    assert upy.eval("ok")
    assert hashlib.sha256(image.read_bytes()).digest() == upy.eval("hashlib.sha256(dev.data).digest()")
    with pytest.raises(MicroPythonError) as exc:
        upy.exec(f"FlashDevice(block_count=8, path={str(image)!r})")  # wrong size: refuse, don't truncate
    assert exc.value.kind == "ValueError"


def test_writes_count_and_a_cut_hits_exactly_the_nth_operation(upy):
    seq = [("p", b % 8, 64 * b, bytes([b]) * 64) if b % 3 else ("e", b % 8, 0, b"") for b in range(24)]
    upy.exec("dev = FlashDevice(block_count=8)")
    assert upy.eval(f"ops(dev, {seq!r})") == 24
    assert upy.eval("[dev.writes, dev.programs, dev.erases]") == [24, 16, 8]
    for n in (1, 2, 7, 24):
        upy.exec(f"dev.power_on()\nw0 = dev.writes\ndev.cut_at({n}, 'drop')")
        assert upy.eval(f"ops(dev, {seq!r})") == n - 1  # operations 1..n-1 happened, n raised
        assert upy.eval("dev.writes - w0") == n
        assert upy.eval("dev.cut_info[4]") == "drop"
        assert not upy.eval("dev.powered()")
        # nothing gets through until power_on(): reads, programs, erases, every ioctl
        assert (
            upy.eval(
                "[raises_powercut(f, *a) for f, a in ((dev.readblocks, (0, bytearray(4))), "
                "(dev.writeblocks, (0, b'x', 0)), (dev.ioctl, (6, 0)), (dev.ioctl, (3, 0)), (dev.ioctl, (4, 0)))]"
            )
            == [True] * 5
        )
        assert upy.eval("dev.writes - w0") == n  # refused operations are not counted
    upy.exec("old_write = dev.writeblocks\ndev.power_on()")
    assert upy.eval("dev.powered() and read(dev, 0, 0, 1) is not None")
    upy.exec("dev.writeblocks(5, b'\\x00', 4000)")
    assert upy.eval("read(dev, 5, 4000, 1)") == b"\x00"
    # methods from before the reboot stay dead: a stale mount can never write the rebooted flash
    assert upy.eval("raises_powercut(old_write, 5, b'\\x00', 4001)")
    # n counts from now, and it is never armed by default
    upy.exec("w0 = dev.writes\ndev.cut_at(3)")
    assert upy.eval(f"ops(dev, {seq[:5]!r})") == 2
    upy.exec("dev.power_on()")
    assert upy.eval(f"ops(dev, {seq!r})") == 24
    for bad in ("dev.cut_at(0)", "dev.cut_at(1, 'melt')"):
        with pytest.raises(MicroPythonError) as exc:
            upy.exec(bad)
        assert exc.value.kind == "ValueError"


def test_drop_loses_the_operation_and_keeps_the_old_data(upy):
    upy.exec("dev = FlashDevice(block_count=4)\ndev.writeblocks(1, b'\\x55' * 300, 0)")
    upy.exec("before = bytes(dev.data)\ndev.cut_at(1, 'drop')")
    assert upy.eval("raises_powercut(dev.writeblocks, 1, b'\\x00' * 300, 300)")
    upy.exec("dev.power_on()")
    assert upy.eval("bytes(dev.data) == before")
    upy.exec("dev.cut_at(1, 'drop')")
    assert upy.eval("raises_powercut(dev.ioctl, 6, 1)")
    upy.exec("dev.power_on()")
    assert upy.eval("bytes(dev.data) == before")
    assert upy.eval("dev.cut_info") == ["erase", 1, 0, 4096, "drop", 0]


def test_tear_leaves_a_strict_prefix_and_one_partial_byte(upy):
    upy.exec(
        "def torn_program(seed, n):\n"
        "    dev = FlashDevice(block_count=2, seed=seed)\n"
        "    dev.writeblocks(0, b'\\xf0' * 600, 100)\n"
        "    old = bytes(dev.data)\n"
        "    new = bytes((i * 37) & 0xff for i in range(n))\n"
        "    dev.cut_at(1, 'tear')\n"
        "    assert raises_powercut(dev.writeblocks, 0, new, 50)\n"
        "    return old, new, bytes(dev.data), dev.cut_info\n"
        "def torn_erase(seed):\n"
        "    dev = FlashDevice(block_count=2, seed=seed)\n"
        "    dev.writeblocks(1, bytes((i * 11) & 0xff for i in range(4096)), 0)\n"
        "    old = bytes(dev.data)\n"
        "    dev.cut_at(1, 'tear')\n"
        "    assert raises_powercut(dev.ioctl, 6, 1)\n"
        "    return old, bytes(dev.data), dev.cut_info\n"
    )
    seen_k = set()
    for seed in range(40):
        n = 1 + seed * 13
        old, new, got, info = upy.eval(f"torn_program({seed}, {n})")
        op, block, off, length, mode, k = info
        assert (op, block, off, length, mode) == ("program", 0, 50, n, "tear")
        assert 0 <= k < n  # a strict prefix
        a = 50
        want_prefix = bytes(o & d for o, d in zip(old[a : a + k], new[:k], strict=True))
        assert got[a : a + k] == want_prefix
        o, d, g = old[a + k], new[k], got[a + k]
        assert g & ~o & 0xFF == 0 and g & d == o & d  # half programmed: only some of the 1->0 bits
        assert got[:a] == old[:a] and got[a + k + 1 :] == old[a + k + 1 :]
        seen_k.add(k * 4 // n)
    assert seen_k == {0, 1, 2, 3}  # prefixes of all lengths occur
    seen_k.clear()
    for seed in range(40):
        old, got, info = upy.eval(f"torn_erase({seed})")
        op, block, off, length, mode, k = info
        assert (op, block, off, length, mode) == ("erase", 1, 0, 4096, "tear")
        assert 0 <= k < 4096
        a = 4096
        assert got[a : a + k] == b"\xff" * k
        assert got[a + k] & old[a + k] == old[a + k]  # half erased: only some bits back to 1
        assert got[:a] == old[:a] and got[a + k + 1 :] == old[a + k + 1 :]
        seen_k.add(k * 4 // 4096)
    assert seen_k == {0, 1, 2, 3}


def test_seeded_tears_are_reproducible(upy):
    upy.exec(
        "def tear_run(seed, use_random_seed=False):\n"
        "    if use_random_seed:\n"
        "        import random\n"
        "        random.seed(seed)\n"
        "        dev = FlashDevice(block_count=4)\n"
        "    else:\n"
        "        dev = FlashDevice(block_count=4, seed=seed)\n"
        "    out = []\n"
        "    for i in range(6):\n"
        "        dev.cut_at(1 + i % 2, 'tear')\n"
        "        ops(dev, [('p', i % 4, 0, b'\\x00' * 1000), ('e', (i + 1) % 4, 0, b'')])\n"
        "        dev.power_on()\n"
        "        out.append(dev.cut_info)\n"
        "    return out, bytes(dev.data)\n"
    )
    assert upy.eval("tear_run(123)") == upy.eval("tear_run(123)")
    assert upy.eval("tear_run(123)") != upy.eval("tear_run(124)")
    assert upy.eval("tear_run(9, True)") == upy.eval("tear_run(9, True)")
    # cut_at(..., seed=) reseeds for one cut, whatever ran before
    upy.exec("d1 = FlashDevice(block_count=2, seed=1)\nd2 = FlashDevice(block_count=2, seed=2)")
    upy.exec(
        "d1._rand(100)\nfor d in (d1, d2):\n    d.cut_at(1, 'tear', seed=77)\n    ops(d, [('p', 0, 0, bytes(999))])"
    )
    assert upy.eval("d1.cut_info == d2.cut_info and d1.data == d2.data")


def test_a_stale_file_from_before_the_cut_never_writes_after_power_on(upy):
    upy.exec(
        "dev = FlashDevice()\n"
        "vfs.VfsLfs2.mkfs(dev)\n"
        "vfs.mount(vfs.VfsLfs2(dev), '/stale')\n"
        "spit('/stale/log', b'A' * 100)\n"
        "stale = open('/stale/log', 'ab')\n"
        "stale.write(b'B' * 300)\n"  # dirty, not flushed
        "dev.cut_at(1, 'drop')\n"
        "cut = raises_powercut(stale.flush)\n"
        "dev.power_on()\n"
        "vfs.umount('/stale')\n"
        "vfs.mount(vfs.VfsLfs2(dev), '/stale')\n"
        "w0 = dev.writes\n"
        "stale_close_failed = raises_powercut(stale.close)\n"  # what its GC finaliser would do
        "stale = None\n"
        "gc.collect()\n"
    )
    try:
        assert upy.eval("cut and stale_close_failed")
        assert upy.eval("dev.writes == w0")  # not one program or erase from the dead mount
        assert upy.eval("slurp('/stale/log')") == b"A" * 100
    finally:
        upy.exec("vfs.umount('/stale')")


WORKLOAD = """
RECS = [bytes(((i * 7 + j) & 0xFF) for j in range(200)) for i in range(APPENDS)]

def appends(state):
    # The ledger's pattern: append records to one file, flush (LittleFS sync) after each.
    f = open('/pl/log', 'ab')
    for i in range(APPENDS):
        f.write(RECS[i])
        f.flush()
        state[0] = i + 1
    f.close()

def one_cut(img, n, mode):
    # Fresh filesystem, cut at the n-th write of the workload (0: no cut), reboot, remount, look.
    dev.data[:] = img
    dev.power_on()
    vfs.mount(vfs.VfsLfs2(dev), '/pl')
    w0 = dev.writes
    if n:
        dev.cut_at(n, mode)
    state = [0]
    cut = raises_powercut(appends, state)
    used = dev.writes - w0
    op = dev.cut_info[0] if cut else None
    dev.power_on()
    vfs.umount('/pl')
    vfs.mount(vfs.VfsLfs2(dev), '/pl')  # must mount: LittleFS is power-loss resilient
    try:
        got = slurp('/pl/log')
    except OSError:
        got = b''
    spit('/pl/probe', b'still writable')  # and stay usable
    usable = slurp('/pl/probe') == b'still writable'
    vfs.umount('/pl')
    k = len(got) // 200
    if len(got) % 200 or got != b''.join(RECS[:k]):
        k = -1  # torn: not a whole-record prefix
    return cut, used, op, state[0], k, usable

def sweep(mode, start=1, step=1):
    dev.power_on()
    vfs.VfsLfs2.mkfs(dev)
    img = bytes(dev.data)
    cut, total, _, done, k, usable = one_cut(img, 0, mode)
    assert not cut and done == APPENDS and k == APPENDS and usable
    dev.reseed(2024)
    out = {'writes': total, 'ops': {}, 'k-done': {}, 'bad': []}
    for n in range(start, total + 1, step):
        cut, used, op, done, k, usable = one_cut(img, n, mode)
        out['ops'][str(op)] = out['ops'].get(str(op), 0) + 1
        d = str(k - done) if k >= 0 else 'torn'
        out['k-done'][d] = out['k-done'].get(d, 0) + 1
        if not (cut and used == n and usable and d in ('0', '1')):
            out['bad'].append((n, cut, used, done, k, usable))
    return out
"""


@pytest.mark.parametrize("mode", ["drop", "tear"])
def test_littlefs_append_file_after_a_cut_at_every_write(upy, mode):
    """60 appends of 200 bytes, flush() after each, cut at every program/erase of the workload.

    After power_on() + remount the file always holds exactly the records whose flush() returned, or
    (the cut hit inside the next flush after its commit landed) one more: a prefix ending at a flush
    boundary, never a torn record, never a lost flush.
    """
    upy.exec("APPENDS = 60\ndev = FlashDevice(seed=1)\n" + WORKLOAD)
    out = upy.eval(f"sweep({mode!r})")
    assert out["writes"] > 60 * 5  # every append costs several programs; all of them were cut points
    assert out["bad"] == []
    assert set(out["ops"]) == {"program", "erase"}
    assert set(out["k-done"]) <= {"0", "1"}  # k - done is 0 or 1, never 'torn'
    if mode == "drop":
        # a dropped operation never completes a commit: the file is exactly what flush() confirmed
        assert set(out["k-done"]) == {"0"}


@pytest.mark.slow
@pytest.mark.parametrize("start", [1, 2, 3])
def test_littlefs_long_append_sweep_torn(upy, start):
    """The long variant: 300 appends (metadata compactions and relocations), torn cuts; the three runs
    take every third write each, so together they cut at every write, each with its own tears."""
    upy.exec(f"APPENDS = 300\ndev = FlashDevice(seed={start})\n" + WORKLOAD)
    out = upy.eval(f"sweep('tear', {start}, 3)")
    assert out["bad"] == []
    assert set(out["k-done"]) <= {"0", "1"}
