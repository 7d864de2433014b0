# What a sync does to a wallet: backend-signed updates (vouchers, acknowledgements, statuses, revocation
# lists), the payment history the screens and the sync client read, and ledger compaction. Kept out of
# paytoken.wallet so a device paying offline does not hold this code in RAM: Wallet imports it on first use.
import struct

from paytoken import reasons, wire
from paytoken.reasons import Refused
from paytoken.trust import payment_hash, signed_by
from paytoken.wallet import (  # the wallet's own half, private names included
    _RCVD,
    _RCVD_STATUS,
    _RESULT,
    _SENT,
    _SNAP,
    DONE,
    K_ACK,
    K_RCVD,
    K_RESULT,
    K_SENT,
    K_STATUS,
    K_VOUCHER,
    RECEIVED,
    REFUSED,
    SENT,
    VOIDED,
    Wallet,
)

_FINAL = {ST: name for ST, name in ((wire.ST_SETTLED, "settled"), (wire.ST_REJECTED, "rejected"),
                                    (wire.ST_REFUNDED, "refunded"))}


def apply_update(w, raw):
    # Applies one backend-signed message; True if it changed the wallet, False if already applied.
    # Refused for anything unsigned, for another device, or out of order.
    raw = bytes(raw)
    if not raw:
        raise Refused(reasons.FORMAT)
    kind = raw[0]
    try:
        if kind == wire.T_REVOCATION:
            # Trust checks the delta's signature and version and merges it into the list's own file (replaced
            # atomically): it is not money, so it never goes into the ledger.
            return w.trust.apply_revocation(raw)
        decode = {wire.T_VOUCHER: wire.decode_voucher, wire.T_ACK: wire.decode_ack,
                  wire.T_STATUS: wire.decode_status}.get(kind)
        if decode is None:
            raise Refused(reasons.FORMAT, "unknown update")
        msg = decode(raw)
    except ValueError as e:
        raise Refused(reasons.FORMAT, str(e))
    if w.trust.backend_pub is None or not signed_by(w.trust.backend_pub, raw):
        raise Refused(reasons.SIGNATURE, "update not signed by the backend")
    if msg.device_id != w.device_id:
        raise Refused(reasons.WALLET_ID, "update for another device")
    if kind == wire.T_VOUCHER:
        return _voucher(w, msg)
    if kind == wire.T_ACK:
        return _ack(w, msg)
    return _status(w, msg)


def _voucher(w, v):
    if v.counter <= w.voucher_counter:
        return False  # applied before: exactly once
    if v.counter != w.voucher_counter + 1:
        raise Refused(reasons.COUNTER, "voucher out of order")
    if v.currency != w.cert.currency:
        raise Refused(reasons.CURRENCY)
    if w.balance + v.amount > w.cert.max_holding:
        raise Refused(reasons.LIMIT_HOLDING)
    w._append(bytes((K_VOUCHER,)) + v.raw)
    return True


def _ack(w, a):
    if a.upto_seq <= w.acked_seq:
        return False
    if a.upto_seq > w.ledger.seq:
        raise Refused(reasons.COUNTER, "acknowledges records this device never wrote")
    if w.ledger.hash_at(a.upto_seq) != a.chain_hash:
        raise Refused(reasons.CHAIN, "acknowledgement does not match the ledger")
    w._append(bytes((K_ACK,)) + a.raw)
    return True


def _status(w, st):
    counter = w._counter_of(st.txid)
    if counter is not None:
        amount = w._open[counter][1]
        w._append(bytes((K_STATUS,)) + st.raw + struct.pack(">BI", wire.ROLE_PAYER, amount))
        return True
    found = _find_payment(w, st.txid)
    if found is None:
        return False  # unknown, or already final here
    role, amount, applied = found
    if applied:
        return False
    if role == wire.ROLE_PAYER and st.status == wire.ST_REFUNDED:
        return False  # a completed payment is never refunded
    w._append(bytes((K_STATUS,)) + st.raw + struct.pack(">BI", role, amount))
    return True


def _events(w):
    # (kind, txid, amount, status) for each payment record still in the ledger, oldest first: SENT and
    # RCVD carry txid and amount, RESULT the receipt status of the last SENT, STATUS the backend's.
    counter = w._snap_counter
    for _, payload in w.ledger.records(w.ledger.base_seq + 1):
        kind = payload[0]
        if kind == K_SENT:
            counter += 1
            yield kind, wire.txid(w.device_id, counter), struct.unpack_from(">I", payload, 9)[0], None
        elif kind == K_RESULT:
            yield kind, None, None, payload[1]
        elif kind == K_RCVD:
            amount, _, counter_in = struct.unpack_from(">IHI", payload, 9)
            yield kind, wire.txid(bytes(payload[1:9]), counter_in), amount, payload[1 + _RCVD_STATUS]
        elif kind == K_STATUS:
            st = wire.decode_status(payload[1:len(payload) - 5])
            yield kind, st.txid, None, st.status


def _find_payment(w, txid):
    # (role, amount, a status already applied) of one of our payments still in the ledger, or None.
    found = None
    for kind, t, amount, status in _events(w):
        if t != txid:
            continue
        if kind == K_SENT:
            found = [wire.ROLE_PAYER, amount, False]
        elif kind == K_RCVD:
            found = [wire.ROLE_PAYEE, amount if status == reasons.OK else 0, False]
        elif found is not None:
            found[2] = True
    return found


