# SSD1306 OLED over I2C through micropython-lib's ssd1306 driver, adapted to the display contract.
#
#   d = make(i2c, width=128, height=64, addr=0x3C)   -> OLED: width, height, fb, show(), power(on)
#
# ssd1306 is not in the stock ESP32 build: `make deploy` installs it on the device with mip (board.json
# "mip"). It is imported only when a display is made, so this module loads anywhere (the unix port,
# the tests) and a board without an OLED never needs it. SSD1306_I2C is itself a framebuf.FrameBuffer
# (MONO_VLSB, 1 KB at 128x64; colour 1 = lit), so fb is the driver object and show() its own.


class OLED:
    def __init__(self, dev, width, height):
        self.dev = dev
        self.fb = dev
        self.width = width
        self.height = height

    def show(self):
        self.dev.show()

    def power(self, on):
        if on:
            self.dev.poweron()
        else:
            self.dev.poweroff()

    def contrast(self, level):
        self.dev.contrast(level)


def make(i2c, width=128, height=64, addr=0x3C, external_vcc=False):
    import ssd1306  # from mip at deploy (board.json "mip"), not in the firmware image

    dev = ssd1306.SSD1306_I2C(width, height, i2c, addr, external_vcc)
    return OLED(dev, width, height)
