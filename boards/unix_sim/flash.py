# Simulated NOR flash for the unix_sim board: a block device for vfs.VfsLfs2 that can lose power at any
# program or erase, so the firmware's flash code can be tested for power-loss safety.
#
# Block protocol (MicroPython docs/reference/filesystem.rst, extended interface), as esp32.Partition:
#   readblocks(block_num, buf, offset=0)   read len(buf) bytes at block_num * block_size + offset
#   writeblocks(block_num, buf, offset)    program only, no erase: NOR flash, bits go 1 -> 0 only
#   writeblocks(block_num, buf)            simple interface: erase those whole blocks, then program
#   ioctl(op, arg)                         1 init, 2 deinit, 3 sync, 4 block count, 5 block size,
#                                          6 erase block `arg` to 0xFF (returns 0)
#
# Power cuts: cut_at(n, mode) cuts the power at the n-th program/erase from now: 'drop' loses that
# operation, 'tear' applies part of it. It raises PowerCut, and so does every call until power_on()
# (the reboot). Each power cycle has its own block-device methods: those held by a filesystem mounted
# before the cut stay dead for good, so a stale file's finaliser can never write into the rebooted
# device (on the chip that RAM state is simply gone).
#
# Speed: the hot methods keep at most 11 locals+stack slots (more and MicroPython allocates the frame
# on the heap, which next to a 1 MB bytearray can cost ~10 us a call) and allocate no big ints.
import os
import random


class PowerCut(Exception):
    pass


class _Port:
    # The block-device methods of one power cycle; FlashDevice exposes the current port's methods.

    def __init__(self, dev):
        self.dev = dev
        self.bs = dev.block_size
        self.size = len(dev.data)
        self.mv = dev._mv
        self.dead = False
        # Made now: GC finalisers of files from a dead mount run with the heap locked, where
        # raising a new exception would fail with a MemoryError instead.
        self.exc = PowerCut("flash: no power (after a cut: power_on() and mount again)")

    def readblocks(self, block_num, buf, offset=0):
        if self.dead:
            raise self.exc
        a = block_num * self.bs + offset
        if a < 0 or a + len(buf) > self.size:
            raise ValueError("flash: read out of range")
        buf[:] = self.mv[a : a + len(buf)]

    def writeblocks(self, block_num, buf, offset=None):
        if self.dead:
            raise self.exc
        if offset is None:
            self.dev._write_simple(block_num, buf)
        else:
            self.dev._program(block_num * self.bs + offset, buf)

    def ioctl(self, op, arg):
        if self.dead:
            raise self.exc
        if op == 6:  # erase
            self.dev._erase(arg)
            return 0
        if op == 3 or op == 2:  # sync, deinit
            if self.dev._dirty:
                self.dev.save()
            return 0
        if op == 4:  # block count
            return self.dev.block_count
        if op == 5:  # block size
            return self.bs
        if op == 1:  # init
            return 0
        return None


