# Every screen of the payee terminal and the payer card, as a function of a small state tuple:
#
#   render(fb, width, height, state)   state = (name, arg, ...); ValueError for an unknown name or a wrong
#                                      number of arguments. Draws the whole screen; the caller calls show().
#
#   ('payee_qr', qr_text[, amount, currency])   the payment QR (level L), dark on light, caption beside it
#   ('payee_waiting', amount_or_None, currency) the payer is connected; None: the payer enters the amount
#   ('payee_paid', amount, currency)
#   ('payee_error', reason_code)
#   ('payer_ready',)                            ready to scan the payee's QR
#   ('payer_amount', digits_entered, currency)  the amount being entered (digits in minor units, '' = 0)
#   ('payer_confirm', amount, currency, payee_id_hex_short)
#   ('payer_paid', amount, currency, balance)
#   ('payer_declined', reason_code)
#   ('payer_working', step_text)                a session under way: "Connecting...", "Sending..."
#   ('payer_unconfirmed', amount, currency)     the payment left, its receipt did not come: the backend decides
#   ('payer_balance', balance, currency, last_payments)  last_payments: [(role, amount, state), ...] with
#                                               role wire.ROLE_PAYER (money out) or ROLE_PAYEE (money in)
#   ('unprovisioned', detail)                   no complete device store: the device does not pay
#   ('sync', via, state, detail)                a sync through a relay, via "USB" or "BLE" (the title): "waiting" /
#                                               "syncing" (detail: the name BLE sync mode advertises), "synced" /
#                                               "not synced" (detail: the statuses counted, "settled 1", or why)
#   ('sync_statuses', title, last[, currency])  after the device synced itself: last as payer_balance's
#                                               (its newest payments' statuses), or the text of why it failed
#
# fb is the display driver's framebuf.FrameBuffer, monochrome: 1 = lit/light, 0 = dark (a colour driver
# maps 1 to white). Only framebuf drawing calls and the built-in 8x8 font; text is scaled up by whole
# factors where it fits, wrapped at word boundaries, and truncated (ending in "~") where it cannot fit,
# so every layout holds at 128x64 (SSD1306) and 240x135 (ST7789 T-Display). No hardware imports; the QR
# encoder is imported only by the payee's QR screen, so a payer card never loads it.
#
# money(amount, currency): minor units as text: "$100.00" (840), "EUR 12.50" (978), else "036 12.34".
# wrap(text, cols) / fit(text, cols): the text helpers, exposed for tests.
import framebuf

from paytoken import reasons

try:
    from micropython import const
except ImportError:  # CPython host tools
    def const(x):
        return x

CHAR = const(8)  # the built-in font: 8x8 pixels a character
_ROLE_PAYEE = const(2)  # wire.ROLE_PAYEE: the payment came in

# Button hints, one footer line each, named as the boards name their buttons (board.json: confirm, down; up
# on three-button boards). The application owns the buttons and the input scheme: it may replace these.
HINT_CONFIRM = "CONFIRM: pay\nDOWN: cancel"
HINT_AMOUNT = "DOWN: digit +1\nCONFIRM: next\nHOLD CONFIRM: ok"

# One glyph at a time for scaled text: 8 bytes, reused.
_glyph = bytearray(8)
_gfb = framebuf.FrameBuffer(_glyph, 8, 8, framebuf.MONO_HLSB)


