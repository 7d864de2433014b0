# What both apps use to meet the world: the screen, the buttons as a queue of decisions, and the event
# lines the harness and the demo follow.
#
#   screen = Screen(display)            show(name, args...) renders a paytoken.ui.screens state and shows it;
#                                       .state is the last state shown
#   keys = Keys(board.buttons)          the board's buttons, polled while the app waits for one:
#                                       await keys.next(timeout_ms, link) -> (name, "short" | "long"),
#                                       (None, "timeout"), or (None, "closed") once link.closed
#   log = Log(device_name, out=print)   log("paid", "amount=%d" % n) prints "EVENT <device> paid amount=..."
#
# Event lines: "EVENT <device> <event> key=value ...", one line per event, values never contain spaces
# (bytes in hex, reasons as code and name with "_"). docs/architecture.md lists the events.
import asyncio
from binascii import hexlify
from time import ticks_add, ticks_diff, ticks_ms

from paytoken import link, reasons
from paytoken.ui import screens

POLL_MS = 20  # buttons and scanner are looked at this often while the app waits
_QUEUE = 8  # button events kept; older ones are dropped


def hexs(b):
    return hexlify(b).decode()


def why(code):
    return "reason=%d why=%s" % (code, reasons.name(code).replace(" ", "_"))


def link_reason(e):
    # The reason code a LinkError is shown and logged with (link errors have no protocol code).
    r = e.reason
    if r == link.TIMEOUT:
        return reasons.TIMEOUT
    if r == link.BUSY:
        return reasons.BUSY
    if r == link.UNREACHABLE:
        return reasons.UNREACHABLE
    return reasons.LINK


class Screen:
    def __init__(self, display):
        self.display = display
        self.state = None

    def show(self, *state):
        d = self.display
        screens.render(d.fb, d.width, d.height, state)
        d.show()
        self.state = state


class Keys:
    # Short and long presses as (name, event), oldest first; presses, releases and overflow are dropped.
    def __init__(self, make_buttons):
        self._q = []
        self.buttons = make_buttons(self._on)

    def _on(self, name, event):
        if event == "short" or event == "long":
            q = self._q
            q.append((name, event))
            if len(q) > _QUEUE:
                q.pop(0)

    def clear(self):
        # forget presses made before the question was on the screen
        self.buttons.poll()
        del self._q[:]

    def get(self):
        self.buttons.poll()
        return self._q.pop(0) if self._q else None

    async def next(self, timeout_ms, link=None):
        deadline = ticks_add(ticks_ms(), timeout_ms)
        while True:
            k = self.get()
            if k is not None:
                return k
            if link is not None and link.closed:
                return None, "closed"
            if ticks_diff(deadline, ticks_ms()) <= 0:
                return None, "timeout"
            await asyncio.sleep_ms(POLL_MS)


class Log:
    def __init__(self, device, out=None):
        self.device = device
        self.out = out or print

    def __call__(self, event, text=""):
        self.out("EVENT %s %s%s" % (self.device, event, " " + text if text else ""))
