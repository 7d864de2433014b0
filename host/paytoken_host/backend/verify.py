"""Verification of an upload, before any database write: pure functions of the batch, the certificates and the
backend's keys. Every signature is checked here (the expensive part, done outside any transaction); what depends
on stored state (counters, chains, sequence numbers, forks) is settlement's job (settle.py).
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache

from paytoken import wire
from paytoken_host import protocol
from paytoken_host.backend import formats as F
from paytoken_host.protocol import signed_by  # the backend's checks: the host's (keys cached there)


class Reject(Exception):
    """The request is refused: HTTP status and a reason a person can act on."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_cert(raw: bytes, issuer_pub: bytes) -> wire.Certificate:
    """A certificate chained to our issuer (validity in time is checked where it matters, against the payment)."""
    try:
        cert = wire.decode_cert(raw)
    except wire.WireError as e:
        raise Reject(422, f"certificate: {e}") from None
    if cert.issuer_key_id != protocol.key_id(issuer_pub):
        raise Reject(422, "certificate: from another issuer")
    if not signed_by(issuer_pub, cert.raw):
        raise Reject(422, "certificate: issuer signature invalid")
    return cert


@dataclass(slots=True)
class PaymentObs:
    """One signed payment as a record shows it, with its receipt if the record has one."""

    seq: int
    kind: int  # F.K_SENT (payer's own) or F.K_RCVD (payee's)
    payment: wire.Payment
    payment_hash: bytes
    receipt: wire.Receipt | None = None


@dataclass
class Verified:
    batch: F.Batch
    cert: wire.Certificate
    chain: list[bytes]  # chain hash after each record (index i: after base_seq + 1 + i)
    events: list[tuple] = field(default_factory=list)  # (seq, kind, data) in ledger order
    new_certs: dict[bytes, wire.Certificate] = field(default_factory=dict)
    pending_receipt: tuple[int, wire.Receipt] | None = None  # RESULT whose SENT is in an earlier upload


@cache
def _record_struct(fmt: str) -> struct.Struct:
    return struct.Struct(fmt)


def _unpack(fmt: str, payload: bytes, seq: int, name: str) -> tuple:
    st = _record_struct(fmt)
    if len(payload) != 1 + st.size:
        raise Reject(422, f"record {seq}: {name} record has the wrong length")
    return st.unpack_from(payload, 1)


def _decode(fn: Callable, raw: bytes | None, seq: int, what: str):
    if raw is None:
        raise Reject(422, f"record {seq}: the {what} bytes are missing")
    try:
        return fn(raw)
    except wire.WireError as e:
        raise Reject(422, f"record {seq}: {e}") from None


_RECEIPT = struct.Struct(wire._RCPT)  # wire's receipt layout before the signature
_RECEIPT_HEAD = (wire.T_RECEIPT, wire.VERSION)


def _receipt(raw: bytes | None, seq: int) -> wire.Receipt:
    """wire.decode_receipt, inlined for the hot path of a payee's upload (one per RCVD record)."""
    if type(raw) is bytes and len(raw) == wire.RECEIPT_LEN and (raw[0], raw[1]) == _RECEIPT_HEAD:
        return wire.Receipt(*_RECEIPT.unpack_from(raw)[2:], raw)
    return _decode(wire.decode_receipt, raw, seq, "receipt")  # its error, whatever is wrong


