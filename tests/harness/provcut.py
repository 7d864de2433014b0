# Power cuts during provisioning, run on MicroPython: the provisioning handler (paytoken.provisioning) on an
# emulated NOR flash (board.flash.FlashDevice, LittleFS v2) that can lose power at any program or erase.
# The host test drives the steps with the real station code (paytoken_host.station) through request(); after a
# cut it reboots the device (reboot()), checks what the store says, and runs the station again.
import vfs

from board.flash import FlashDevice, PowerCut
from paytoken import provisioning, store
from paytoken.usb.service import Error

MOUNT = "/prov"
BLOCKS = 32  # 128 KB: the store and a small ledger
CUT = -1


class Rig:
    def __init__(self):
        self.flash = FlashDevice(block_size=4096, block_count=BLOCKS, seed=1)
        vfs.VfsLfs2.mkfs(self.flash)
        self.mounted = False
        self.reboot()

    def reboot(self):
        if self.mounted:
            try:
                vfs.umount(MOUNT)
            except Exception:
                pass
        self.flash.power_on()
        vfs.mount(vfs.VfsLfs2(self.flash), MOUNT)
        self.mounted = True
        self.prov = provisioning.Provisioning(MOUNT, "sim")


rig = None


def fresh():
    global rig
    if rig is not None and rig.mounted:
        vfs.umount(MOUNT)
    rig = Rig()


def reboot():
    rig.reboot()
    return rig.prov.state()


def request(rtype, payload):
    # [status, body] as the service would answer; [CUT, why] when the power went during the request.
    try:
        return [0, rig.prov.handle(rtype, payload) or b""]
    except Error as e:
        return [e.code, e.msg.encode()]
    except PowerCut as e:
        return [CUT, str(e).encode()]
    except OSError as e:
        if not rig.flash.powered():  # LittleFS surfaced the cut as its own error
            return [CUT, str(e).encode()]
        raise


def writes():
    return rig.flash.writes


def cut_at(n):
    rig.flash.cut_at(n)


def loadable():
    # True if the device would pay: store.load() accepts its store.
    try:
        store.load(MOUNT)
        return True
    except store.StoreError:
        return False
