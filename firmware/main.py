# Device entry point: refuse to run with broken crypto, then start the application.
import paytoken
from paytoken.crypto import selftest

failures = selftest.run()
if failures:
    # A token that cannot trust its own signatures must not pay: stop here, loudly.
    print("paytoken %s: SELF-TEST FAILED: %s" % (paytoken.VERSION, ", ".join(failures)))
    raise SystemExit(1)
print("paytoken %s: self-test passed" % paytoken.VERSION)
del selftest

import board  # noqa: E402  (after the self-test: nothing of the device is touched with broken crypto)
from paytoken.app import start  # noqa: E402

start.forget("paytoken.crypto.selftest")
# Runs the payer or payee app for ever; returns only when the device cannot pay (no radio: the screen says
# why), or from the USB provisioning service of an unprovisioned device (after finalise the board resets and
# boots into its app; the simulator's process ends here and the harness starts it again).
try:
    start.run(board)
finally:
    # A finalised device never hands over the REPL (docs/security.md, "The lock, the wipe and the REPL"): an
    # unprovisioned one does, so that `make deploy` and provisioning can reach it.
    if start.finalised(board):
        board.halt()