class FlashDevice:
    """NOR flash: block_count erase blocks of block_size bytes, all in one bytearray (`data`).

    path: the image is loaded from that host file if it exists (else the flash starts erased) and
    saved to it atomically on sync, deinit, power cuts and save(). seed: tears are reproducible (by
    default the seed is drawn from `random`, so random.seed() also works).
    Counters: writes = programs + erases since creation (the cut operation included).
    cut_info after a cut: (op, block, offset, length, mode, done) with op "program" or "erase" and
    done the number of bytes fully applied (0 for 'drop'; for 'tear' the next byte is partial).
    """

    def __init__(self, block_size=4096, block_count=256, path=None, seed=None):
        self.block_size = block_size
        self.block_count = block_count
        self.path = path
        self.data = bytearray(block_size * block_count)
        self._mv = memoryview(self.data)
        self._ff = b"\xff" * block_size
        self._ffm = memoryview(self._ff)
        self.writes = 0
        self.programs = 0
        self.erases = 0
        self.cut_info = None
        self._cut = 0  # the value of `writes` at which the power goes; 0: not armed
        self._mode = None
        self._dirty = False
        self.reseed(seed)
        if not (path and self._load()):
            for b in range(block_count):
                self._mv[b * block_size : (b + 1) * block_size] = self._ff
        self._port = None
        self.power_on()

    # ---- power ----

    def powered(self):
        """False from a cut (or power_off()) until power_on()."""
        return not self._port.dead

    def power_on(self):
        """Reboot: disarm any cut; new block-device methods (the old ones raise PowerCut for good).

        Filesystems and files from before the reboot are dead: vfs.umount the old mount and mount a
        new vfs.VfsLfs2(dev).
        """
        if self._port:
            self._port.dead = True
        self._cut = 0
        self._mode = None
        port = _Port(self)
        self._port = port
        self.readblocks = port.readblocks
        self.writeblocks = port.writeblocks
        self.ioctl = port.ioctl

    def power_off(self):
        """Lose power now, between operations (nothing torn)."""
        self._die()

    def cut_at(self, n, mode="drop", seed=None):
        """Lose power at the n-th program/erase from now (n=1: the next one); mode 'drop' or 'tear'."""
        if n < 1:
            raise ValueError("cut_at: n must be >= 1")
        if mode != "drop" and mode != "tear":
            raise ValueError("cut_at: mode is 'drop' or 'tear'")
        if seed is not None:
            self.reseed(seed)
        self._cut = self.writes + n
        self._mode = mode

    def reseed(self, seed=None):
        if seed is None:
            seed = random.getrandbits(32)
        # Spread nearby seeds over the whole state, then let xorshift mix it.
        self._rng = ((seed * 0x9E3779B1 + 0x7F4A7C15) & 0xFFFFFFFF) or 1
        for _ in range(4):
            self._rand(2)

    def _rand(self, n):
        # xorshift32, private: tears neither depend on nor disturb the random module's state.
        x = self._rng
        x ^= (x << 13) & 0xFFFFFFFF
        x ^= x >> 17
        x ^= (x << 5) & 0xFFFFFFFF
        self._rng = x
        return x % n

    def _die(self):
        self._port.dead = True
        if self.path:
            self.save()

    # ---- flash operations (called through the current port) ----

    def _program(self, a, buf):
        n = len(buf)
        if a < 0 or a + n > len(self.data):
            raise ValueError("flash: write out of range")
        self.writes += 1
        self.programs += 1
        self._dirty = True
        if self.writes == self._cut:
            self._cut_program(a, buf)
        mv = self._mv
        if mv[a : a + n] == self._ffm[:n]:
            mv[a : a + n] = buf  # onto erased flash (what LittleFS does): old & buf == buf
        else:
            self._and(a, buf)

    def _and(self, a, buf):
        # NOR programming: bits only go 1 -> 0, new = old & buf.
        n = len(buf)
        old = int.from_bytes(self._mv[a : a + n], "big")
        self._mv[a : a + n] = (old & int.from_bytes(buf, "big")).to_bytes(n, "big")

    def _erase(self, block):
        if block < 0 or block >= self.block_count:
            raise ValueError("flash: erase out of range")
        self.writes += 1
        self.erases += 1
        self._dirty = True
        if self.writes == self._cut:
            self._cut_erase(block)
        a = block * self.block_size
        self._mv[a : a + self.block_size] = self._ff

    def _write_simple(self, block_num, buf):
        # The simple interface, as esp32.Partition.writeblocks(n, buf): erase, then program.
        if len(buf) % self.block_size:
            raise ValueError("flash: simple write needs whole blocks")
        for i in range(len(buf) // self.block_size):
            self._erase(block_num + i)
        self._program(block_num * self.block_size, buf)

    def _cut_program(self, a, buf):
        n = len(buf)
        k = 0
        if self._mode == "tear" and n:
            # A prefix of k bytes lands; byte k is half programmed (only some of its 1 -> 0 bits).
            k = self._rand(n)
            self._and(a, buf[:k])
            self.data[a + k] &= buf[k] | self._rand(256)
        self.cut_info = ("program", a // self.block_size, a % self.block_size, n, self._mode, k)
        self._die()
        raise PowerCut("flash: power cut at write %d" % self.writes)

    def _cut_erase(self, block):
        bs = self.block_size
        k = 0
        if self._mode == "tear":
            # A prefix of k bytes is erased; byte k is half erased (only some of its bits back to 1).
            a = block * bs
            k = self._rand(bs)
            self._mv[a : a + k] = self._ffm[:k]
            self.data[a + k] |= self._rand(256)
        self.cut_info = ("erase", block, 0, bs, self._mode, k)
        self._die()
        raise PowerCut("flash: power cut at write %d" % self.writes)

    # ---- host image ----

    def _load(self):
        try:
            f = open(self.path, "rb")
        except OSError:
            return False
        with f:
            n = f.readinto(self.data)
            if n != len(self.data) or f.read(1):
                raise ValueError("flash: image %s is not %d bytes" % (self.path, len(self.data)))
        return True

    def save(self):
        """Write the image to path (path.tmp, then rename: never half an image on the host)."""
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "wb") as f:
                f.write(self.data)
            os.rename(tmp, self.path)
        self._dirty = False
