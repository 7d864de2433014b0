# Mounts the firmware's ROMFS image at /rom, as an ESP32 mounts its romfs partition at boot, so the firmware
# runs in place from the image instead of being loaded into the heap (tests/harness/mp.py, romfs=True).
# On the unix port the image has to sit in RAM: it is read first, into one buffer of exactly its size,
# and the harness adds that size to -X heapsize, so the budget the firmware sees is the device's.
import os
import sys

import vfs


def mount(path):
    buf = bytearray(os.stat(path)[6])
    with open(path, "rb") as f:
        f.readinto(buf)
    vfs.mount(vfs.VfsRom(buf), "/rom")
    sys.path.append("/rom")
    sys.path.append("/rom/lib")


mount(os.getenv("PAYTOKEN_ROMFS"))
