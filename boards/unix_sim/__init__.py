# Board: the MicroPython unix port with simulated hardware (tests, demo, bench). Same API as the ESP32
# boards; docs/simulator.md describes what the harness can do with it.
#   INFO                                   board.json, parsed
#   display(path=None, stream=None)        -> SimDisplay: show() saves a PBM image and/or draws in a terminal
#   buttons(callback, settle_ms, long_ms)  -> SimButtons: press(name, ...) from the harness
#   scanner()                              -> SimScanner: the real Scanner driver on a simulated UART module
#   flash.FlashDevice                      emulated NOR flash (board.flash)
# Environment (all optional): PAYTOKEN_SIM_DISPLAY  PBM file written on every show()
#                             PAYTOKEN_SIM_TERM=1    also draw every frame on stdout
#                             PAYTOKEN_SIM_BUTTONS   file of button commands, one a line, read by poll()
#                             PAYTOKEN_SIM_SCANNER   file of QR texts, one a line, shown to the scanner
# The simulated devices live in sim.py, imported on first use.
import os
import sys

from paytoken.drivers import board_common

INFO = board_common.load_info(__file__)


def _env(name):
    v = os.getenv(name)
    return v if v else None


def display(path=None, stream=None, width=None, height=None):
    from board.sim import SimDisplay

    d = INFO.get("display", {})
    if path is None:
        path = _env("PAYTOKEN_SIM_DISPLAY")
    if stream is None and _env("PAYTOKEN_SIM_TERM") == "1":
        stream = sys.stdout
    return SimDisplay(width or d.get("width", 128), height or d.get("height", 64), path, stream)


def buttons(callback, settle_ms=20, long_ms=800, path=None):
    from board.sim import SimButtons

    if path is None:
        path = _env("PAYTOKEN_SIM_BUTTONS")
    names = [b["name"] for b in INFO.get("buttons", ())] or ["confirm", "up", "down"]
    return SimButtons(callback, names, settle_ms, long_ms, path)


def scanner(path=None):
    from board.sim import SimScanner, SimUART

    if path is None:
        path = _env("PAYTOKEN_SIM_SCANNER")
    return SimScanner(SimUART(path))