def money(amount, currency):
    sign = ""
    if amount < 0:
        sign = "-"
        amount = -amount
    units = "%d.%02d" % (amount // 100, amount % 100)
    if currency == 840:
        return sign + "$" + units
    if currency == 978:
        return sign + "EUR " + units
    return "%s%03d %s" % (sign, currency, units)


def wrap(text, cols):
    # Lines of at most cols characters, broken at spaces and at every "\n"; a word longer than a line is cut
    # across lines.
    lines = []
    if cols < 1:
        return lines
    for para in text.split("\n"):
        line = ""
        for word in para.split():
            while len(word) > cols:
                if line:
                    lines.append(line)
                    line = ""
                lines.append(word[:cols])
                word = word[cols:]
            if not line:
                line = word
            elif len(line) + 1 + len(word) <= cols:
                line += " " + word
            else:
                lines.append(line)
                line = word
        if line:
            lines.append(line)
    return lines


def fit(text, cols):
    if len(text) <= cols:
        return text
    return text[:cols - 1] + "~" if cols > 1 else text[:max(0, cols)]


def _text(fb, s, x, y, c, k):
    # s at x, y in colour c, each font pixel k x k; rows of lit glyph pixels become one fill_rect each run.
    if k == 1:
        fb.text(s, x, y, c)
        return
    g = _glyph
    gfb = _gfb
    fill_rect = fb.fill_rect
    for ch in s:
        gfb.fill(0)
        gfb.text(ch, 0, 0, 1)
        for r in range(8):
            bits = g[r]
            col = 0
            while bits:
                if bits & 0x80:
                    start = col
                    while bits & 0x80:
                        bits = (bits << 1) & 0xFF
                        col += 1
                    fill_rect(x + start * k, y + r * k, (col - start) * k, k, c)
                else:
                    bits = (bits << 1) & 0xFF
                    col += 1
        x += CHAR * k


def _kfit(s, w, k):
    while k > 1 and len(s) * CHAR * k > w:
        k -= 1
    return k


def _center(fb, x0, w, y, s, c, k):
    s = fit(s, w // (CHAR * k))
    _text(fb, s, x0 + (w - len(s) * CHAR * k) // 2, y, c, k)


def _scales(w, h):
    # (text, big) scale: 1 and 2 on a 128x64 OLED, 2 and 3 on a 240x135 panel
    if w >= 200 and h >= 120:
        return 2, 3
    return 1, 2


def _block(text, kmax, nmax, w):
    # The largest scale <= kmax at which text takes at most nmax lines without cutting a word, else scale 1.
    words = text.split()
    k = kmax
    while k > 1:
        cols = w // (CHAR * k)
        lines = wrap(text, cols)
        if len(lines) <= nmax and all(len(x) <= cols for x in words):
            return lines, k
        k -= 1
    return wrap(text, w // CHAR), 1


def _stack(fb, x0, w, top, bottom, items, c):
    # items: (text, kmax, nmax) from top to bottom, each line centred in [x0, x0 + w), the blocks spread
    # evenly over [top, bottom), at least 2 px apart. Scales shrink until everything fits; lines that still
    # don't are left out.
    n = len(items)
    cap = 0
    for item in items:
        cap = max(cap, item[1])
    while True:
        blocks = []
        used = 0
        for text, kmax, nmax in items:
            lines, k = _block(text, min(kmax, cap), nmax, w)
            blocks.append((lines, k))
            used += len(lines) * 9 * k - k
        if used + 2 * (n - 1) <= bottom - top or cap == 1:
            break
        cap -= 1
    free = bottom - top - used
    inner = edge = max(0, free // (n + 1))
    if n > 1 and inner < 2:
        inner = max(0, min(2, free // (n - 1)))
        edge = max(0, (free - inner * (n - 1)) // 2)
    y = top + edge
    last = None
    for lines, k in blocks:
        for line in lines:
            if y + CHAR * k > bottom:
                if last:  # the last line drawn ends in "~": there was more
                    line, ly, lk = last
                    fb.fill_rect(x0, ly, w, CHAR * lk, 1 - c)
                    _center(fb, x0, w, ly, line + "~", c, lk)
                return
            _center(fb, x0, w, y, line, c, k)
            last = (line, y, k)
            y += 9 * k
        y += inner - k


def _frame(fb, w, h, title):
    # Dark screen with the title in a lit bar; returns (first free row, text scale, big scale).
    kt, kb = _scales(w, h)
    fb.fill(0)
    k = _kfit(title, w, kt)
    bar = CHAR * k + 4
    fb.fill_rect(0, 0, w, bar, 1)
    _center(fb, 0, w, 2, title, 0, k)
    return bar + 1, kt, kb


def _footer(fb, w, h, hint, kt):
    # Button hints on the bottom lines ("\n" between them), under a rule; returns the row above it.
    lines = hint.split("\n")
    k = kt
    for line in lines:
        k = _kfit(line, w, k)
    y = h - len(lines) * 9 * k + k - 1
    fb.hline(0, y - 2, w, 1)
    top = y - 3
    for line in lines:
        _center(fb, 0, w, y, line, 1, k)
        y += 9 * k
    return top


def _reason(code):
    s = reasons.name(code)
    return s[:1].upper() + s[1:]


# ---- payee terminal ----

def payee_qr(fb, w, h, qr_text, amount=None, currency=None):
    from paytoken import qr
    from paytoken.ui import qrdraw
    code = qr.encode(qr_text, 'L')
    scale, x, y = qrdraw.layout(code.size, w, h)
    side = code.size * scale
    # caption right of the symbol, after a light gap as wide as the quiet zone on its left
    cx = x + side + x
    cw = w - cx - 1
    fb.fill(1)
    if cw < 4 * CHAR:
        x = (w - side) // 2
    else:
        kt, kb = _scales(w, h)
        items = [("SCAN TO PAY", kt, 3)]
        if amount is not None:
            items.append((money(amount, currency), kb, 2))
        _stack(fb, cx, cw, 0, h, items, 0)
    qrdraw.draw(fb, code, x, y, scale)


def payee_waiting(fb, w, h, amount, currency):
    top, kt, kb = _frame(fb, w, h, "PAYMENT")
    if amount is None:
        first = ("Payer enters amount", kt, 2)
    else:
        first = (money(amount, currency), kb, 2)
    _stack(fb, 0, w, top, h, [first, ("Waiting for payer...", kt, 2)], 1)


def payee_paid(fb, w, h, amount, currency):
    top, kt, kb = _frame(fb, w, h, "RECEIVED")
    _stack(fb, 0, w, top, h, [(money(amount, currency), kb, 2), ("Payment received", kt, 2)], 1)


def payee_error(fb, w, h, code):
    top, kt, _ = _frame(fb, w, h, "NOT PAID")
    _stack(fb, 0, w, top, h, [(_reason(code), kt, 3), ("Payment failed", kt, 2)], 1)


# ---- payer card ----

def payer_ready(fb, w, h):
    top, kt, kb = _frame(fb, w, h, "WALLET")
    _stack(fb, 0, w, top, h, [("READY", kb, 1), ("Scan the payee's QR code", kt, 3)], 1)


def payer_amount(fb, w, h, digits, currency):
    top, kt, kb = _frame(fb, w, h, "ENTER AMOUNT")
    bottom = _footer(fb, w, h, HINT_AMOUNT, kt)
    _stack(fb, 0, w, top, bottom, [(money(int(digits or 0), currency), kb, 2)], 1)


def payer_confirm(fb, w, h, amount, currency, payee):
    top, kt, kb = _frame(fb, w, h, "CONFIRM PAYMENT")
    bottom = _footer(fb, w, h, HINT_CONFIRM, kt)
    _stack(fb, 0, w, top, bottom, [(money(amount, currency), kb, 2), ("to " + payee, kt, 2)], 1)


def payer_paid(fb, w, h, amount, currency, balance):
    top, kt, kb = _frame(fb, w, h, "PAID")
    b = "Balance " + money(balance, currency)
    if len(b) * CHAR * kt > w:
        b = "Balance\n" + b[8:]
    _stack(fb, 0, w, top, h, [(money(amount, currency), kb, 2), (b, kt, 2)], 1)


def payer_declined(fb, w, h, code):
    top, kt, _ = _frame(fb, w, h, "DECLINED")
    _stack(fb, 0, w, top, h, [(_reason(code), kt, 3)], 1)


def payer_working(fb, w, h, step):
    top, kt, _ = _frame(fb, w, h, "PAYING")
    _stack(fb, 0, w, top, h, [(step, kt, 3)], 1)


def payer_unconfirmed(fb, w, h, amount, currency):
    top, kt, kb = _frame(fb, w, h, "NO RECEIPT")
    _stack(fb, 0, w, top, h, [(money(amount, currency) + " sent", kb, 2), ("Settled at next sync", kt, 2)], 1)


def unprovisioned(fb, w, h, detail):
    top, kt, _ = _frame(fb, w, h, "NOT SET UP")
    _stack(fb, 0, w, top, h, [("Device not provisioned", kt, 2), (detail, 1, 3)], 1)


def sync(fb, w, h, via, state, detail):
    top, kt, _ = _frame(fb, w, h, via + " SYNC")
    if state == "waiting":
        items = [("Waiting for relay", kt, 2), ("as " + detail, kt, 2)]
    elif state == "syncing":
        items = [("Syncing...", kt, 2), (detail, kt, 2)]
    else:
        items = [(state + ":", kt, 2), (detail, kt, 3)]
    _stack(fb, 0, w, top, h, items, 1)


def payer_balance(fb, w, h, balance, currency, last):
    top, kt, kb = _frame(fb, w, h, "BALANCE")
    s = money(balance, currency)
    k = _kfit(s, w, kb)
    _center(fb, 0, w, top + 2, s, 1, k)
    y = top + 2 + CHAR * k + 4
    if not last:
        _center(fb, 0, w, y, "No payments", 1, kt)
        return
    _payments(fb, w, h, y, kt, last, currency)


def sync_statuses(fb, w, h, title, last, currency=840):
    # After the device synced itself (paytoken.app.wifisync): its newest payments and the status its own ledger
    # now holds for each; last is a text instead when the sync failed (why).
    top, kt, _ = _frame(fb, w, h, title)
    if isinstance(last, str):
        _stack(fb, 0, w, top, h, [(last, 1, 4)], 1)
    elif not last:
        _center(fb, 0, w, top + 2, "No payments", 1, kt)
    else:
        _payments(fb, w, h, top + 2, kt, last, currency)


def _payments(fb, w, h, y, kt, last, currency):
    # one row a payment from row y, amount left and state right; the text scale kt if every row fits at it, else 1
    rows = []
    k = kt
    for role, amount, state in last:
        left = ("+" if role == _ROLE_PAYEE or role == "payee" else "-") + money(amount, currency)
        rows.append((left, state))
        if (len(left) + 1 + len(state)) * CHAR * k > w:
            k = 1
    cols = w // (CHAR * k)
    for left, state in rows:
        if y + CHAR * k > h:
            return
        room = cols - len(left) - 1
        if room < 1:
            _text(fb, fit(left, cols), 0, y, 1, k)
        else:
            state = fit(state, room)
            _text(fb, left, 0, y, 1, k)
            _text(fb, state, w - len(state) * CHAR * k, y, 1, k)
        y += 9 * k + 1


# name -> (function, fewest arguments, most arguments)
_SCREENS = {
    "payee_qr": (payee_qr, 1, 3),
    "payee_waiting": (payee_waiting, 2, 2),
    "payee_paid": (payee_paid, 2, 2),
    "payee_error": (payee_error, 1, 1),
    "payer_ready": (payer_ready, 0, 0),
    "payer_amount": (payer_amount, 2, 2),
    "payer_confirm": (payer_confirm, 3, 3),
    "payer_paid": (payer_paid, 3, 3),
    "payer_declined": (payer_declined, 1, 1),
    "payer_balance": (payer_balance, 3, 3),
    "payer_working": (payer_working, 1, 1),
    "payer_unconfirmed": (payer_unconfirmed, 2, 2),
    "unprovisioned": (unprovisioned, 1, 1),
    "sync": (sync, 3, 3),
    "sync_statuses": (sync_statuses, 2, 3),
}
NAMES = tuple(sorted(_SCREENS))


def render(fb, width, height, state):
    if not isinstance(state, (tuple, list)) or not state or not isinstance(state[0], str):
        raise ValueError("screen: state must be (name, ...)")
    entry = _SCREENS.get(state[0])
    if entry is None:
        raise ValueError("screen: unknown screen %s" % state[0])
    fn, lo, hi = entry
    if not lo <= len(state) - 1 <= hi:
        raise ValueError("screen: %s takes %d to %d arguments" % (state[0], lo, hi))
    fn(fb, width, height, *state[1:])
