# A device syncing itself over its Wi-Fi (the simulator's online switch), then showing what its own ledger now
# says of its newest payments: the 'sync_statuses' screen and one event line a payment.
#
#   run(board, out=None) -> True when the device had nothing more to say, False when the backend could not be
#       reached or refused (the screen and a "failed" event say why).
#   sync(board, dev, wallet, screen, log)            the same on a device the app has open
#   every(board, app, dev, wallet, screen, log, s)   the running terminal's own schedule (start.run starts it
#       when the board is online and the config asks: "sync_every_s")
#
# Events: "EVENT <device> synced exchanges=N applied=N", then "EVENT <device> status txid=.. amount=.. status=.."
# per payment (newest last), or "EVENT <device> failed why=..". Imported only to sync: never on the payment path
# (the app's start.run does not import it; tests/test_app_heap.py checks the module sets).
from paytoken.app import start
from paytoken.app.io import Log, Screen, hexs

SHOWN = 4  # payments on the screen (sync_client.statuses' newest)
SHOW_MS = 4000  # a scheduled sync's outcome stays on the screen this long


def run(board, out=None):
    # A sync on its own (the demo's Wi-Fi step, a device woken to sync): opens the device, syncs, closes it.
    screen = Screen(board.display())
    dev, _, wallet = start.open_device(board.storage())
    try:
        return sync(board, dev, wallet, screen, Log(dev.name, out))
    finally:
        wallet.ledger.close()


def sync(board, dev, wallet, screen, log):
    # One sync of an open device over its Wi-Fi (board.network(config) -> the backend's URL), then its statuses
    # on the screen and in event lines. True when the device had nothing more to say.
    from paytoken import sync_client, sync_http

    failures = []  # the transport's errors: sync_over tries again after each
    try:
        client = sync_client.SyncClient(wallet, dev.backend_kx)
        post = sync_http.poster(board.network(dev.config))

        def tracked(msg):
            try:
                return post(msg)
            except OSError as e:
                failures.append(e)
                raise

        if not client.sync_over(tracked):
            raise OSError(str(failures[-1]) if failures else "more to upload than one sync takes")
    except (OSError, sync_client.SyncError) as e:
        why = str(e) or type(e).__name__
        screen.show("sync_statuses", "NOT SYNCED", why)
        log("failed", "why=" + why.replace(" ", "_"))
        return False
    rows = sync_client.statuses(wallet, SHOWN)
    screen.show("sync_statuses", "SYNCED", [(role, amount, status) for role, _, amount, status in rows])
    log("synced", "exchanges=%d applied=%d" % (client.exchanges, client.applied))
    for role, txid, amount, status in rows:
        log("status", "txid=%s amount=%d status=%s" % (hexs(txid), amount, status))
    return True


async def every(board, app, dev, wallet, screen, log, period_s):
    # A terminal with Wi-Fi syncs itself: every period_s, between sales (never while app.busy), it syncs, shows
    # the outcome for a moment and unloads the sync code again, so none of it is in RAM while paying.
    import asyncio
    import sys

    while True:
        await asyncio.sleep(period_s)
        while getattr(app, "busy", False):
            await asyncio.sleep_ms(500)
        before = set(sys.modules)
        prev = screen.state
        sync(board, dev, wallet, screen, log)
        for name in set(sys.modules) - before:
            start.forget(name)
        await asyncio.sleep_ms(SHOW_MS)
        if not getattr(app, "busy", False) and prev is not None:
            screen.show(*prev)  # the app's own screen (its QR) again
