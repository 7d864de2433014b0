# Board: the MicroPython unix port with simulated hardware (tests, demo, bench). Same API as the ESP32
# boards; docs/simulator.md describes what the harness can do with it.
#   INFO                                   board.json, parsed
#   display(path=None, stream=None)        -> SimDisplay: show() saves a PBM image and/or draws in a terminal
#   buttons(callback, settle_ms, long_ms)  -> SimButtons: press(name, ...) from the harness
#   scanner()                              -> SimScanner: the real Scanner driver on a simulated UART module
#   storage(image=None, mount="/flash")    -> the data root: a host image file mounted with LittleFS v2
#   halt()                                 a provisioned device stopped: says so (ESP32: no REPL, sleep)
#   network()                              -> the backend's URL when the simulator is online (Wi-Fi)
#   usb()                                  -> SimUsb (board.simusb): the USB serial link, None without PAYTOKEN_SIM_USB
#   flash.FlashDevice                      emulated NOR flash (board.flash)
# Environment (all optional): PAYTOKEN_SIM_DISPLAY  PBM file written on every show()
#                             PAYTOKEN_SIM_TERM=1    also draw every frame on stdout
#                             PAYTOKEN_SIM_BUTTONS   file of button commands, one a line, read by poll()
#                             PAYTOKEN_SIM_SCANNER   file of QR texts, one a line, shown to the scanner
#                             PAYTOKEN_SIM_FLASH     the device's flash image (storage()); made on first use
#                             PAYTOKEN_SIM_ONLINE    the online switch: the backend's URL (http://127.0.0.1:port)
#                             PAYTOKEN_SIM_USB       host:port of the USB-UART bridge (paytoken_host.simusb)
#                             PAYTOKEN_SIM_SERVICE=1 the button held at power-on: USB service when provisioned
# The simulated devices live in simdisplay.py, siminput.py and simusb.py, imported on first use.
import os
import sys

from paytoken.drivers import board_common

INFO = board_common.load_info(__file__)


def _env(name):
    v = os.getenv(name)
    return v if v else None


def display(path=None, stream=None, width=None, height=None):
    from board.simdisplay import SimDisplay

    d = INFO.get("display", {})
    if path is None:
        path = _env("PAYTOKEN_SIM_DISPLAY")
    if stream is None and _env("PAYTOKEN_SIM_TERM") == "1":
        stream = sys.stdout
    return SimDisplay(width or d.get("width", 128), height or d.get("height", 64), path, stream)


def buttons(callback, settle_ms=20, long_ms=800, path=None):
    from board.siminput import SimButtons

    if path is None:
        path = _env("PAYTOKEN_SIM_BUTTONS")
    names = [b["name"] for b in INFO.get("buttons", ())] or ["confirm", "up", "down"]
    return SimButtons(callback, names, settle_ms, long_ms, path)


def scanner(path=None):
    from board.siminput import SimScanner, SimUART

    if path is None:
        path = _env("PAYTOKEN_SIM_SCANNER")
    return SimScanner(SimUART(path))


def network(config=None):
    # The simulator's online switch, as Wi-Fi is on a board: the backend's base URL when PAYTOKEN_SIM_ONLINE gives one
    # (the unix port reaches it over the loopback network with `socket`), OSError(ENODEV) while offline. config
    # (the device's, with the ESP32 boards' "wifi") is not needed here.
    url = _env("PAYTOKEN_SIM_ONLINE")
    if url is None:
        raise OSError(19, "unix_sim: offline (set PAYTOKEN_SIM_ONLINE to the backend's http://host:port)")
    return url


def usb():
    a = _env("PAYTOKEN_SIM_USB")
    if a:
        from board.simusb import SimUsb

        return SimUsb(a, _env("PAYTOKEN_SIM_SERVICE") == "1")


_mounted = {}  # mount point -> (image path, block device)


def halt():
    # The ESP32 boards sleep for ever with Ctrl-C off (board_common.halt): no REPL for a provisioned device.
    # Here the process ends instead, as a power-off would, and says so.
    print("EVENT device halted repl=locked")


def storage(image=None, mount="/flash", block_count=256):
    # The device's data root, as on the ESP32 boards (where it is "/", the firmware's LittleFS): the flash
    # image file `image` (default PAYTOKEN_SIM_FLASH) mounted with LittleFS v2 at `mount`, blocks read and
    # written in the file (board.filedev), so the heap holds no image. A missing image is created with
    # block_count 4 KB blocks and formatted; an image that does not mount is an error, never reformatted
    # (it holds a ledger). Mounted once per mount point; unmount(mount) undoes it.
    import vfs

    from board.filedev import FileBlockDevice

    if image is None:
        image = _env("PAYTOKEN_SIM_FLASH")
        if image is None:
            raise OSError("unix_sim: no flash image: set PAYTOKEN_SIM_FLASH to an image file")
    if mount in _mounted:
        if _mounted[mount][0] != image:
            raise OSError("unix_sim: %s already holds %s" % (mount, _mounted[mount][0]))
        return mount
    dev = FileBlockDevice(image, block_count)
    if dev.fresh:
        vfs.VfsLfs2.mkfs(dev)
    try:
        fs = vfs.VfsLfs2(dev)
        vfs.mount(fs, mount)
    except OSError as e:
        dev.close()
        raise OSError("unix_sim: flash image %s does not mount (%s): not reformatting it" % (image, e))
    _mounted[mount] = (image, dev)
    return mount


def unmount(mount="/flash"):
    import vfs

    entry = _mounted.pop(mount, None)
    if entry is not None:
        vfs.umount(mount)
        entry[1].close()
