# A block device backed by a host file (docs/simulator.md, "Storage"): the simulated device's flash for
# long-running use (the apps, the demo). Blocks are read and written in place with seek, so the heap holds
# only LittleFS's small caches, never the image; board.storage() mounts it with LittleFS v2 as the ESP32
# firmware filesystem is. No NOR or power-cut model here: that is board.flash.FlashDevice, for the
# power-loss tests, which keeps its whole image in the heap.
#
#   dev = FileBlockDevice(path, block_count=256, block_size=4096)   creates a missing image (fresh = True)
#   vfs.VfsLfs2.mkfs(dev); vfs.mount(vfs.VfsLfs2(dev), "/flash")
import os

BLOCK_SIZE = 4096


def _size(path):
    try:
        return os.stat(path)[6]
    except OSError:
        return None


class FileBlockDevice:
    def __init__(self, path, block_count=256, block_size=BLOCK_SIZE):
        self.path = path
        self.block_size = block_size
        size = _size(path)
        self.fresh = size is None
        if self.fresh:
            # a sparse file of the full size: no image in the heap, not even once
            with open(path, "wb") as f:
                f.seek(block_count * block_size - 1)
                f.write(b"\xff")
            size = block_count * block_size
        if size % block_size or not size:
            raise ValueError("flash image %s: %d bytes is not a whole number of %d-byte blocks"
                             % (path, size, block_size))
        self.block_count = size // block_size
        self._f = open(path, "r+b")

    def readblocks(self, block, buf, offset=0):
        f = self._f
        f.seek(block * self.block_size + offset)
        if f.readinto(buf) != len(buf):
            raise OSError(5)  # EIO: the image is shorter than it said

    def writeblocks(self, block, buf, offset=0):
        f = self._f
        f.seek(block * self.block_size + offset)
        f.write(buf)

    def ioctl(self, op, arg):
        if op == 4:
            return self.block_count
        if op == 5:
            return self.block_size
        if op == 3:  # sync: LittleFS syncs after every commit
            self._f.flush()
            return 0
        if op == 2:  # deinit (umount)
            self._f.flush()
            return 0
        if op == 6:  # erase: nothing to do, LittleFS checks its data with CRCs, not for 0xFF
            return 0
        return 0

    def close(self):
        self._f.close()
