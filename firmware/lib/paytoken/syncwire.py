# The sync formats (docs/protocol.md section 10), the one definition shared by the firmware's sync client and
# the backend (imported under CPython as paytoken.syncwire): the two device-signed objects (sync head, updates
# request) and the plaintext of the sealed exchange, the Noise NK handshake whose message 1 carries the device's
# request and whose message 2 the backend's answer. Binary, not JSON: the device builds and reads it with
# struct and slices, and nothing is hex-encoded twice over in its RAM.
#
# Decoding is strict, as in wire.py: wrong type or version, a bad length or trailing bytes raise WireError.
# Loaded by the sync client only, never on the payment path.
import struct

from paytoken.wire import PAYMENT_LEN, RECEIPT_LEN, SIG_LEN, WireError, _fixed

try:
    from micropython import const
except ImportError:  # CPython: the backend
    def const(x):
        return x

# Noise_NK_25519_AESGCM_SHA256 to the backend's static X25519 key (store/backend.kx), with this prologue.
PROLOGUE = b"paytoken/sync/1"

# ---- sync head (device-signed): binds an upload's range of the device's ledger ----
# type 'H', version 1, device_id 8, base_seq u32, base_hash 32, upto_seq u32, chain_hash 32, signature 64
T_SYNC_HEAD = const(0x48)
_HEAD = ">BB8sI32sI32s"
SYNC_HEAD_LEN = const(146)  # struct.calcsize(_HEAD) + SIG_LEN

# ---- updates request (device-signed): a device asking for its own updates from a status cursor ----
# type 'U', version 2, device_id 8, since u32, rl_version u32 (the revocation list version the device holds:
# the backend sends the delta after it), time u32, nonce 16, signature 64. In a sealed exchange the nonce is
# the first 16 bytes of the device's Noise ephemeral key (message 1 starts with it): the request is bound to
# the one handshake whose answer only that device can read.
T_UPDATES_REQUEST = const(0x55)
_UREQ_VERSION = const(2)
_UREQ = ">BB8sIII16s"
UPDATES_REQUEST_LEN = const(102)

# ---- the sealed exchange's plaintexts ----
T_REQUEST = const(0x21)
T_ANSWER = const(0x22)
_VERSION = const(1)
F_UPDATES = const(1)  # request flag: an updates request follows
F_UPLOAD = const(2)  # request flag: a sync head and its records follow
A_PAYMENT = const(1)  # record flag: the payment the record stands for follows
A_RECEIPT = const(2)  # record flag: the receipt follows
MAX_RECORDS = const(64)  # records in one request (a device sends fewer: its RAM holds the whole message)
MAX_PAYLOAD = const(512)  # a ledger record's payload (ledger.MAX_PAYLOAD)
MAX_UPDATES = const(255)  # updates in one answer
_ANSWER = ">BBHIHI16sBB"  # type, version, upload status, synced_seq, updates status, cursor, wake token, more,
# error length
_ANSWER_LEN = const(32)
WAKE_LEN = const(16)


def _header(data, kind, version, name):
    if len(data) < 2 or data[0] != kind:
        raise WireError(name + ": wrong type")
    if data[1] != version:
        raise WireError(name + ": unknown version")


def sync_head_body(device_id, base_seq, base_hash, upto_seq, chain_hash):
    if len(device_id) != 8 or len(base_hash) != 32 or len(chain_hash) != 32:
        raise WireError("sync head: bad field length")
    return struct.pack(_HEAD, T_SYNC_HEAD, 1, device_id, base_seq, base_hash, upto_seq, chain_hash)


def _fields(*fields):
    return fields


def decode_sync_head(data):
    # (device_id, base_seq, base_hash, upto_seq, chain_hash, raw)
    return _fixed(data, T_SYNC_HEAD, "sync head", _HEAD, SYNC_HEAD_LEN, _fields)


def updates_request_body(device_id, since, rl_version, time, nonce):
    if len(device_id) != 8 or len(nonce) != 16:
        raise WireError("updates request: bad field length")
    return struct.pack(_UREQ, T_UPDATES_REQUEST, _UREQ_VERSION, device_id, since, rl_version, time, nonce)


