# A device syncing itself over its Wi-Fi (the simulator's online switch), then showing what its own ledger now
# says of its newest payments: the 'sync_statuses' screen and one event line a payment.
#
#   run(board, out=None) -> True when the device had nothing more to say, False when the backend could not be
#       reached or refused (the screen and a "failed" event say why).
#
# Events: "EVENT <device> synced exchanges=N applied=N", then "EVENT <device> status txid=.. amount=.. status=.."
# per payment (newest last), or "EVENT <device> failed why=..". Imported only to sync: never on the payment path
# (the app's start.run does not import it; tests/test_app_heap.py checks the module sets).
from paytoken.app import start
from paytoken.app.io import Log, Screen, hexs

SHOWN = 4  # payments on the screen (sync_client.statuses' newest)


def run(board, out=None):
    from paytoken import sync_client, sync_http

    screen = Screen(board.display())
    dev, _, wallet = start.open_device(board.storage())
    log = Log(dev.name, out)
    failures = []  # the transport's errors: sync_over tries again after each

    try:
        client = sync_client.SyncClient(wallet, dev.backend_kx)
        post = sync_http.poster(board.network())

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
        wallet.ledger.close()
        return False
    rows = sync_client.statuses(wallet, SHOWN)
    screen.show("sync_statuses", "SYNCED", [(role, amount, status) for role, _, amount, status in rows])
    log("synced", "exchanges=%d applied=%d" % (client.exchanges, client.applied))
    for role, txid, amount, status in rows:
        log("status", "txid=%s amount=%d status=%s" % (hexs(txid), amount, status))
    wallet.ledger.close()
    return True
