# A QR symbol (paytoken.qr.encode's result) drawn into a framebuf.FrameBuffer: dark modules dark (colour 0)
# on a light (1) background, also on an OLED, because scanners expect dark-on-light.
#
#   layout(size, width, height) -> (scale, x, y): the largest whole number of pixels per module that leaves
#       a quiet zone of at least 1.5 modules above and below (docs/protocol.md: decoders read 1.5 reliably;
#       ISO/IEC 18004's 4 modules do not fit a 64-px display), the symbol centred vertically; on its left
#       the same light margin, but no more than ISO's 4 modules (the rest of the width is the caption's).
#       128x64: version 3 (29 modules) at 2 px = 58 px, 3 px above and below; version 4 (33) only fits at
#       1 px. 240x135: version 3 at 4 px, version 4 at 3 px.
#   draw(fb, code, x, y, scale): every run of dark modules in a row is one fill_rect; the caller has filled
#       the background light.


def layout(size, width, height):
    side = min(width, height)
    # (size + 2 * 1.5) * scale <= side, in whole numbers
    scale = max(1, 2 * side // (2 * size + 3))
    margin = max(0, (height - size * scale) // 2)
    return scale, min(margin, 4 * scale), margin


def draw(fb, code, x, y, scale):
    s = code.size
    m = code.modules  # bytearray, row-major, 1 = dark (paytoken.qr.QrCode)
    fill_rect = fb.fill_rect
    for r in range(s):
        row = r * s
        py = y + r * scale
        c = 0
        while c < s:
            if m[row + c]:
                start = c
                while c < s and m[row + c]:
                    c += 1
                fill_rect(x + start * scale, py, (c - start) * scale, scale, 0)
            else:
                c += 1