def decode_updates_request(data):
    # (device_id, since, rl_version, time, nonce, raw)
    return _fixed(data, T_UPDATES_REQUEST, "updates request", _UREQ, UPDATES_REQUEST_LEN, _fields, _UREQ_VERSION)


# ---- request: type, version, flags u8; [updates request 102]; [sync head 146, then for each record of the
# head's range: payload length u16, payload, attached u8 (A_PAYMENT | A_RECEIPT), payment 188?, receipt 107?]
def request_parts(ureq, head, records):
    # The request's bytes as a list of parts (join them once); records: (payload, payment, receipt) with
    # payment and receipt None where the record carries none.
    flags = (F_UPDATES if ureq else 0) | (F_UPLOAD if head else 0)
    parts = [bytes((T_REQUEST, _VERSION, flags))]
    if ureq:
        parts.append(ureq)
    if head:
        parts.append(head)
        for payload, payment, receipt in records:
            n = len(payload)
            if not 0 < n <= MAX_PAYLOAD:
                raise WireError("sync request: record size")
            parts.append(struct.pack(">H", n))
            parts.append(payload)
            parts.append(bytes(((A_PAYMENT if payment else 0) | (A_RECEIPT if receipt else 0),)))
            if payment:
                parts.append(payment)
            if receipt:
                parts.append(receipt)
    return parts


def _take(mv, off, length, present):
    # (the `length` bytes at off, or None if not present; the offset after them). Past the end: shorter, and the
    # caller's final length check refuses the message.
    if not present:
        return None, off
    return bytes(mv[off:off + length]), off + length


def decode_request(data):
    # (updates request raw or None, sync head raw or None, [(payload, payment, receipt)]); WireError if malformed.
    mv = memoryview(data)
    n = len(mv)
    if n < 3:
        raise WireError("sync request: too short")
    _header(mv, T_REQUEST, _VERSION, "sync request")
    flags = mv[2]
    if flags & ~(F_UPDATES | F_UPLOAD) or not flags:
        raise WireError("sync request: bad flags")
    records = []
    ureq, off = _take(mv, 3, UPDATES_REQUEST_LEN, flags & F_UPDATES)
    head, off = _take(mv, off, SYNC_HEAD_LEN, flags & F_UPLOAD)
    if head is not None:
        if off > n:
            raise WireError("sync request: truncated")
        _, base_seq, _, upto_seq, _, _ = decode_sync_head(head)
        count = upto_seq - base_seq
        if not 0 < count <= MAX_RECORDS:
            raise WireError("sync request: a head names 1 to %d records" % MAX_RECORDS)
        for _ in range(count):
            if off + 3 > n:
                raise WireError("sync request: truncated")
            ln = mv[off] << 8 | mv[off + 1]
            if not 0 < ln <= MAX_PAYLOAD:
                raise WireError("sync request: record size")
            payload, off = _take(mv, off + 2, ln, True)
            if off >= n:
                raise WireError("sync request: truncated")
            att = mv[off]
            off += 1
            if att & ~(A_PAYMENT | A_RECEIPT):
                raise WireError("sync request: bad record flags")
            payment, off = _take(mv, off, PAYMENT_LEN, att & A_PAYMENT)
            receipt, off = _take(mv, off, RECEIPT_LEN, att & A_RECEIPT)
            records.append((payload, payment, receipt))
    if off != n:
        raise WireError("sync request: truncated" if off > n else "sync request: trailing bytes")
    if ureq is not None:
        decode_updates_request(ureq)
    return ureq, head, records


# ---- answer: type, version, upload status u16 (0: no upload asked; else as HTTP: 200 accepted, 409 with a
# fork, 4xx refused), synced_seq u32, updates status u16 (0: none asked; 200, or 4xx refused), cursor u32,
# wake token 16 (for GET /v1/wake; zeros when no updates were asked), more u8, error length u8, error (ASCII),
# update count u8, then each update: length u16, backend-signed bytes
def answer(upload_status, synced_seq, updates_status, cursor, more, error, updates, wake=bytes(16)):
    err = error.encode("ascii", "replace")[:255]  # host side; ASCII: a cut never splits a character
    if len(updates) > MAX_UPDATES:
        raise WireError("sync answer: too many updates")
    if len(wake) != WAKE_LEN:
        raise WireError("sync answer: wake token length")
    parts = [struct.pack(_ANSWER, T_ANSWER, _VERSION, upload_status, synced_seq, updates_status, cursor, wake,
                         1 if more else 0, len(err)), err, bytes((len(updates),))]
    for u in updates:
        parts.append(struct.pack(">H", len(u)))
        parts.append(u)
    return b"".join(parts)


