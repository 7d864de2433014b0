# One device's sync in its own MicroPython process, for heap budgets and the bench: the device's keys and ledger
# in a directory (argv[1]), each message 1 written to <dir>/m1 and "M1" printed, the relay's message 2 read from
# <dir>/m2 once a line arrives on stdin. Files, not hex lines: the heap it needs is the sync client's own.
import sys


def rd(d, name):
    with open(d + "/" + name, "rb") as f:
        return f.read()


def main():
    d = sys.argv[1]
    batch = int(sys.argv[2])
    from paytoken.trust import Trust
    from paytoken.wallet import Wallet

    t = Trust(rd(d, "issuer.pub"), rd(d, "backend.pub"), int(rd(d, "now")))
    w = Wallet(d + "/wallet.log", rd(d, "identity.key"), rd(d, "cert.bin"), t)
    from paytoken.sync_client import SyncClient

    c = SyncClient(w, rd(d, "backend.kx"), batch)
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
