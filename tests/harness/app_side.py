# Runs on MicroPython: one device in its own process, started as main.py starts it (the power-on self-test,
# then paytoken.app.start.run), with the radio of tests/harness/file_air.py instead of paytoken.ble.
#
#   micropython -X heapsize=N app_side.py <radio folder> <sessions> [NAME=ms ...]
#   micropython -X heapsize=N app_side.py ble <sessions> [NAME=ms ...]   the real paytoken.ble transport, on the
#                                                            simulated radio at PAYTOKEN_RADIO (as main.py runs)
# (The unix port aborts on any command-line argument of 256 characters or more: keep arguments short.)
#
# The board is unix_sim with its environment: PAYTOKEN_SIM_FLASH (the provisioned image), and optionally
# PAYTOKEN_SIM_DISPLAY, PAYTOKEN_SIM_BUTTONS, PAYTOKEN_SIM_SCANNER. NAME=ms sets an app timeout (card.X or
# terminal.X). Prints the apps' EVENT lines, then "HEAP after=<bytes>" (gc.mem_alloc() after a collection at
# the end: what stays allocated) and "MODULES a,b,..." (every module loaded). The least -X heapsize a run
# succeeds in is what the role needs.
import gc
import sys


def selftest():
    # as main.py: the power-on self-test, then its module leaves the heap
    from paytoken.app import start
    from paytoken.crypto import selftest

    if selftest.run():
        print("SELF-TEST FAILED")
        sys.exit(1)
    del selftest
    start.forget("paytoken.crypto.selftest")


def linger(transport, ms=3000):
    # A device keeps running after a session; this process ends after `sessions`. Before it goes (and its radio
    # link with it), let the radio deliver what the last session queued (the receipt) until the payer has left.
    import time

    import bluetooth

    t0 = time.ticks_ms()
    while getattr(transport, "_conns", None) and time.ticks_diff(time.ticks_ms(), t0) < ms:
        bluetooth._pump(10)


def main():
    selftest()
    import file_air

    import board
    from paytoken.app import start

    folder = sys.argv[1]
    sessions = int(sys.argv[2])
    for arg in sys.argv[3:]:  # only the role's own app module is loaded
        name, _, value = arg.partition("=")
        mod, _, const = name.partition(".")
        __import__("paytoken.app." + mod)
        setattr(sys.modules["paytoken.app." + mod], const, int(value))

    def radio(app):
        return file_air.PayeeRadio(folder) if app == "terminal" else file_air.PayerRadio(folder)

    app = start.run(board, None if folder == "ble" else radio, sessions)
    if folder == "ble" and app is not None:
        linger(app.transport)
    gc.collect()
    print("HEAP after=%d" % gc.mem_alloc())
    print("MODULES " + ",".join(sorted(k for k in sys.modules if k != "__main__")))
    if app is None:
        sys.exit(2)


main()
