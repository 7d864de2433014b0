# Why a payment was refused: one byte on the wire (payee hello status, receipt status) and in records.
# Shared by the payer, the payee, the backend and the screens, so each side names a failure the same way.
try:
    from micropython import const
except ImportError:  # CPython host tools
    def const(x):
        return x

OK = const(0)
FORMAT = const(1)  # malformed or unexpected message
VERSION = const(2)  # unknown protocol version
NONCE = const(3)  # QR nonce stale, reused or not this session's
KEY_MISMATCH = const(4)  # payee key differs between QR, certificate and session
WALLET_ID = const(5)  # the QR's wallet id or the payment's ids do not match the certificates
CERT_INVALID = const(6)  # certificate signature or contents invalid
CERT_ISSUER = const(7)  # certificate from another issuer
CERT_EXPIRED = const(8)  # outside the certificate's validity
REVOKED = const(9)  # device on the revocation list
ROLE = const(10)  # device not certified for this role
FUNDS = const(11)  # payer balance too low
LIMIT_PAYMENT = const(12)  # over the per-payment offline limit
LIMIT_OFFLINE = const(13)  # over the cumulative offline limit since the last sync
LIMIT_HOLDING = const(14)  # payee would exceed its maximum holding
CURRENCY = const(15)  # currency differs
AMOUNT = const(16)  # amount zero or not the requested one
COUNTER = const(17)  # payer counter not increasing
CHAIN = const(18)  # payer hash chain broken
SIGNATURE = const(19)  # record signature invalid
DECLINED = const(20)  # a person declined on the device
BUSY = const(21)  # the payee is serving another payer
RECEIPT = const(22)  # receipt missing or invalid: payment left, not confirmed
LOCKED = const(23)  # wallet refuses to pay until its ledger is repaired or synced
# Device-local: what the apps show and log when the link, not the other side, ended a session. Never sent in a
# message or stored in a record (the link is gone, there is no one to tell).
UNREACHABLE = const(24)  # no payee answered at the QR's address
LINK = const(25)  # the connection failed or dropped mid-session
TIMEOUT = const(26)  # no answer, or no decision on the device, in time
ERROR = const(27)  # the device failed (an unexpected exception, a flash error): logged, the app goes on


def name(code):
    # The names live in their own module, loaded on the first refusal or error screen: a payment that
    # succeeds never spends heap on them.
    from paytoken.reason_names import NAMES

    return NAMES[code] if 0 <= code < len(NAMES) else "reason %d" % code


class Refused(Exception):
    # A check failed: carries the reason code the other side and the screen are told.
    def __init__(self, code, detail=""):
        super().__init__(name(code) + (": " + detail if detail else ""))
        self.code = code
