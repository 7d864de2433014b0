# paytoken.ui: what the payer card and the payee terminal show. Pure drawing into a framebuf.FrameBuffer
# the board's display driver owns (monochrome: 1 = lit/light, 0 = dark); no hardware imports here.
#   screens.py  render(fb, width, height, state): every screen as a function of a small state tuple
#   qrdraw.py   the payee's QR code: scale and placement for a display, modules drawn as rectangles