def decode_answer(data):
    # (upload status, synced_seq, updates status, cursor, more, error text, [update bytes], wake token); WireError
    # if malformed.
    mv = memoryview(data)
    n = len(mv)
    if n < _ANSWER_LEN + 1:
        raise WireError("sync answer: too short")
    _header(mv, T_ANSWER, _VERSION, "sync answer")
    _, _, up, synced, ust, cursor, wake, more, elen = struct.unpack_from(_ANSWER, mv, 0)
    off = _ANSWER_LEN + elen
    if off >= n:
        raise WireError("sync answer: truncated")
    error = str(bytes(mv[_ANSWER_LEN:off]), "utf-8")
    count = mv[off]
    off += 1
    updates = []
    for _ in range(count):
        if off + 2 > n:
            raise WireError("sync answer: truncated")
        ln = mv[off] << 8 | mv[off + 1]
        off += 2
        if ln < SIG_LEN or off + ln > n:
            raise WireError("sync answer: bad update length")
        updates.append(bytes(mv[off:off + ln]))
        off += ln
    if off != n:
        raise WireError("sync answer: trailing bytes")
    return up, synced, ust, cursor, bool(more), error, updates, wake


# ---- status summary (device -> relay, in the clear): the wake hint and the newest payments' statuses ----
# The body of USB SYNC_STATUS (and of SYNC_PUSH after its applied count) and of BLE STATUS_R, one format:
# hint u8 (1: wake token 16 + status cursor u32 follow; 0: none yet) + n u8 + n x (role u8, txid 16, amount u32,
# status length u8, status ASCII), oldest first. Nothing secret: the relay shows it and long-polls with the hint.
SUMMARY_ROWS = const(8)  # payments a summary lists at most, the newest
_SUM_ROW = ">B16sIB"
_SUM_ROW_LEN = const(22)


def status_summary(hint, rows):
    # hint: (wake token, cursor) or None; rows: [(role, txid, amount, status text)], oldest first
    rows = rows[-SUMMARY_ROWS:]
    parts = [b"\x00" if hint is None else b"\x01" + bytes(hint[0]) + struct.pack(">I", hint[1]),
             bytes((len(rows),))]
    for role, txid, amount, text in rows:
        t = text.encode()
        parts.append(struct.pack(_SUM_ROW, role, bytes(txid), amount, len(t)))
        parts.append(t)
    return b"".join(parts)


def decode_status_summary(body):
    # (hint or None, [(role, txid, amount, status)]); WireError if malformed
    mv = memoryview(body)
    n = len(mv)
    if n < 2 or mv[0] > 1:
        raise WireError("status summary: too short" if n < 2 else "status summary: bad hint flag")
    hint = None
    off = 1
    if mv[0] == 1:
        off = 5 + WAKE_LEN
        if n < off + 1:
            raise WireError("status summary: truncated")
        hint = (bytes(mv[1:1 + WAKE_LEN]), struct.unpack_from(">I", mv, 1 + WAKE_LEN)[0])
    count = mv[off]
    off += 1
    rows = []
    for _ in range(count):
        if off + _SUM_ROW_LEN > n:
            raise WireError("status summary: truncated")
        role, txid, amount, ln = struct.unpack_from(_SUM_ROW, mv, off)
        off += _SUM_ROW_LEN
        if off + ln > n:
            raise WireError("status summary: truncated")
        text = bytes(mv[off:off + ln])
        if any(c < 0x20 or c > 0x7E for c in text):
            raise WireError("status summary: status not printable ASCII")
        rows.append((role, txid, amount, str(text, "ascii")))
        off += ln
    if off != n:
        raise WireError("status summary: trailing bytes")
    return hint, rows
