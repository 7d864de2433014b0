# What every board folder shares: its board.json description, and the ESP32 boards' GPIO buttons and UART
# scanner built from it. `machine` is imported only by the ESP32 helpers, so the simulator can use load_info.
import json


def load_info(module_file=None):
    # board.json beside the board module; a board frozen into the image (no __file__) reads /board/.
    d = "/board"
    if module_file:
        i = module_file.rfind("/")
        d = module_file[:i] if i >= 0 else "."
    with open(d + "/board.json") as fh:
        return json.load(fh)


def gpio_buttons(info, callback, settle_ms=20, long_ms=800):
    from machine import Pin

    from paytoken.drivers.buttons import Buttons

    # A button without an internal pull (GPIO 34-39 are input-only) says pull_up false: its board has one.
    pins = [(b["name"], Pin(b["pin"], Pin.IN, pull=Pin.PULL_UP if b["pull_up"] else None)) for b in info["buttons"]]
    return Buttons(pins, callback, settle_ms, long_ms)


def uart_scanner(info):
    from machine import UART

    from paytoken.drivers.scanner import Scanner

    s = info["scanner"]
    return Scanner(UART(s["uart"], baudrate=s["baud"], tx=s["tx"], rx=s["rx"], rxbuf=s["rxbuf"]))


def storage():
    # The data root on the ESP32 boards: MicroPython mounts the flash's LittleFS v2 at "/" before boot.py,
    # so the store and the ledger live beside the firmware (paytoken.store: /store/, /ledger/).
    return "/"


def halt():
    # A provisioned device that stops (it cannot pay, or its app failed) must not fall into the REPL, where its
    # keys and ledger could be read or changed: Ctrl-C off, then sleep until the power goes. esptool still
    # reaches the ROM bootloader (reset lines), which is the documented full wipe (docs/security.md).
    import time

    import micropython

    micropython.kbd_intr(-1)
    while True:
        time.sleep(3600)


def network(config=None):
    # The ESP32 boards' network(config): the backend's URL over the config's Wi-Fi (imported only to go online).
    from paytoken.drivers import wifi

    return wifi.connect(config)
