# Runs on MicroPython: payee terminals and payer cards in one process and one asyncio loop, each with its own
# flash image (board.storage), simulated display, buttons and scanner, talking through fake_air's radio.
# pytest (tests/test_apps.py) drives it one call at a time: the apps' tasks stay scheduled between calls
# and run whenever a call runs the loop (wait, settle).
#
#   rig = Rig()
#   rig.add(image, mount, addr=None, png=None)   a provisioned device; its app starts; name from its store
#   rig.wait(name, event, timeout_ms) -> {...}   runs the loop until that device logs that event (after the
#                                                previous one waited for); its key=value fields
#   rig.until_screen(name, screen, timeout_ms)   runs the loop until that screen shows
#   rig.settle(ms)                               runs the loop for ms
#   rig.scan(name, text=None)                    holds a QR in front of a card (default: the one a terminal shows)
#   rig.press(name, button, hold="short")
#   rig.state(name) -> {...}                     balance, counter, offline spending, history, screen
#   rig.close()                                  cancels the apps, unmounts the images
import asyncio

import fake_air

import board
from paytoken.app import start
from paytoken.app.io import Screen
from paytoken.wallet import Wallet

EVENTS = []


def out(line):
    EVENTS.append(line)
    print(line)


async def _sleep(ms):
    await asyncio.sleep_ms(ms)


def fields(line):
    parts = line.split()
    d = {"device": parts[1], "event": parts[2]}
    for p in parts[3:]:
        k, _, v = p.partition("=")
        d[k] = int(v) if v.lstrip("-").isdigit() else v
    return d


class Rig:
    def __init__(self):
        del EVENTS[:]
        self.air = fake_air.Air()
        self.apps = {}
        self.devices = {}
        self.tasks = {}
        self.mounts = []
        self.cursor = {}
        self.crashed = []

    def add(self, image, mount, addr=b"\xc2\x11\x22\x33\x44\x55", png=None):
        root = board.storage(image, mount)
        self.mounts.append(mount)
        dev, trust, wallet = start.open_device(root)
        if dev.app == "terminal":
            radio = fake_air.PayeeRadio(self.air, addr)
        else:
            radio = fake_air.PayerRadio(self.air)
        screen = Screen(board.display(path=png))
        app = start.build(board, dev, trust, wallet, radio, screen, out)
        self.apps[dev.name] = app
        self.devices[dev.name] = dev
        self.cursor[dev.name] = 0
        self.tasks[dev.name] = asyncio.create_task(self._run(dev.name, app))
        return dev.name

    async def _run(self, name, app):
        try:
            await app.run()
        except asyncio.CancelledError:
            raise
        except BaseException as e:  # the apps promise never to raise: a test fails if one does
            self.crashed.append("%s: %s %s" % (name, type(e).__name__, e))
            raise

    def _check(self):
        if self.crashed:
            raise AssertionError("app crashed: " + "; ".join(self.crashed))

    async def _wait(self, cond, timeout_ms, what):
        waited = 0
        while not cond():
            self._check()
            if waited >= timeout_ms:
                raise AssertionError("timed out after %d ms waiting for %s" % (timeout_ms, what))
            await asyncio.sleep_ms(2)
            waited += 2
        self._check()

    def wait(self, name, event, timeout_ms=5000):
        found = []

        def seen():
            i = self.cursor[name]
            while i < len(EVENTS):
                d = fields(EVENTS[i])
                i += 1
                if d["device"] == name and d["event"] == event:
                    self.cursor[name] = i
                    found.append(d)
                    return True
            return False

        asyncio.run(self._wait(seen, timeout_ms, "%s %s" % (name, event)))
        return found[0]

    def until_screen(self, name, screen, timeout_ms=5000):
        app = self.apps[name]
        asyncio.run(self._wait(lambda: app.screen.state and app.screen.state[0] == screen, timeout_ms,
                               "%s screen %s" % (name, screen)))
        return app.screen.state

    def settle(self, ms):
        asyncio.run(_sleep(ms))
        self._check()

    def qr_text(self, name):
        state = self.apps[name].screen.state
        assert state[0] == "payee_qr", state
        return state[1]

    def scan(self, name, text):
        self.apps[name].scanner.feed(text)

    def press(self, name, button, hold="short"):
        self.apps[name].keys.buttons.press(button, hold)

    def state(self, name):
        app = self.apps[name]
        w = app.wallet
        return {"balance": w.balance, "counter": w.counter, "offline_spent": w.offline_spent, "seq": w.seq,
                "history": [[r[0], r[2], r[3]] for r in w.history()], "screen": list(app.screen.state or ()),
                "frames": app.screen.display.frames}

    def reopened(self, name):
        # The wallet as a reboot would find it: replayed from the ledger on the flash image.
        dev = self.devices[name]
        app = self.apps[name]
        w = Wallet(dev.ledger_path, dev.identity_priv, dev.cert_raw, app.trust)
        try:
            return {"balance": w.balance, "counter": w.counter, "seq": w.seq,
                    "history": [[r[0], r[2], r[3]] for r in w.history()]}
        finally:
            w.ledger.close()

    def close(self):
        for t in self.tasks.values():
            t.cancel()
        try:
            asyncio.run(_sleep(5))
        except BaseException:
            pass
        for app in self.apps.values():
            app.wallet.ledger.close()
        for m in self.mounts:
            board.unmount(m)
        self.mounts = []
