# ST7789 SPI LCD behind a monochrome frame buffer (micropython-lib has no ST7789 driver).
#
#   d = ST7789(spi, dc, cs=None, rst=None, bl=None, width=240, height=135, x_off=40, y_off=53)
#   d.fb (framebuf MONO_HLSB, width*height/8 bytes: 4050 for 240x135), d.show(), d.power(on)
#   d.colors(fg=0xFFFF, bg=0x0000)   RGB565 for fb colour 1 and 0 (white on black by default)
#
# The app draws in 1 bit a pixel; show() sends the panel RGB565 one row at a time through a 2*width
# byte line buffer (480 bytes), never a full-colour frame (240*135*2 = 64 KB). The row conversion is
# framebuf's blit with a 2-colour palette, in C.
#
# LILYGO T-Display: a 135x240 IPS panel on a 240x320 ST7789V. Landscape is MADCTL MX|MV (0x60), and the
# visible area then starts at column 40, row 53 of the controller's memory (portrait: 52, 40); the panel
# needs inverted colours (INVON) to show white as white.
# Init (ST7789V datasheet): hardware reset, SWRESET, SLPOUT, COLMOD 0x55 (16 bit/pixel), MADCTL, INVON,
# CASET/RASET, NORON, DISPON. Waits: 120 ms after a reset before SLPOUT, 5 ms after SLPOUT before the
# next command, 120 ms after SLPOUT before a SLPIN.
#
# MADCTL 0x60 is RGB order; a panel that swaps red and blue in colors() needs 0x68 (BGR bit).
# spi: machine.SPI (mode 0, up to 40 MHz on the GPIO matrix); dc, cs, rst, bl: machine.Pin outputs.
from struct import pack_into
from time import sleep_ms

import framebuf
from micropython import const

_SWRESET = const(0x01)
_SLPIN = const(0x10)
_SLPOUT = const(0x11)
_NORON = const(0x13)
_INVON = const(0x21)
_DISPOFF = const(0x28)
_DISPON = const(0x29)
_CASET = const(0x2A)
_RASET = const(0x2B)
_RAMWR = const(0x2C)
_MADCTL = const(0x36)
_COLMOD = const(0x3A)


class ST7789:
    def __init__(
        self,
        spi,
        dc,
        cs=None,
        rst=None,
        bl=None,
        width=240,
        height=135,
        x_off=40,
        y_off=53,
        madctl=0x60,
        invert=True,
        init=True,
    ):
        self.spi = spi
        self.dc = dc
        self.cs = cs
        self.rst = rst
        self.bl = bl
        self.width = width
        self.height = height
        self.x_off = x_off
        self.y_off = y_off
        self.madctl = madctl
        self.invert = invert
        self.buffer = bytearray(((width + 7) // 8) * height)
        self.fb = framebuf.FrameBuffer(self.buffer, width, height, framebuf.MONO_HLSB)
        self.line = bytearray(2 * width)
        self._line_fb = framebuf.FrameBuffer(self.line, width, 1, framebuf.RGB565)
        self._palette = framebuf.FrameBuffer(bytearray(4), 2, 1, framebuf.RGB565)
        self._one = bytearray(1)
        self._win = bytearray(4)
        self.colors()
        if cs is not None:
            cs.value(1)
        if init:
            self.init()

    def colors(self, fg=0xFFFF, bg=0x0000):
        # framebuf keeps RGB565 little-endian; the panel reads it big-endian: store the bytes swapped
        self._palette.pixel(1, 0, ((fg & 0xFF) << 8) | (fg >> 8))
        self._palette.pixel(0, 0, ((bg & 0xFF) << 8) | (bg >> 8))

    def _cmd(self, c, data=None):
        cs = self.cs
        if cs is not None:
            cs.value(0)
        self.dc.value(0)
        self._one[0] = c
        self.spi.write(self._one)
        if data:
            self.dc.value(1)
            self.spi.write(data)
        if cs is not None:
            cs.value(1)

    def init(self):
        if self.rst is not None:
            self.rst.value(1)
            sleep_ms(5)
            self.rst.value(0)
            sleep_ms(10)  # datasheet: >= 10 us low
            self.rst.value(1)
            sleep_ms(120)
        self._cmd(_SWRESET)
        sleep_ms(150)
        self._cmd(_SLPOUT)
        sleep_ms(10)
        self._cmd(_COLMOD, b"\x55")
        sleep_ms(10)
        self._cmd(_MADCTL, bytes((self.madctl,)))
        if self.invert:
            self._cmd(_INVON)
        self._window()
        self._cmd(_NORON)
        sleep_ms(10)
        self.fb.fill(0)
        self.show()  # the panel's RAM holds noise after power-up: black before it lights
        self._cmd(_DISPON)
        sleep_ms(10)
        if self.bl is not None:
            self.bl.value(1)

    def _window(self):
        # the whole visible area, in controller coordinates
        w = self._win
        pack_into(">HH", w, 0, self.x_off, self.x_off + self.width - 1)
        self._cmd(_CASET, w)
        pack_into(">HH", w, 0, self.y_off, self.y_off + self.height - 1)
        self._cmd(_RASET, w)

    def show(self):
        self._window()
        self._cmd(_RAMWR)
        cs = self.cs
        if cs is not None:
            cs.value(0)
        self.dc.value(1)
        line_fb = self._line_fb
        fb = self.fb
        pal = self._palette
        write = self.spi.write
        line = self.line
        for y in range(self.height):
            line_fb.blit(fb, 0, -y, -1, pal)  # row y of the mono buffer -> RGB565
            write(line)
        if cs is not None:
            cs.value(1)

    def power(self, on):
        if on:
            self._cmd(_SLPOUT)
            sleep_ms(120)
            self._cmd(_DISPON)
            if self.bl is not None:
                self.bl.value(1)
        else:
            if self.bl is not None:
                self.bl.value(0)
            self._cmd(_DISPOFF)
            self._cmd(_SLPIN)
            sleep_ms(5)
