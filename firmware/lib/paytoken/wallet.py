# A device's money: balance, counter, hash chain, offline spending and limits, derived from its flash ledger.
#
# Every change is a ledger record appended (durable) before it takes effect, and the state in RAM is
# only ever the replay of those records: on open, the wallet replays the ledger from its checkpoint, so
# after a power cut it is exactly what the flash says. Write-ahead points: the payer's debit is stored
# before its signature leaves (commit_payment), the payee's credit before its receipt leaves
# (commit_receipt). Vouchers, acknowledgements and statuses count only when the backend signed them.
#
# Ledger records: their layouts are paytoken.wire's (K_SENT ... K_STATUS, LEDGER_*), shared with the backend.
import struct
from array import array

from paytoken import reasons, wire
from paytoken.crypto import p256
from paytoken.ledger import Ledger
from paytoken.reasons import Refused
from paytoken.trust import payment_hash
from paytoken.wire import K_ACK, K_RCVD, K_RESULT, K_SENT, K_STATUS, K_VOUCHER

ZERO_HASH = bytes(wire.HASH_LEN)
_NONCE_MEMORY = 16  # QR nonces remembered against a payer paying one QR twice
_PAYER_MEMORY = 64  # payers whose last counter a payee remembers

# Payment states, as the screens and the sync client see them
SENT = "sent"  # left the device, no receipt: sent-unconfirmed, the backend resolves it
DONE = "done"  # countersigned by the payee
VOIDED = "voided"  # refused by the payee with a signed receipt: the money came back
RECEIVED = "received"  # payee: credited, receipt sent
REFUSED = "refused"  # payee: refused, signed refusal sent

_SENT = wire.LEDGER_SENT
_RESULT = wire.LEDGER_RESULT
_RCVD = wire.LEDGER_RCVD
_RCVD_STATUS = wire.RCVD_STATUS
_SNAP = wire.LEDGER_SNAPSHOT


