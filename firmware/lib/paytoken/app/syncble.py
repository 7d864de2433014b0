# Sync mode over BLE (docs/protocol.md section 9, "Sync service"): entered from either app on a long press of
# CONFIRM (the card on its ready screen, the terminal while its QR waits), it stops the payment transport,
# registers the sync service in its place, advertises it with the device's name and lets one relay (a phone or a
# PC, the GATT client: paytoken_host.sync_ble) drive the sync client (paytoken.sync_client): PULL gets the next
# sealed message 1, PUSH hands over the backend's message 2, STATUS the wake hint and the recent statuses. A relay
# that drops in the middle loses nothing (the open exchange is forgotten, the ledger keeps every record until the
# backend acknowledges it) and may connect again while sync mode lasts.
#
#   await run(wallet, backend_kx, name, screen, log, keys, restore=None) -> the summary line shown
#
# Sync mode ends once a relay completed the sync and left, after WINDOW_MS without that, or on a button press;
# then restore() gives the radio back to the app (the terminal registers its payment service again) and the sync
# modules are unloaded. Imported only here: nothing of sync is in RAM on the payment path.
import asyncio
from time import ticks_add, ticks_diff, ticks_ms

import bluetooth
from micropython import const

from paytoken.app.start import forget
from paytoken.ble import syncgatt
from paytoken.ble.irq import dispatcher
from paytoken.ble.peripheral import Peripheral
from paytoken.framing import MAX_MESSAGE
from paytoken.link import LinkError
from paytoken.sync_client import SyncClient, SyncError, counts, field, summary

WINDOW_MS = const(60000)  # sync mode lasts this long unless a relay completes the sync first
IDLE_MS = const(20000)  # a relay's next request must come within this long
REGISTER_MS = const(6000)  # a service is registered only without connections: the last ones may still linger
_EBUSY = const(16)  # errno EBUSY (not in every port's errno module)
_POLL_MS = const(250)  # buttons are looked at this often while no relay is connected
_MODULES = ("paytoken.app.syncble", "paytoken.ble.syncgatt", "paytoken.sync_client", "paytoken.syncwire")


async def _retry(fn):
    # fn() until the radio is free for it: OSError(EBUSY) while a connection lingers
    deadline = ticks_add(ticks_ms(), REGISTER_MS)
    while True:
        try:
            return fn()
        except OSError as e:
            if e.errno != _EBUSY or ticks_diff(deadline, ticks_ms()) <= 0:
                raise
        await asyncio.sleep_ms(100)


def handle(client, wallet, req):
    # One relay request -> the response (syncgatt). Refusals are answered, never raised.
    op = req[0]
    try:
        if op == syncgatt.PULL and len(req) == 1:
            m = client.request()
            return bytes((syncgatt.PULLED,)) if m is None else bytes((syncgatt.PULLED,)) + m
        if op == syncgatt.PUSH and len(req) > 1:
            return syncgatt.pushed(client.answer(memoryview(req)[1:]))
        if op == syncgatt.STATUS and len(req) == 1:
            return syncgatt.status(summary(wallet, client))
        return syncgatt.error(False, "bad request 0x%02x (%d bytes)" % (op, len(req)))
    except SyncError as e:
        return syncgatt.error(e.final, str(e))


async def serve(link, client, wallet, log):
    # One relay's requests until it leaves; its link error reason (closed, frame, timeout)
    while True:
        try:
            req = await link.recv(IDLE_MS)
        except LinkError as e:
            return e.reason
        resp = handle(client, wallet, req)
        req = None
        if resp[0] == syncgatt.ERROR:
            log("sync_ble_refused", "final=%d why=%s" % (resp[1], str(resp[2:], "ascii").replace(" ", "_")))
        try:
            await link.send(resp)
        except LinkError as e:
            return e.reason


async def run(wallet, backend_kx, name, screen, log, keys, restore=None):
    ble = bluetooth.BLE()
    p = None
    try:
        try:
            client = SyncClient(wallet, backend_kx)
        except SyncError as e:
            log("sync_ble_end", "done=0 why=%s" % str(e).replace(" ", "_"))
            screen.show("sync", "BLE", "not synced", str(e))
            return str(e)
        p = await _retry(lambda: Peripheral(ble, name, max_message=MAX_MESSAGE, uuids=syncgatt.UUIDS))
        adv = syncgatt.adv_payload()
        deadline = ticks_add(ticks_ms(), WINDOW_MS)
        keys.clear()
        relays = 0
        while not client.finished and ticks_diff(deadline, ticks_ms()) > 0:
            screen.show("sync", "BLE", "waiting", name)
            log("sync_ble_ready", "name=%s relays=%d" % (name, relays))
            p.advertise(adv)
            link = None
            while link is None and ticks_diff(deadline, ticks_ms()) > 0 and keys.get() is None:
                try:
                    link = await p.accept(_POLL_MS)
                except LinkError:
                    pass
            if link is None:
                break
            relays += 1
            log("sync_ble_relay", "n=%d" % relays)
            screen.show("sync", "BLE", "syncing", name)
            why = await serve(link, client, wallet, log)
            link.close()
            p.stop()
            log("sync_ble_left", "why=%s exchanges=%d finished=%d" % (why, client.exchanges, client.finished))
        done = client.finished and client.error is None
        line = counts(wallet) if done else (client.error or "not synced")
        log("sync_ble_end", "done=%d exchanges=%d applied=%d uploaded=%d statuses=%s" % (
            done, client.exchanges, client.applied, client.uploaded, field(line)))
        screen.show("sync", "BLE", "synced" if done else "not synced", line)
        return line
    finally:
        if p is not None:
            p.stop()  # also when an error ends sync mode: no relay stays connected, nothing advertises
        if restore is not None:
            await _retry(restore)
        elif p is not None and dispatcher(ble).peripheral is p:
            dispatcher(ble).peripheral = None
        for m in _MODULES:
            forget(m)
