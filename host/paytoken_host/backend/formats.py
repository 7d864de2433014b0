"""Sync upload format (docs/protocol.md, "Sync upload"): what a device hands a relay, and what the backend takes.

A batch is JSON: the device's raw ledger records since its last acknowledgement, the chain hash before them, the
full signed payment and receipt bytes each payment record stands for, and a device-signed *sync head* that binds
the whole range (base seq and hash, last seq and chain hash). Everything in it is signed end to end, by the
device, its counterparties or the backend, so the relay that carries it cannot alter it undetected.

The ledger record layouts are the wallet's, defined once in paytoken.wire (the wallet module itself needs
MicroPython's crypto core to import).
"""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from typing import NamedTuple

from paytoken import reasons, wire
from paytoken import syncwire as S
from paytoken.ledger import ZERO_HASH, Ledger

FORMAT = "paytoken-sync/1"
MAX_RECORDS = 2000  # records in one batch

# ---- ledger record kinds and layouts: the wallet's, from their one definition in paytoken.wire ----
K_SENT, K_RESULT, K_RCVD, K_VOUCHER, K_ACK, K_STATUS = (
    wire.K_SENT, wire.K_RESULT, wire.K_RCVD, wire.K_VOUCHER, wire.K_ACK, wire.K_STATUS)
SENT_FMT = wire.LEDGER_SENT  # payee_id, amount, qr_nonce, handshake_hash, time, payment_hash
RESULT_FMT = wire.LEDGER_RESULT  # receipt status, payee_seq, time, payee signature
RCVD_FMT = wire.LEDGER_RCVD  # payer_id, amount, currency, counter, offline_spent, prev_hash, nonce, hs, time,
# payer signature, receipt status, receipt time
STATUS_SUFFIX = wire.LEDGER_STATUS_SUFFIX  # role, amount (after the backend's signed status)
SNAP_FMT = wire.LEDGER_SNAPSHOT  # a compacted ledger's checkpoint: the wallet's state at its base
_SENT_LEN = 1 + struct.calcsize(SENT_FMT)
_RESULT_LEN = 1 + struct.calcsize(RESULT_FMT)
_RCVD_LEN = 1 + struct.calcsize(RCVD_FMT)

# ---- the device-signed sync formats: their one definition is paytoken.syncwire (the firmware's) ----
T_SYNC_HEAD = S.T_SYNC_HEAD
SYNC_HEAD_LEN = S.SYNC_HEAD_LEN
T_UPDATES_REQUEST = S.T_UPDATES_REQUEST
UPDATES_REQUEST_LEN = S.UPDATES_REQUEST_LEN
sync_head_body = S.sync_head_body
updates_request_body = S.updates_request_body


class BatchError(ValueError):
    """A malformed batch: the message says what is wrong, the whole batch is refused."""


@dataclass(frozen=True)
class SyncHead:
    device_id: bytes
    base_seq: int
    base_hash: bytes
    upto_seq: int
    chain_hash: bytes
    raw: bytes


def decode_sync_head(data: bytes) -> SyncHead:
    return SyncHead(*S.decode_sync_head(data))


@dataclass(frozen=True)
class UpdatesRequest:
    device_id: bytes
    since: int
    rl_version: int
    time: int
    nonce: bytes
    raw: bytes


def decode_updates_request(data: bytes) -> UpdatesRequest:
    return UpdatesRequest(*S.decode_updates_request(data))


def chain(h: bytes, payload: bytes) -> bytes:
    """The ledger's chain hash after a record: SHA-256(previous hash || payload) (ledger.py)."""
    return hashlib.sha256(h + payload).digest()


# ---- the batch ----
class Record(NamedTuple):  # a named tuple, not a dataclass: an upload makes thousands (cheaper to build)
    seq: int
    payload: bytes
    payment: bytes | None
    receipt: bytes | None


@dataclass(frozen=True)
class Batch:
    device_id: bytes
    base_seq: int
    base_hash: bytes
    records: list[Record]
    certs: list[bytes]
    head: SyncHead

    @property
    def upto_seq(self) -> int:
        return self.base_seq + len(self.records)


def _hex(value: object, what: str, length: int | None = None) -> bytes:
    if not isinstance(value, str):
        raise BatchError(f"{what}: expected a hex string")
    try:
        raw = bytes.fromhex(value)
    except ValueError:
        raise BatchError(f"{what}: not hex") from None
    if length is not None and len(raw) != length:
        raise BatchError(f"{what}: expected {length} bytes, got {len(raw)}")
    return raw


