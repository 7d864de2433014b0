# Board: ESP32-DevKitC (ESP32-WROOM-32) + SSD1306 128x64 I2C OLED + 3 buttons + GM65/GM861 scanner.
# Pins and settings live in board.json (INFO); boards/README.md has the wiring.
#   INFO                                   board.json, parsed
#   display()                              -> width, height, fb (1 = lit), show(), power(on)
#   buttons(callback, settle_ms, long_ms)  -> paytoken.drivers.buttons.Buttons; app calls poll() often
#   scanner()                              -> paytoken.drivers.scanner.Scanner on machine.UART
#   storage()                              -> "/": the data root, the firmware's LittleFS (mounted at boot)
#   halt()                                 a provisioned device stopped: never the REPL (no Ctrl-C, sleep)
#   network(config)                        -> the backend's URL over the config's Wi-Fi (paytoken.drivers.wifi)
#   usb()                                  -> paytoken.drivers.esp32_usb.Usb: the USB service's needs (serial
#                                             port, button held at power-on, RNG entropy, reset)
# Drivers are imported when first asked for, so a build that never scans never loads the scanner code.
import machine

from paytoken.drivers import board_common

INFO = board_common.load_info(globals().get("__file__"))


def display():
    from paytoken.drivers import oled

    d = INFO["display"]
    i2c = machine.I2C(d["i2c"], sda=machine.Pin(d["sda"]), scl=machine.Pin(d["scl"]), freq=d["freq"])
    return oled.make(i2c, d["width"], d["height"], d["addr"])


def buttons(callback, settle_ms=20, long_ms=800):
    return board_common.gpio_buttons(INFO, callback, settle_ms, long_ms)


def scanner():
    return board_common.uart_scanner(INFO)


# the same on every ESP32 board
storage = board_common.storage
halt = board_common.halt
network = board_common.network


def usb():
    from paytoken.drivers.esp32_usb import Usb

    return Usb(INFO)
