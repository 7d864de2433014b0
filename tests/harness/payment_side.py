# One side of an offline payment in its own MicroPython process, for the bench: setup and the peer's
# messages arrive as hex lines on stdin, this side's messages leave as hex lines on stdout, then the CPU
# time it spent in protocol code. Kept tiny so the heap it needs is the firmware's, not the harness's.
import sys
import time
from binascii import hexlify, unhexlify


def rd():
    return unhexlify(sys.stdin.readline().strip())


def wr(b):
    sys.stdout.write(hexlify(b).decode())
    sys.stdout.write("\n")


def main():
    role = sys.argv[1]
    from paytoken import base45, trust, wallet
    if role == "payer":
        from paytoken.payer import PayerSession
    else:
        from paytoken.payee import PayeeSession
    mode = sys.argv[2] if len(sys.argv) > 2 else "pay"
    if mode == "imports":  # measure the code alone
        return
    issuer_pub, backend_pub, priv, cert, xpriv, xpub, qr, voucher = rd(), rd(), rd(), rd(), rd(), rd(), rd(), rd()
    ledger_path = sys.stdin.readline().strip()
    now, amount = (int(x) for x in sys.stdin.readline().split())
    t = trust.Trust(issuer_pub, backend_pub=backend_pub, now=now)
    w = wallet.Wallet(ledger_path, priv, cert, t)
    if mode == "topup":  # an earlier sync: the top-up is in the ledger before the device pays
        w.apply_update(voucher)
        print("topped up", w.balance)
        return
    cpu = 0
    if role == "payer":
        t0 = time.ticks_us()
        s = PayerSession(w, t, base45.encode(qr))
        m = s.start()
        cpu += time.ticks_diff(time.ticks_us(), t0)
        wr(m)
        m = rd()
        t0 = time.ticks_us()
        s.read_hello(m)
        m = s.confirm(amount)
        cpu += time.ticks_diff(time.ticks_us(), t0)
        wr(m)
        m = rd()
        t0 = time.ticks_us()
        s.read_receipt(m)
        cpu += time.ticks_diff(time.ticks_us(), t0)
    else:
        t0 = time.ticks_us()
        s = PayeeSession(w, t, xpriv, xpub, qr, amount)
        cpu += time.ticks_diff(time.ticks_us(), t0)
        for _ in range(2):
            m = rd()
            t0 = time.ticks_us()
            m = s.read_hello(m) if s.state == "new" else s.read_payment(m)
            cpu += time.ticks_diff(time.ticks_us(), t0)
            wr(m)
    print("done", s.state, w.balance, cpu)


main()