def _int(value: object, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**32:
        raise BatchError(f"{what}: expected an integer 0..2^32-1")
    return value


_RECORD_FIELDS = frozenset(("payload", "payment", "receipt"))


def parse_batch(body: bytes | str) -> Batch:
    """A batch from its JSON text; BatchError with the reason for anything malformed (no signature is checked)."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise BatchError(f"not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise BatchError("batch: expected a JSON object")
    if doc.get("format") != FORMAT:
        raise BatchError(f"batch: format must be {FORMAT!r}")
    unknown = set(doc) - {"format", "device_id", "base_seq", "base_hash", "records", "certs", "head"}
    if unknown:
        raise BatchError(f"batch: unknown fields {sorted(unknown)}")
    device_id = _hex(doc.get("device_id"), "device_id", 8)
    base_seq = _int(doc.get("base_seq"), "base_seq")
    base_hash = _hex(doc.get("base_hash"), "base_hash", 32)
    recs = doc.get("records")
    if not isinstance(recs, list):
        raise BatchError("records: expected a list")
    if len(recs) > MAX_RECORDS:
        raise BatchError(f"records: at most {MAX_RECORDS} per batch")
    records = []
    fromhex = bytes.fromhex
    for i, r in enumerate(recs):
        seq = base_seq + 1 + i
        if not isinstance(r, dict) or not _RECORD_FIELDS.issuperset(r):
            raise BatchError(f"record {seq}: expected an object with payload, payment, receipt")
        try:  # the usual record in one go; anything amiss is decoded again below, for the reason
            payload, payment, receipt = fromhex(r["payload"]), r.get("payment"), r.get("receipt")
            payment = fromhex(payment) if payment is not None else None
            receipt = fromhex(receipt) if receipt is not None else None
        except (KeyError, TypeError, ValueError):
            payload = _hex(r.get("payload"), f"record {seq} payload")
            if not 0 < len(payload) <= 1024:
                raise BatchError(f"record {seq}: payload size") from None
            payment = _hex(r["payment"], f"record {seq} payment") if r.get("payment") is not None else None
            receipt = _hex(r["receipt"], f"record {seq} receipt") if r.get("receipt") is not None else None
        if not 0 < len(payload) <= 1024:
            raise BatchError(f"record {seq}: payload size")
        records.append(Record(seq, payload, payment, receipt))
    certs_in = doc.get("certs", [])
    if not isinstance(certs_in, list) or len(certs_in) > MAX_RECORDS:
        raise BatchError("certs: expected a list")
    certs = [_hex(c, f"certs[{i}]") for i, c in enumerate(certs_in)]
    return _batch(device_id, base_seq, base_hash, records, certs, _hex(doc.get("head"), "head"))


def _batch(device_id: bytes, base_seq: int, base_hash: bytes, records: list[Record], certs: list[bytes],
           head_raw: bytes) -> Batch:
    try:
        head = decode_sync_head(head_raw)
    except wire.WireError as e:
        raise BatchError(str(e)) from None
    if (head.device_id, head.base_seq, head.base_hash, head.upto_seq) != (
        device_id, base_seq, base_hash, base_seq + len(records)
    ):
        raise BatchError("head: does not name this batch's device and range")
    return Batch(device_id, base_seq, base_hash, records, certs, head)


def sealed_batch(head_raw: bytes, records: list[tuple[bytes, bytes | None, bytes | None]]) -> Batch:
    """A batch from a sealed sync request (syncwire.decode_request: the head and its records, binary)."""
    try:
        dev, base_seq, base_hash, _, _, _ = S.decode_sync_head(head_raw)
    except wire.WireError as e:
        raise BatchError(str(e)) from None
    recs = [Record(base_seq + 1 + i, *r) for i, r in enumerate(records)]
    return _batch(dev, base_seq, base_hash, recs, [], head_raw)


def counterparties(batch: Batch) -> set[bytes]:
    """Device ids a batch's payment records name (payees of SENT, payers of RCVD)."""
    out = set()
    for r in batch.records:
        if r.payload and r.payload[0] in (K_SENT, K_RCVD) and len(r.payload) >= 9:
            out.add(r.payload[1:9])
    return out


def batch_json(device_id: bytes, base_seq: int, base_hash: bytes, records: Iterable[Record], head: bytes,
               certs: Iterable[bytes] = ()) -> str:
    out = []
    for r in records:
        item: dict[str, str] = {"payload": r.payload.hex()}
        if r.payment is not None:
            item["payment"] = r.payment.hex()
        if r.receipt is not None:
            item["receipt"] = r.receipt.hex()
        out.append(item)
    doc = {"format": FORMAT, "device_id": device_id.hex(), "base_seq": base_seq, "base_hash": base_hash.hex(),
           "records": out, "head": head.hex()}
    certs = list(certs)
    if certs:
        doc["certs"] = [c.hex() for c in certs]
    return json.dumps(doc, separators=(",", ":"))


# ---- building a batch from a device's ledger (CPython; the firmware sync client produces the same) ----
# A RCVD record holds the payment's fields from amount to time and then its signature in the payment's own
# order and widths (wire.LEDGER_RCVD, wire's payment layout): the payment is rebuilt by slicing, without
# unpacking and packing every field (the upload's hot path). A test in test_backend_settlement checks it
# against wire.payment_body.
_RCVD_PAYER = slice(1, 1 + wire.ID_LEN)
_RCVD_COUNTER = slice(1 + struct.calcsize(">8sIH"), 1 + struct.calcsize(">8sIHI"))  # after payer, amount, currency
_RCVD_PAYMENT_TAIL = slice(_RCVD_PAYER.stop, _RCVD_LEN - struct.calcsize(">BI"))  # up to receipt status and time
_PAYMENT_HEAD = bytes((wire.T_PAYMENT, wire.VERSION))


def rebuild_payment_rcvd(payee_id: bytes, payload: bytes) -> bytes:
    """The payer's signed payment a RCVD record stands for (payload: a whole RCVD record, length checked)."""
    payer_id = payload[_RCVD_PAYER]
    txid = wire.txid(payer_id, int.from_bytes(payload[_RCVD_COUNTER], "big"))
    return _PAYMENT_HEAD + txid + payer_id + payee_id + payload[_RCVD_PAYMENT_TAIL]


def build_batch(ledger_path: str, cert: bytes, sign, since_seq: int | None = None, certs: Iterable[bytes] = (),
                state: dict | None = None) -> str:
    """A device's upload: its ledger records after since_seq (default: its last acknowledgement, or the oldest
    record still in the file), with the full signed payment and receipt bytes of each payment record.

    sign(body) -> body || signature with the device's identity key (RFC 6979: the payer's own payment signature
    is a function of key and body, so it is recomputed here, as the wallet does). A compacted ledger's replay
    starts from the wallet state in its checkpoint.
    """
    c = wire.decode_cert(cert)
    ledger = Ledger(ledger_path)
    try:
        if ledger.corrupt is not None:
            raise BatchError(f"ledger corrupt: {ledger.corrupt}")
        st = {"counter": 0, "prev_hash": ZERO_HASH, "offline_spent": 0, "seq": 0, "acked_seq": 0}
        if ledger.checkpoint:
            _, counter, prev, spent, seq, _, acked_seq, _, _ = struct.unpack_from(SNAP_FMT, ledger.checkpoint, 0)
            st.update(counter=counter, prev_hash=prev, offline_spent=spent, seq=seq, acked_seq=acked_seq)
        all_records = [(s, bytes(p)) for s, p in ledger.records(ledger.base_seq + 1)]
        sent: list[tuple[int, int, bytes, bool]] = []  # (seq, amount, payment, voided) for offline spending
        last_payment: bytes | None = None
        out: list[Record] = []
        acked = st["acked_seq"]
        for seq, payload in all_records:
            kind = payload[0]
            payment = receipt = None
            if kind == K_SENT:
                payee_id, amount, nonce, hs, t, phash = struct.unpack_from(SENT_FMT, payload, 1)
                counter = st["counter"] + 1
                body = wire.payment_body(wire.txid(c.device_id, counter), c.device_id, payee_id, amount,
                                         c.currency, counter, st["offline_spent"], st["prev_hash"], nonce, hs, t)
                payment = sign(body)
                if hashlib.sha256(payment).digest() != phash:
                    raise BatchError(f"record {seq}: recomputed payment does not match the ledger")
                st["counter"], st["prev_hash"] = counter, phash
                st["offline_spent"] += amount
                sent.append((seq, amount, payment, False))
                last_payment = payment
            elif kind == K_RESULT:
                status, payee_seq, t, sig = struct.unpack_from(RESULT_FMT, payload, 1)
                if last_payment is None:
                    raise BatchError(f"record {seq}: receipt without its payment in the ledger")
                receipt = wire.receipt_body(hashlib.sha256(last_payment).digest(), status, payee_seq, t) + sig
                if status != reasons.OK:
                    st["offline_spent"] -= sent[-1][1]
                    sent[-1] = sent[-1][:3] + (True,)
                last_payment = None
            elif kind == K_RCVD:
                st["seq"] += 1
                payment = rebuild_payment_rcvd(c.device_id, payload)
                f = struct.unpack_from(RCVD_FMT, payload, 1)
                receipt = sign(wire.receipt_body(hashlib.sha256(payment).digest(), f[10], st["seq"], f[11]))
            elif kind == K_ACK:
                a = wire.decode_ack(payload[1:])
                acked = a.upto_seq
                st["offline_spent"] = sum(amt for s, amt, _, v in sent if a.upto_seq < s < seq and not v)
            elif kind == K_STATUS:
                st_msg = wire.decode_status(payload[1:-5])
                if last_payment is not None and st_msg.txid == wire.txid(c.device_id, st["counter"]):
                    last_payment = None
            out.append(Record(seq, payload, payment, receipt))
        start = acked if since_seq is None else since_seq
        start = max(start, ledger.base_seq)
        chosen = [r for r in out if r.seq > start]
        base_hash = ledger.hash_at(start)
        upto, head_hash = ledger.head
        head = sign(sync_head_body(c.device_id, start, base_hash, upto, head_hash))
        return batch_json(c.device_id, start, base_hash, chosen, head, certs)
    finally:
        ledger.close()
