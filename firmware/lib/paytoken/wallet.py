# A device's money state and the rules on it: balance, counter, hash chain, offline spending, limits.
# The payer and payee state machines ask it to check and to commit; it never talks to a radio.
#
# This version keeps the state in RAM. Its commit methods are the write-ahead points: the flash ledger
# (issue 4) makes each one durable before it returns, which is what lets the payer's signature and the
# payee's receipt leave the device only after the debit or credit is stored.
from paytoken import reasons, wire
from paytoken.crypto import p256
from paytoken.reasons import Refused
from paytoken.trust import payment_hash

ZERO_HASH = bytes(wire.HASH_LEN)
_NONCE_MEMORY = 32  # QR nonces remembered against reuse; older ones are refused by the payee anyway
_PAYER_MEMORY = 64  # payers whose last counter a payee remembers


class Wallet:
    def __init__(self, identity_priv, cert_raw, balance=0):
        self._priv = identity_priv
        self.cert_raw = bytes(cert_raw)
        self.cert = wire.decode_cert(cert_raw)
        self.device_id = self.cert.device_id
        self.balance = balance
        self.counter = 0  # payer: counter of the last payment signed
        self.prev_hash = ZERO_HASH  # payer: SHA-256 of the last payment signed
        self.offline_spent = 0  # payer: spent since the last backend acknowledgement
        self.seq = 0  # payee: receipts issued
        self.records = []  # (payment, receipt or None, state)
        self._nonces = []
        self._payers = {}  # payer id -> (counter, payment hash)

    def sign(self, body):
        return body + p256.sign(self._priv, body)

    # ---- payer ----
    def nonce_used(self, nonce):
        return nonce in self._nonces

    def check_spend(self, amount, currency):
        cert = self.cert
        if currency != cert.currency:
            raise Refused(reasons.CURRENCY)
        if amount <= 0:
            raise Refused(reasons.AMOUNT)
        if amount > cert.limit_payment:
            raise Refused(reasons.LIMIT_PAYMENT)
        if self.offline_spent + amount > cert.limit_offline:
            raise Refused(reasons.LIMIT_OFFLINE)
        if amount > self.balance:
            raise Refused(reasons.FUNDS)

    def commit_payment(self, payment_raw, qr_nonce):
        # Debit before the signature leaves: from here on the payment may have arrived.
        p = wire.decode_payment(payment_raw)
        self.balance -= p.amount
        self.offline_spent += p.amount
        self.counter = p.counter
        self.prev_hash = payment_hash(payment_raw)
        self._nonces.append(bytes(qr_nonce))
        del self._nonces[:-_NONCE_MEMORY]
        self.records.append([payment_raw, None, "sent"])

    def _record(self, payment_raw):
        for r in self.records:
            if r[0] == payment_raw:
                return r
        raise ValueError("unknown payment")

    def confirm_payment(self, payment_raw, receipt_raw):
        r = self._record(payment_raw)
        r[1] = receipt_raw
        r[2] = "done"

    def void_payment(self, payment_raw, receipt_raw):
        # The payee refused it with a signed receipt: it can never settle, so the money comes back.
        # The counter and chain stay where they are: the voided payment keeps its place in the chain.
        r = self._record(payment_raw)
        if r[2] != "sent":
            raise ValueError("payment not pending")
        p = wire.decode_payment(payment_raw)
        self.balance += p.amount
        self.offline_spent -= p.amount
        r[1] = receipt_raw
        r[2] = "voided"

    # ---- payee ----
    def last_from(self, payer_id):
        return self._payers.get(bytes(payer_id))

    def check_credit(self, amount):
        if self.balance + amount > self.cert.max_holding:
            raise Refused(reasons.LIMIT_HOLDING)

    def next_seq(self):
        return self.seq + 1

    def commit_receipt(self, payment_raw, receipt_raw):
        # Credit before the receipt leaves; a refusal is recorded too (it voids the payment).
        p = wire.decode_payment(payment_raw)
        rc = wire.decode_receipt(receipt_raw)
        self.seq = rc.payee_seq
        if rc.status == reasons.OK:
            self.balance += p.amount
            payers = self._payers
            payers[bytes(p.payer_id)] = (p.counter, payment_hash(payment_raw))
            if len(payers) > _PAYER_MEMORY:
                payers.pop(next(iter(payers)))
        self.records.append([payment_raw, receipt_raw, "received" if rc.status == reasons.OK else "refused"])
