# One device's sync in its own MicroPython process, for heap budgets and the bench: the device's keys and ledger
# in a directory (argv[1]), each message 1 written to <dir>/m1 and "M1" printed, the relay's message 2 read from
# <dir>/m2 once a line arrives on stdin. Files, not hex lines: the heap it needs is the sync client's own.
import sys


def rd(d, name):
    with open(d + "/" + name, "rb") as f:
        return f.read()


def online(w, kx, batch, url, syncs):
    # Each sync a new client (a new session of the device), the next one when a line arrives on stdin; after each:
    # SYNCED done uploaded exchanges ms wake-token-hex cursor statuses
    import time
    from binascii import hexlify

    from paytoken import sync_http
    from paytoken.sync_client import SyncClient, statuses

    post = sync_http.poster(url)
    for i in range(syncs):
        if i:
            sys.stdin.readline()
        c = SyncClient(w, kx, batch)
        t0 = time.ticks_ms()
        done = c.sync_over(post)
        ms = time.ticks_diff(time.ticks_ms(), t0)
        hint = c.wake_hint() or (b"", 0)
        print("SYNCED", done, c.uploaded, c.exchanges, ms, hexlify(hint[0]).decode() or "-", hint[1],
              ",".join(s[3] for s in statuses(w, 16)))


def main():
    d = sys.argv[1]
    batch = int(sys.argv[2])
    from paytoken.trust import Trust
    from paytoken.wallet import Wallet

    t = Trust(rd(d, "issuer.pub"), rd(d, "backend.pub"), int(rd(d, "now")))
    w = Wallet(d + "/wallet.log", rd(d, "identity.key"), rd(d, "cert.bin"), t)
    from paytoken.sync_client import SyncClient

    kx = rd(d, "backend.kx")
    if len(sys.argv) > 3:  # online: the device POSTs itself to the backend at argv[3], argv[4] syncs
        online(w, kx, batch, sys.argv[3], int(sys.argv[4]))
        return
    c = SyncClient(w, kx, batch)
    while True:
        m = c.request()
        if m is None:
            break
        with open(d + "/m1", "wb") as f:
            f.write(m)
        m = None
        print("M1")
        sys.stdin.readline()
        c.answer(rd(d, "m2"))
    print("DONE", c.exchanges, c.applied)


main()