class Wallet:
    def __init__(self, ledger_path, identity_priv, cert_raw, trust):
        self._priv = identity_priv
        self.cert_raw = bytes(cert_raw)
        self.cert = wire.decode_cert(cert_raw)
        self.device_id = self.cert.device_id
        self.trust = trust
        self.ledger = Ledger(ledger_path)
        # The revocation list lives next to the ledger, outside it: it is not money. One wallet a device, so the
        # wallet's file is the device's list.
        trust.revoked_path = ledger_path + ".revoked"
        trust.revoked = None  # opened on first use (paytoken.revocation)
        self._reset()
        if self.ledger.checkpoint:
            self._load_snapshot(self.ledger.checkpoint)
        if self.ledger.corrupt is None:
            for seq, payload in self.ledger.records(self.ledger.base_seq + 1):
                self._apply(seq, payload)

    def _reset(self):
        self.balance = 0
        self.counter = 0  # payer: counter of the last payment signed
        self.prev_hash = ZERO_HASH  # payer: SHA-256 of the last payment signed
        self.offline_spent = 0  # payer: spent since the last acknowledgement
        self.payments_since_sync = 0
        self.seq = 0  # payee: receipts issued
        self.voucher_counter = 0
        self.acked_seq = 0
        self.known_time = 0
        self._nonces = []
        # payee: payers' last counters (a payer-only card spends no heap on it)
        self._payers = _PayerMemory(_PAYER_MEMORY) if self.cert.role & wire.ROLE_PAYEE else None
        self._open = {}  # payer: counter -> (ledger seq, amount) of payments without a final outcome
        self._last_sent = None  # (counter, ledger seq, amount) of the newest SENT awaiting its receipt
        self._snap_counter = 0  # payer counter at the ledger's checkpoint

    @property
    def locked(self):
        # A damaged ledger: paying on would build on records that cannot be trusted.
        return self.ledger.corrupt is not None

    def sign(self, body):
        return body + p256.sign(self._priv, body)

    def _append(self, payload):
        if self.locked:
            raise Refused(reasons.LOCKED, str(self.ledger.corrupt))
        seq = self.ledger.append(payload)
        self._apply(seq, payload)
        return seq

    # ---- replay: the only place state changes ----
    def _apply(self, seq, payload):
        kind = payload[0]
        body = memoryview(payload)[1:]
        if kind == K_SENT:
            _, amount, nonce, _, _, phash = struct.unpack(_SENT, body)
            self.counter += 1
            self.balance -= amount
            self.offline_spent += amount
            self.payments_since_sync += 1
            self.prev_hash = phash
            self._open[self.counter] = (seq, amount)
            self._last_sent = (self.counter, seq, amount)
            self._nonces.append(bytes(nonce))
            del self._nonces[:-_NONCE_MEMORY]
        elif kind == K_RESULT:
            counter, _, amount = self._last_sent
            self._last_sent = None
            del self._open[counter]
            if body[0] != reasons.OK:  # refused by the payee: voided, the money returns
                self.balance += amount
                self.offline_spent -= amount
                self.payments_since_sync -= 1
        elif kind == K_RCVD:
            self.seq += 1
            if body[_RCVD_STATUS] == reasons.OK:
                amount, _, counter = struct.unpack_from(">IHI", body, 8)
                self.balance += amount
                # Remember where the payer's last payment is, not its hash: replay stays allocation-light,
                # and the hash is rebuilt only when that payer pays again (last_from).
                if self._payers is not None:
                    self._payers.put(body[:8], counter, seq)
        elif kind == K_VOUCHER:
            v = wire.decode_voucher(body)
            self.voucher_counter = v.counter
            self.balance += v.amount
            self._saw_time(v.issued_at)
        elif kind == K_ACK:
            a = wire.decode_ack(body)
            self.acked_seq = a.upto_seq
            self._saw_time(a.issued_at)
            # Spending the backend has acknowledged no longer counts against the offline limit; what
            # came after the acknowledged record still does. Counted again from the flash, not kept in
            # RAM: the heap stays flat however many payments wait for their acknowledgement.
            self.offline_spent, self.payments_since_sync = self._spent_between(a.upto_seq, seq)
        elif kind == K_STATUS:
            n = len(body)
            st = wire.decode_status(body[:n - 5])
            role, amount = struct.unpack(wire.LEDGER_STATUS_SUFFIX, body[n - 5:])
            self._saw_time(st.issued_at)
            if role == wire.ROLE_PAYER:
                counter = self._counter_of(st.txid)
                if counter in self._open:
                    del self._open[counter]
                    if self._last_sent and self._last_sent[0] == counter:
                        self._last_sent = None
                if st.status == wire.ST_REFUNDED:
                    self.balance += amount
            elif st.status == wire.ST_REJECTED:
                self.balance -= amount  # a credit the backend will never settle
        else:
            raise ValueError("unknown ledger record")

    def _spent_between(self, after, before):
        # (amount, payments) sent and not voided in ledger records after..before, both excluded.
        spent = n = last = 0
        records = self.ledger.records(after + 1)
        try:
            for seq, payload in records:
                if seq >= before:
                    break
                if payload[0] == K_SENT:
                    last = struct.unpack_from(">I", payload, 9)[0]
                    spent += last
                    n += 1
                elif payload[0] == K_RESULT and payload[1] != reasons.OK:
                    spent -= last
                    n -= 1
        finally:
            records.close()  # closes its file now, not when the GC finds it
        return spent, n

    def _saw_time(self, t):
        if t > self.known_time:
            self.known_time = t
            if self.trust.now is None or self.trust.now < t:
                self.trust.now = t

    def _counter_of(self, txid):
        for c in self._open:
            if wire.txid(self.device_id, c) == txid:
                return c
        return None

    def _rcvd_payment(self, f):
        # The payer's signed payment, rebuilt from a RCVD record's fields (f: the unpacked record).
        payer_id, amount, currency, counter, spent, prev, nonce, hs, time, sig = f[:10]
        return wire.payment_body(wire.txid(payer_id, counter), payer_id, self.device_id, amount, currency,
                                 counter, spent, prev, nonce, hs, time) + sig

    # ---- payer ----
    def nonce_used(self, nonce):
        return nonce in self._nonces

    def check_spend(self, amount, currency):
        cert = self.cert
        if self.locked:
            raise Refused(reasons.LOCKED)
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
        if p.counter != self.counter + 1 or p.prev_hash != self.prev_hash:
            raise ValueError("payment does not continue the chain")
        self._append(bytes((K_SENT,)) + struct.pack(_SENT, p.payee_id, p.amount, qr_nonce, p.handshake_hash,
                                                    p.time, payment_hash(payment_raw)))

    def _result(self, payment_raw, receipt_raw):
        p = wire.decode_payment(payment_raw)
        if self._last_sent is None or self._last_sent[0] != p.counter:
            raise ValueError("receipt for a payment not awaiting one")
        rc = wire.decode_receipt(receipt_raw)
        self._append(bytes((K_RESULT,)) + struct.pack(_RESULT, rc.status, rc.payee_seq, rc.time,
                                                      wire.signature(receipt_raw)))

    def confirm_payment(self, payment_raw, receipt_raw):
        self._result(payment_raw, receipt_raw)

    def void_payment(self, payment_raw, receipt_raw):
        # The payee refused it with a signed receipt: it can never settle, so the money comes back.
        # The counter and chain stay: the voided payment keeps its place in the chain.
        self._result(payment_raw, receipt_raw)

    # ---- payee ----
    def last_from(self, payer_id):
        # (counter, payment hash or None) of the last payment we accepted from this payer, or None.
        entry = self._payers and self._payers.get(payer_id)
        if entry is None:
            return None
        if entry[1] <= self.ledger.base_seq:
            return entry[0], None  # compacted away: the counter still counts, the chain link is unknown
        for _, payload in self.ledger.records(entry[1]):
            return entry[0], payment_hash(self._rcvd_payment(struct.unpack_from(_RCVD, payload, 1)))

    def check_credit(self, amount):
        if self.balance + amount > self.cert.max_holding:
            raise Refused(reasons.LIMIT_HOLDING)

    def next_seq(self):
        return self.seq + 1

    def commit_receipt(self, payment_raw, receipt_raw):
        # Credit before the receipt leaves; a refusal is recorded too (it voids the payment).
        p = wire.decode_payment(payment_raw)
        rc = wire.decode_receipt(receipt_raw)
        if rc.payee_seq != self.seq + 1:
            raise ValueError("receipt out of sequence")
        self._append(bytes((K_RCVD,)) + struct.pack(
            _RCVD, p.payer_id, p.amount, p.currency, p.counter, p.offline_spent, p.prev_hash, p.qr_nonce,
            p.handshake_hash, p.time, wire.signature(payment_raw), rc.status, rc.time))

    # ---- sync: backend updates, history, compaction (paytoken.wallet_sync, loaded when first needed) ----
    def apply_update(self, raw):
        # Applies one backend-signed message; True if it changed the wallet, False if already applied.
        from paytoken import wallet_sync

        return wallet_sync.apply_update(self, raw)

    def history(self, limit=None):
        # [role, txid, amount, state] for every payment still in the ledger, oldest first; with limit only the
        # newest `limit` of them.
        from paytoken import wallet_sync

        return wallet_sync.history(self, limit)

    def compact(self, keep=0):
        # Drops records the backend acknowledged (all but the newest `keep` payments); True if it did.
        from paytoken import wallet_sync

        return wallet_sync.compact(self, keep)

    def _load_snapshot(self, snap):
        (self.balance, self.counter, self.prev_hash, self.offline_spent, self.seq, self.voucher_counter,
         self.acked_seq, self.known_time, n) = struct.unpack_from(_SNAP, snap, 0)
        base = struct.calcsize(_SNAP)
        self._nonces = [snap[base + 8 * i:base + 8 * i + 8] for i in range(n)]
        self._snap_counter = self.counter
        if self.known_time and (self.trust.now is None or self.trust.now < self.known_time):
            self.trust.now = self.known_time


