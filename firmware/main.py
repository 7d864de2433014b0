# Device entry point: refuse to run with broken crypto, then start the application.
import paytoken
from paytoken.crypto import selftest

failures = selftest.run()
if failures:
    # A token that cannot trust its own signatures must not pay: stop here, loudly.
    print("paytoken %s: SELF-TEST FAILED: %s" % (paytoken.VERSION, ", ".join(failures)))
    raise SystemExit(1)
print("paytoken %s: self-test passed" % paytoken.VERSION)
