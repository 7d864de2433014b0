# The payer's side of one offline payment, as pure logic: bytes in, bytes out, no radio, no screen.
#
#   s = PayerSession(wallet, trust, qr_text)   parse the QR; refuse a reused nonce
#   msg1 = s.start()                           Noise NK message 1 with the payer's certificate
#   offer = s.read_hello(msg2)                 payee authenticated and checked: show the offer
#   msg3 = s.confirm(amount)                   after a button press: debit stored, signed payment out
#   receipt = s.read_receipt(msg4)             countersigned: the payment is complete
#
# Every refusal raises reasons.Refused and leaves the session FAILED with .reason set. Once confirm()
# has returned, the payment may have reached the payee: without a valid receipt it stays in the
# wallet as sent-unconfirmed and the backend resolves it (docs/security.md).
from collections import namedtuple

from paytoken import base45, reasons, wire
from paytoken.noise import NoiseError
from paytoken.reasons import Refused
from paytoken.session import DONE, FAILED, NEW, Session
from paytoken.trust import payment_hash, signed_by

HELLO_SENT = "hello sent"
OFFERED = "offered"
PAYMENT_SENT = "payment sent"

Offer = namedtuple("Offer", ("payee_id", "amount", "currency", "payee_cert"))


def parse_qr(qr_text):
    # The QR as scanned (base45 text or its bytes) -> wire.QrPayload; Refused(FORMAT) for anything else.
    try:
        return wire.decode_qr(base45.decode(qr_text))
    except ValueError as e:
        raise Refused(reasons.FORMAT, "not a paytoken QR: " + str(e))


class PayerSession(Session):
    def __init__(self, wallet, trust, qr_text):
        qr = parse_qr(qr_text)
        super().__init__(wallet, trust, qr, True, rs=qr.x25519_pub)
        self.offer = None
        if wallet.nonce_used(qr.nonce):
            self._fail(reasons.NONCE, "QR already paid")

    def start(self):
        self._expect(NEW)
        msg = self._hs.write_message(wire.payer_hello(self.wallet.cert_raw))
        self.state = HELLO_SENT
        return msg

    def read_hello(self, msg):
        self._expect(HELLO_SENT)
        try:
            hello = wire.decode_payee_hello(self._hs.read_message(msg))
        except NoiseError:
            # Only the holder of the QR's key can answer: anyone else fails here.
            self._fail(reasons.KEY_MISMATCH, "payee did not prove the QR key")
        except ValueError as e:
            self._fail(reasons.FORMAT, str(e))
        if hello.status:
            self._fail(hello.status, "refused by payee")
        qr = self.qr
        try:
            cert = self.trust.check_cert(hello.cert, wire.ROLE_PAYEE)
        except Refused as r:
            self._fail(r.code)
        if cert.x25519_pub != qr.x25519_pub:
            self._fail(reasons.KEY_MISMATCH, "certificate key is not the QR key")
        if cert.device_id[:wire.WALLET_SHORT_LEN] != qr.wallet_short:
            self._fail(reasons.WALLET_ID)
        if hello.currency != cert.currency:
            self._fail(reasons.CURRENCY)
        amount = hello.amount or None
        if qr.amount is not None and (qr.amount != amount or qr.currency != hello.currency):
            self._fail(reasons.AMOUNT, "QR and payee disagree")
        self._tx, self._rx, self.handshake_hash = self._hs.split(True)
        self._hs = None  # its keys and cipher state are done with: give the heap back before signing
        self.offer = Offer(cert.device_id, amount, hello.currency, cert)
        self.state = OFFERED
        return self.offer

    def confirm(self, amount=None):
        # Called only after the person confirmed amount and payee: nothing is signed before this.
        self._expect(OFFERED)
        offer = self.offer
        if amount is None:
            amount = offer.amount
        if amount is None or (offer.amount is not None and amount != offer.amount):
            self._fail(reasons.AMOUNT)
        w = self.wallet
        try:
            w.check_spend(amount, offer.currency)
        except Refused as r:
            self._fail(r.code)
        counter = w.counter + 1
        body = wire.payment_body(wire.txid(w.device_id, counter), w.device_id, offer.payee_id, amount,
                                 offer.currency, counter, w.offline_spent, w.prev_hash, self.qr.nonce,
                                 self.handshake_hash, self.trust.now or 0)
        payment = w.sign(body)
        w.commit_payment(payment, self.qr.nonce)  # durable debit before the signature leaves
        self.payment = payment
        self.state = PAYMENT_SENT
        return self._tx.encrypt_with_ad(b"", wire.payment_msg(payment))

    def decline(self, reason=reasons.DECLINED):
        # The person said no (or a check here failed): tell the payee, sign nothing.
        self._expect(OFFERED)
        self.state = FAILED
        self.reason = reason
        return self._tx.encrypt_with_ad(b"", wire.abort_msg(reason))

    def read_receipt(self, msg):
        self._expect(PAYMENT_SENT)
        try:
            rc = wire.decode_receipt(wire.decode_receipt_msg(self._rx.decrypt_with_ad(b"", msg)))
        except ValueError:
            self._fail(reasons.RECEIPT, "unreadable receipt")
        if rc.payment_hash != payment_hash(self.payment) or not signed_by(self.offer.payee_cert.identity_pub,
                                                                         rc.raw):
            self._fail(reasons.RECEIPT, "receipt not signed by the payee for this payment")
        self.receipt = rc.raw
        if rc.status != reasons.OK:
            self.wallet.void_payment(self.payment, rc.raw)
            self._fail(rc.status, "refused by payee")
        self.wallet.confirm_payment(self.payment, rc.raw)
        self.state = DONE
        return rc
