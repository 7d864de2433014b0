# paytoken.drivers: the hardware edge. Boards (boards/<name>/__init__.py) build these from machine.Pin,
# machine.UART, machine.SPI and machine.I2C; the pure-logic firmware never imports them.
#   buttons.py  Debouncer (pure logic: samples or edges in, press/short/long/release out) + Buttons (GPIO)
#   scanner.py  GM65 / GM861 style QR scanner on a UART-like object: trigger, decoded lines, ACKs skipped
#   st7789.py   ST7789 SPI LCD behind a monochrome framebuf, converted to RGB565 one line at a time
#   oled.py     micropython-lib's ssd1306 (installed with mip) adapted to the display contract
#
# Display contract (paytoken.ui relies on it): width, height, fb (a framebuf.FrameBuffer, colour 1 = lit /
# light, 0 = dark) and show(); power(on) switches the panel on or off.
