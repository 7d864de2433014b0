# Debounced push buttons.
#
# Debouncer(emit, settle_ms=20, long_ms=800) is pure logic, fed raw levels with their times (ticks_ms):
#   feed(pressed, now)  a sample or an edge: the raw level is `pressed` from `now` on
#   poll(now)           time passes: emits what has become due (a settled level, a long press)
# A raw level counts once it has held for settle_ms: bounces shorter than that never reach the app.
# emit(event) is called with, in order, for one press:
#   PRESS    the press has settled (for feedback; act on SHORT or LONG)
#   LONG     held for long_ms since the press began (once, while still held)
#   SHORT    released (settled) before LONG fired: a short press
#   RELEASE  released after LONG fired (or a press under way when the Debouncer was made, pressed=True)
# poll() emits everything due, even when it was not called for a while (PRESS then LONG, say).
#
# Buttons(pins, callback, ...) is the GPIO part: machine.Pin objects (active low, as the boards wire
# them), one IRQ on both edges each. The IRQ handler only notes the level and time and hands off with
# micropython.schedule; the debouncing runs in that scheduled call and in poll(), which the app calls
# every 10-20 ms (a settled level or a long press is noticed only by a later poll, edges or not).
# callback(name, event) runs outside IRQ context.
from time import ticks_diff, ticks_ms

import micropython

PRESS = "press"
SHORT = "short"
LONG = "long"
RELEASE = "release"


class Debouncer:
    def __init__(self, emit, settle_ms=20, long_ms=800, pressed=False, now=0):
        self.emit = emit
        self.settle_ms = settle_ms
        self.long_ms = long_ms
        self.pressed = pressed  # the debounced state
        self._raw = pressed
        self._raw_t = now  # when the raw level last changed
        self._down_t = now  # when the settled press began (its first edge)
        self._long = pressed  # a press already under way when we start is nobody's: no SHORT, no LONG

    def feed(self, pressed, now):
        # what was due before this edge happened first, so an edge can't hide a settled level
        self.poll(now)
        if pressed != self._raw:
            self._raw = pressed
            self._raw_t = now

    def poll(self, now):
        while self._step(now):
            pass

    def _step(self, now):
        if self.pressed and not self._long:
            # held until now, or until the raw release (if that release turns out to be real)
            held = ticks_diff(now if self._raw else self._raw_t, self._down_t)
            if held >= self.long_ms:
                self._long = True
                self.emit(LONG)
                return True
        if self._raw != self.pressed and ticks_diff(now, self._raw_t) >= self.settle_ms:
            self.pressed = self._raw
            if self._raw:
                self._down_t = self._raw_t
                self._long = False
                self.emit(PRESS)
            else:
                self.emit(RELEASE if self._long else SHORT)
            return True
        return False


class Buttons:
    # pins: ((name, machine.Pin), ...), each configured as an input (with its pull-up where needed)
    def __init__(self, pins, callback, settle_ms=20, long_ms=800, active_low=True):
        self.names = tuple(n for n, _ in pins)
        self._pins = tuple(p for _, p in pins)
        self._active = 0 if active_low else 1
        now = ticks_ms()
        self._deb = tuple(
            Debouncer(self._emitter(callback, n), settle_ms, long_ms, p.value() == self._active, now) for n, p in pins
        )
        k = len(self._pins)
        # filled by the IRQ handler, read by _service: preallocated, the handler allocates nothing
        self._level = [False] * k
        self._time = [0] * k
        self._dirty = [False] * k
        self._scheduled = False
        self._service_ref = self._service  # a bound method made now, not in the handler
        for i, p in enumerate(self._pins):
            p.irq(trigger=p.IRQ_FALLING | p.IRQ_RISING, handler=self._handler(i))

    @staticmethod
    def _emitter(callback, name):
        return lambda event: callback(name, event)

    def _handler(self, i):
        pin = self._pins[i]
        active = self._active

        def irq(_):
            self._level[i] = pin.value() == active
            self._time[i] = ticks_ms()
            self._dirty[i] = True
            if not self._scheduled:
                try:
                    micropython.schedule(self._service_ref, 0)
                    self._scheduled = True
                except RuntimeError:  # schedule queue full: the next poll() picks the edge up
                    pass

        return irq

    def _service(self, _):
        self._scheduled = False
        for i in range(len(self._deb)):
            if self._dirty[i]:
                self._dirty[i] = False
                self._deb[i].feed(self._level[i], self._time[i])

    def poll(self, now=None):
        # Call every 10-20 ms: finishes settles and long presses; sampling the pins also repairs a
        # missed edge (the IRQ saw a bounce but not the final level).
        self._service(0)
        if now is None:
            now = ticks_ms()
        for i in range(len(self._deb)):
            self._deb[i].feed(self._pins[i].value() == self._active, now)

    def pressed(self, name):
        return self._deb[self.names.index(name)].pressed

    def close(self):
        for p in self._pins:
            p.irq(handler=None)
