# Board: ESP32-DevKitC (ESP32-WROOM-32) + SSD1306 128x64 I2C OLED + 3 buttons + GM65/GM861 scanner.
# Pins and settings live in board.json (INFO); boards/README.md has the wiring.
#   INFO                                   board.json, parsed
#   display()                              -> width, height, fb (1 = lit), show(), power(on)
#   buttons(callback, settle_ms, long_ms)  -> paytoken.drivers.buttons.Buttons; app calls poll() often
#   scanner()                              -> paytoken.drivers.scanner.Scanner on machine.UART
# Drivers are imported when first asked for, so a build that never scans never loads the scanner code.
import json

import machine


def _load_info():
    try:
        f = __file__
        i = f.rfind("/")
        d = f[:i] if i >= 0 else "."
    except NameError:  # frozen into the image: board.json was deployed beside it
        d = "/board"
    with open(d + "/board.json") as fh:
        return json.load(fh)


INFO = _load_info()


def display():
    from paytoken.drivers import oled

    d = INFO["display"]
    i2c = machine.I2C(d["i2c"], sda=machine.Pin(d["sda"]), scl=machine.Pin(d["scl"]), freq=d["freq"])
    return oled.make(i2c, d["width"], d["height"], d["addr"])


def buttons(callback, settle_ms=20, long_ms=800):
    from paytoken.drivers.buttons import Buttons

    Pin = machine.Pin
    pins = [(b["name"], Pin(b["pin"], Pin.IN, pull=Pin.PULL_UP if b["pull_up"] else None)) for b in INFO["buttons"]]
    return Buttons(pins, callback, settle_ms, long_ms)


def scanner():
    from paytoken.drivers.scanner import Scanner

    s = INFO["scanner"]
    uart = machine.UART(s["uart"], baudrate=s["baud"], tx=s["tx"], rx=s["rx"], rxbuf=s["rxbuf"])
    return Scanner(uart)