class _PayerMemory:
    # The last (counter, ledger seq) of the `size` payers seen most recently, in fixed arrays: replaying
    # thousands of payments allocates nothing, so the heap cannot fragment (a dict churned by evictions
    # regrows its table again and again, and on a 64 KB heap one such table can fail to find room).
    # When full, the payer first remembered longest ago is forgotten.

    def __init__(self, size):
        self._ids = bytearray(8 * size)
        self._counters = array("I", bytes(4 * size))
        self._seqs = array("I", bytes(4 * size))
        self._size = size
        self._n = 0  # slots in use
        self._next = 0  # slot to fill next once all are in use

    def _find(self, payer_id):
        payer_id = bytes(payer_id)  # find() takes bytes, not a memoryview
        ids = self._ids
        end = 8 * self._n
        i = ids.find(payer_id)
        while 0 <= i < end:
            if not i & 7:
                return i >> 3
            i = ids.find(payer_id, i + 1)
        return -1

    def get(self, payer_id):
        i = self._find(payer_id)
        return None if i < 0 else (self._counters[i], self._seqs[i])

    def put(self, payer_id, counter, seq):
        i = self._find(payer_id)
        if i < 0:
            if self._n < self._size:
                i = self._n
                self._n += 1
            else:
                i = self._next
                self._next = (i + 1) % self._size
            self._ids[8 * i:8 * i + 8] = payer_id
        self._counters[i] = counter
        self._seqs[i] = seq
