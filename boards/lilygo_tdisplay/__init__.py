# Board: LILYGO TTGO T-Display (ESP32, ST7789V 240x135 IPS LCD, buttons on GPIO 0 and 35) + a GM65/GM861
# scanner on UART1. Pins and settings live in board.json (INFO); boards/README.md has the wiring.
#   INFO                                   board.json, parsed
#   display()                              -> width, height, fb (1 = white), show(), power(on)
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
    from paytoken.drivers.st7789 import ST7789

    d = INFO["display"]
    Pin = machine.Pin
    spi = machine.SPI(d["spi"], baudrate=d["baud"], polarity=0, phase=0, sck=Pin(d["sclk"]), mosi=Pin(d["mosi"]))
    return ST7789(
        spi,
        dc=Pin(d["dc"], Pin.OUT),
        cs=Pin(d["cs"], Pin.OUT, value=1),
        rst=Pin(d["rst"], Pin.OUT, value=1),
        bl=Pin(d["bl"], Pin.OUT, value=0),  # dark until the panel holds a picture
        width=d["width"],
        height=d["height"],
        x_off=d["x_off"],
        y_off=d["y_off"],
        madctl=d["madctl"],
    )


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
