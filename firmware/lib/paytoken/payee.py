# The payee's side of one offline payment, as pure logic: bytes in, bytes out, no radio, no screen.
#
#   s = PayeeSession(wallet, trust, static_priv, static_pub, qr_bytes, amount)   one per QR nonce
#   msg2 = s.read_hello(msg1)      payer certificate checked; our certificate and the request go back
#   msg4 = s.read_payment(msg3)    payment checked; credit stored; countersigned receipt goes back
#
# A refusal is still answered when the payer can be told: in msg2 as a status, in msg4 as a receipt
# signed with the refusal reason (it voids the payment for the payer and the backend). Noise failures
# end the session silently. The session ends FAILED or DONE with .reason set.
from paytoken import reasons, wire
from paytoken.noise import NoiseError
from paytoken.reasons import Refused
from paytoken.session import DONE, FAILED, NEW, Session
from paytoken.trust import payment_hash, signed_by

HELLO_SENT = "hello sent"


class PayeeSession(Session):
    def __init__(self, wallet, trust, static_priv, static_pub, qr_raw, amount=None):
        super().__init__(wallet, trust, wire.decode_qr(qr_raw), False, s=static_priv, s_pub=static_pub)
        self.amount = amount  # requested in minor units, or None: the payer enters it
        self.payer_cert = None

    def read_hello(self, msg):
        self._expect(NEW)
        hs = self._hs
        try:
            payload = hs.read_message(msg)
        except NoiseError:
            self._fail(reasons.KEY_MISMATCH, "payer did not use our key or QR")
        status = reasons.OK
        try:
            cert = self.trust.check_cert(wire.decode_payer_hello(payload), wire.ROLE_PAYER)
            if cert.currency != self.wallet.cert.currency:
                raise Refused(reasons.CURRENCY)
            self.payer_cert = cert
        except Refused as r:
            status = r.code
        except ValueError:
            status = reasons.FORMAT
        own = self.wallet.cert
        if status:
            reply = hs.write_message(wire.payee_hello(status))
            self.state = FAILED
            self.reason = status
            return reply
        reply = hs.write_message(wire.payee_hello(reasons.OK, self.amount or 0, own.currency, self.wallet.cert_raw))
        self._rx, self._tx, self.handshake_hash = hs.split(True)
        self._hs = None  # done with: give the heap back before the payment arrives
        self.state = HELLO_SENT
        return reply

    def _check(self, p):
        # The payment's checks in order; raises Refused with the first failing reason.
        cert = self.payer_cert
        w = self.wallet
        if not signed_by(cert.identity_pub, p.raw):
            raise Refused(reasons.SIGNATURE)
        if p.payer_id != cert.device_id or p.payee_id != w.device_id:
            raise Refused(reasons.WALLET_ID)
        if p.qr_nonce != self.qr.nonce or p.handshake_hash != self.handshake_hash:
            raise Refused(reasons.NONCE, "payment not bound to this session")
        if p.currency != w.cert.currency:
            raise Refused(reasons.CURRENCY)
        if p.amount <= 0 or (self.amount is not None and p.amount != self.amount):
            raise Refused(reasons.AMOUNT)
        if p.amount > cert.limit_payment:
            raise Refused(reasons.LIMIT_PAYMENT)
        if p.offline_spent + p.amount > cert.limit_offline:
            raise Refused(reasons.LIMIT_OFFLINE)
        last = w.last_from(p.payer_id)
        if p.counter < 1 or (last is not None and p.counter <= last[0]):
            raise Refused(reasons.COUNTER)
        if last is not None and p.counter == last[0] + 1 and last[1] is not None and p.prev_hash != last[1]:
            raise Refused(reasons.CHAIN)
        w.check_credit(p.amount)

    def read_payment(self, msg):
        # msg4 (the countersigned receipt), or None when the payer declined.
        self._expect(HELLO_SENT)
        try:
            kind, value = wire.decode_payer_final(self._rx.decrypt_with_ad(b"", msg))
        except NoiseError:
            self._fail(reasons.FORMAT, "undecryptable payment")
        except ValueError as e:
            self._fail(reasons.FORMAT, str(e))
        if kind == "abort":
            self.state = FAILED
            self.reason = value
            return None
        try:
            p = wire.decode_payment(value)
        except ValueError as e:
            self._fail(reasons.FORMAT, str(e))
        status = reasons.OK
        try:
            self._check(p)
        except Refused as r:
            status = r.code
        w = self.wallet
        receipt = w.sign(wire.receipt_body(payment_hash(p.raw), status, w.next_seq(), self.trust.now or 0))
        w.commit_receipt(p.raw, receipt)  # durable credit (or refusal) before the receipt leaves
        self.payment = p.raw
        self.receipt = receipt
        self.state = DONE if status == reasons.OK else FAILED
        self.reason = status
        return self._tx.encrypt_with_ad(b"", wire.receipt_msg(receipt))