def history(w, limit=None):
    # [role, txid, amount, state] for every payment still in the ledger, oldest first; with limit only the
    # newest `limit` of them (the walk is the same, the list stays that short).
    out = []
    last = None
    for kind, txid, amount, status in _events(w):
        if kind == K_SENT:
            last = [wire.ROLE_PAYER, txid, amount, SENT]
            out.append(last)
        elif kind == K_RESULT:
            last[3] = DONE if status == reasons.OK else VOIDED
        elif kind == K_RCVD:
            out.append([wire.ROLE_PAYEE, txid, amount, RECEIVED if status == reasons.OK else REFUSED])
        else:
            for entry in out:
                if entry[1] == txid:
                    entry[3] = _FINAL[status]
        if limit is not None and len(out) > limit:
            out.pop(0)
    return out


def signed_records(w, start=0, end=None):
    # (seq, payload, payment or None, receipt or None) for every ledger record from `start` to `end` (still in
    # the ledger; end None: to the head), oldest first: what an upload carries (docs/protocol.md section 10). The
    # ledger keeps signed objects only in part: a SENT record's payment is rebuilt from it and the state before it
    # and signed again (RFC 6979 signatures are deterministic: the same bytes), a RESULT record's receipt is
    # rebuilt around the payee's signature, a RCVD record gives the payer's payment and our receipt, signed again.
    # Records before `start` are only replayed, never signed. The payload is a view into a reused buffer: copy it
    # to keep it. ValueError if a rebuilt payment is not the one recorded.
    r = _Replica(w)
    records = w.ledger.records(w.ledger.base_seq + 1)
    try:
        yield from _signed(w, r, records, start, end)
    finally:
        records.close()  # its file closes now, also when the caller stops early


def _signed(w, r, records, start, end):
    sent_hash = None  # payment hash of the last SENT, until its RESULT
    for seq, payload in records:
        if end is not None and seq > end:
            return
        kind = payload[0]
        payment = receipt = None
        if kind == K_SENT:
            payee_id, amount, nonce, hs, time, sent_hash = struct.unpack_from(_SENT, payload, 1)
            if seq >= start:
                counter = r.counter + 1
                payment = w.sign(wire.payment_body(wire.txid(w.device_id, counter), w.device_id, payee_id, amount,
                                                   w.cert.currency, counter, r.offline_spent, r.prev_hash, nonce,
                                                   hs, time))
                if payment_hash(payment) != sent_hash:
                    raise ValueError("ledger record %d: rebuilt payment differs" % seq)
        elif kind == K_RESULT and sent_hash is not None:
            if seq >= start:
                status, payee_seq, time, sig = struct.unpack_from(_RESULT, payload, 1)
                receipt = wire.receipt_body(sent_hash, status, payee_seq, time) + sig
            sent_hash = None
        elif kind == K_RCVD and seq >= start:
            f = struct.unpack_from(_RCVD, payload, 1)
            payment = w._rcvd_payment(f)
            receipt = w.sign(wire.receipt_body(payment_hash(payment), f[10], r.seq + 1, f[11]))
        r._apply(seq, payload)
        if seq >= start:
            yield seq, payload, payment, receipt


def signed_payments(w):
    # (role, payment, receipt or None) for every payment still in the ledger, oldest first: the exact bytes
    # both devices signed (signed_records, paired per payment).
    sent = None  # the payer's last payment, until its RESULT
    for _, payload, payment, receipt in signed_records(w):
        kind = payload[0]
        if kind == K_SENT:
            if sent is not None:
                yield wire.ROLE_PAYER, sent, None  # sent-unconfirmed: no receipt came
            sent = payment
        elif kind == K_RESULT and sent is not None:
            yield wire.ROLE_PAYER, sent, receipt
            sent = None
        elif kind == K_RCVD:
            yield wire.ROLE_PAYEE, payment, receipt
    if sent is not None:
        yield wire.ROLE_PAYER, sent, None


def compact(w, keep=0):
    # Drops records the backend acknowledged, up to the first payment still without an outcome and before the
    # newest `keep` payments (the screen's recent history), keeping the acknowledgement and the state at that
    # point as the ledger's checkpoint.
    upto = w.acked_seq
    if keep:
        recent = []  # ledger seqs of the newest `keep` payments
        for seq, payload in w.ledger.records(w.ledger.base_seq + 1):
            if payload[0] in (K_SENT, K_RCVD):
                recent.append(seq)
                if len(recent) > keep:
                    recent.pop(0)
        if recent and recent[0] <= upto:
            upto = recent[0] - 1
    for seq, _ in w._open.values():
        if seq <= upto:
            upto = seq - 1
    if upto <= w.ledger.base_seq:
        return False
    snapshot = _state_at(w, upto)
    w.ledger.compact(upto, snapshot)
    # txids of the SENT records left are counted from the checkpoint's counter (as after a reopen)
    w._snap_counter = struct.unpack_from(_SNAP, snapshot, 0)[1]
    return True


def _state_at(w, upto):
    # The wallet's state after ledger record `upto`, serialised for the checkpoint.
    r = _Replica(w)
    for seq, payload in w.ledger.records(w.ledger.base_seq + 1):
        if seq > upto:
            break
        r._apply(seq, payload)
    snap = struct.pack(_SNAP, r.balance, r.counter, r.prev_hash, r.offline_spent, r.seq, r.voucher_counter,
                       r.acked_seq, r.known_time, len(r._nonces))
    return snap + b"".join(r._nonces)


class _Clock:
    now = None


class _Replica(Wallet):
    # The same replay rules on a separate state: used to compute a past state without touching the live one.
    def __init__(self, wallet):
        self.device_id = wallet.device_id
        self.cert = wallet.cert
        self.trust = _Clock()
        self.ledger = wallet.ledger
        self._reset()
        if wallet.ledger.checkpoint:
            self._load_snapshot(wallet.ledger.checkpoint)
