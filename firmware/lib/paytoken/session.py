# What the payer's and the payee's sessions share: one Noise NK session bound to one QR, a state that
# only moves forward, and a reason once it failed.
from paytoken import reasons
from paytoken.noise import HandshakeState
from paytoken.reasons import Refused

PROLOGUE = b"paytoken/1"  # with the QR payload after it: binds the protocol version and the QR

NEW = "new"
FAILED = "failed"
DONE = "done"


class Session:
    def __init__(self, wallet, trust, qr, initiator, **keys):
        self.wallet = wallet
        self.trust = trust
        self.qr = qr
        self.state = NEW
        self.reason = None
        self.payment = None
        self.receipt = None
        self._hs = HandshakeState("NK", initiator, prologue=PROLOGUE + qr.raw, **keys)
        self._tx = self._rx = None

    def _fail(self, code, detail=""):
        self.state = FAILED
        self.reason = code
        raise Refused(code, detail)

    def _expect(self, state):
        if self.state != state:
            raise Refused(reasons.FORMAT, "message out of turn")