def verify_batch(batch: F.Batch, lookup: Callable[[bytes], wire.Certificate | None], issuer_pub: bytes,
                 backend_pub: bytes) -> Verified:
    """Checks everything a batch proves by itself; raises Reject with the first problem found."""
    certs: dict[bytes, wire.Certificate] = {}
    new: dict[bytes, wire.Certificate] = {}
    for raw in batch.certs:
        c = check_cert(raw, issuer_pub)
        certs[c.device_id] = new[c.device_id] = c

    def cert_of(device_id: bytes, seq: int, role: str) -> wire.Certificate:
        c = certs.get(device_id) or lookup(device_id)
        if c is None:
            raise Reject(422, f"record {seq} {role}: unknown device {device_id.hex()} (register it or include its "
                              f"certificate)")
        certs[device_id] = c
        return c

    cert = lookup(batch.device_id)
    if cert is None:
        raise Reject(404, f"unknown device {batch.device_id.hex()}: not registered")
    if not signed_by(cert.identity_pub, batch.head.raw):
        raise Reject(422, "head: not signed by the device")
    h = batch.base_hash
    chain = []
    for r in batch.records:
        h = F.chain(h, r.payload)
        chain.append(h)
    if h != batch.head.chain_hash:
        raise Reject(422, "records: do not hash to the chain hash the device signed")

    dev = batch.device_id
    v = Verified(batch, cert, chain, new_certs=new)
    last_sent: PaymentObs | None = None
    sigs: list[tuple[bytes, bytes, int, str]] = []  # (key, signed bytes, record seq, what fails if it does not verify)
    for r in batch.records:
        seq, payload = r.seq, r.payload
        kind = payload[0]
        if kind not in (F.K_SENT, F.K_RESULT, F.K_RCVD) and (r.payment is not None or r.receipt is not None):
            raise Reject(422, f"record {seq}: payment or receipt attached to a record that has none")
        if kind == F.K_SENT:
            if r.receipt is not None:
                raise Reject(422, f"record {seq}: a SENT record carries no receipt")
            payee_id, amount, nonce, hs, t, phash = _unpack(F.SENT_FMT, payload, seq, "SENT")
            p = _decode(wire.decode_payment, r.payment, seq, "payment")
            if hashlib.sha256(p.raw).digest() != phash:
                raise Reject(422, f"record {seq}: payment does not match the ledger's payment hash")
            if (p.payer_id, p.payee_id, p.amount, p.qr_nonce, p.handshake_hash, p.time) != (
                dev, payee_id, amount, nonce, hs, t
            ) or p.txid != wire.txid(dev, p.counter):
                raise Reject(422, f"record {seq}: payment fields differ from the ledger record")
            sigs.append((cert.identity_pub, p.raw, seq, "payment not signed by the payer"))
            cert_of(payee_id, seq, "payee")
            last_sent = PaymentObs(seq, F.K_SENT, p, phash)
            v.events.append((seq, F.K_SENT, last_sent))
        elif kind == F.K_RESULT:
            if r.payment is not None:
                raise Reject(422, f"record {seq}: a RESULT record carries only the receipt")
            status, payee_seq, t, sig = _unpack(F.RESULT_FMT, payload, seq, "RESULT")
            rc = _decode(wire.decode_receipt, r.receipt, seq, "receipt")
            if (rc.status, rc.payee_seq, rc.time, wire.signature(rc.raw)) != (status, payee_seq, t, sig):
                raise Reject(422, f"record {seq}: receipt fields differ from the ledger record")
            if last_sent is not None:
                if rc.payment_hash != last_sent.payment_hash:
                    raise Reject(422, f"record {seq}: receipt is not for the payment before it")
                payee = cert_of(last_sent.payment.payee_id, seq, "payee")
                sigs.append((payee.identity_pub, rc.raw, seq, "receipt not signed by the payee"))
                last_sent.receipt = rc
                last_sent = None
            elif v.pending_receipt is None and not v.events:
                v.pending_receipt = (seq, rc)  # its SENT came in an earlier upload: checked in settlement
            else:
                raise Reject(422, f"record {seq}: receipt without a payment awaiting one")
            v.events.append((seq, F.K_RESULT, rc))
        elif kind == F.K_RCVD:
            f = _unpack(F.RCVD_FMT, payload, seq, "RCVD")
            payment_raw = F.rebuild_payment_rcvd(dev, payload)
            if r.payment is not None and r.payment != payment_raw:
                raise Reject(422, f"record {seq}: payment differs from the ledger record")
            # the payment's fields are the record's (rebuilt from them, txid included): no second parse
            p = wire.Payment(payment_raw[2:18], f[0], dev, *f[1:9], payment_raw)
            rc = _receipt(r.receipt, seq)
            phash = hashlib.sha256(payment_raw).digest()
            if rc.payment_hash != phash or (rc.status, rc.time) != (f[10], f[11]):
                raise Reject(422, f"record {seq}: receipt differs from the ledger record")
            payer = certs.get(p.payer_id) or cert_of(p.payer_id, seq, "payer")
            sigs.append((payer.identity_pub, payment_raw, seq, "payment not signed by the payer"))
            sigs.append((cert.identity_pub, rc.raw, seq, "receipt not signed by this device"))
            v.events.append((seq, F.K_RCVD, PaymentObs(seq, F.K_RCVD, p, phash, rc)))
        elif kind in (F.K_VOUCHER, F.K_ACK, F.K_STATUS):
            body = payload[1:]
            if kind == F.K_STATUS:
                if len(body) != wire.STATUS_LEN + 5:
                    raise Reject(422, f"record {seq}: STATUS record has the wrong length")
                msg = _decode(wire.decode_status, body[:-5], seq, "status")
            else:
                decode = wire.decode_voucher if kind == F.K_VOUCHER else wire.decode_ack
                msg = _decode(decode, body, seq, "backend message")
            if msg.device_id != dev:
                raise Reject(422, f"record {seq}: backend message for another device")
            sigs.append((backend_pub, msg.raw, seq, "not signed by this backend"))
            v.events.append((seq, kind, msg))
        else:
            raise Reject(422, f"record {seq}: unknown record kind {kind}")
    for pub, raw, seq, why in sigs:
        if not signed_by(pub, raw):
            raise Reject(422, f"record {seq}: {why}")
    return v
