# The one definition of paytoken's binary formats (docs/protocol.md describes every byte).
# Pure encoding and decoding, no crypto and no hardware: runs on the device, on the unix port and under
# CPython in the host tools, so signatures made on one verify byte-exactly on the other.
#
# Every signed object starts with a type byte and a version byte and ends with a 64-byte P-256
# signature (r || s) over everything before it. Decoding is strict: wrong type, unknown version, wrong
# length or trailing bytes raise WireError, never a partial object.
import struct
from collections import namedtuple
from hashlib import sha256

try:
    from micropython import const
except ImportError:  # CPython host tools
    def const(x):
        return x

SIG_LEN = const(64)
ID_LEN = const(8)
HASH_LEN = const(32)
NONCE_LEN = const(8)
TXID_LEN = const(16)
WALLET_SHORT_LEN = const(4)
KEY_ID_LEN = const(4)

T_CERT = const(0x43)  # 'C'
T_REVOCATION = const(0x52)  # 'R'
T_PAYMENT = const(0x50)  # 'P'
T_RECEIPT = const(0x41)  # 'A'
T_VOUCHER = const(0x4C)  # 'L'
T_ACK = const(0x4B)  # 'K'
T_STATUS = const(0x53)  # 'S'
VERSION = const(1)

ROLE_PAYER = const(1)
ROLE_PAYEE = const(2)

_QR_VERSION = const(1)
_QR_ADDR_RANDOM = const(1)
_QR_HAS_AMOUNT = const(2)


class WireError(ValueError):
    pass


def _check_header(data, kind, name, version=VERSION):
    if len(data) < 2 or data[0] != kind:
        raise WireError(name + ": wrong type")
    if data[1] != version:
        raise WireError(name + ": unknown version")


def _check_len(data, n, name):
    if len(data) != n:
        raise WireError(name + ": wrong length")


def _fixed(data, kind, name, fmt, length, cls, version=VERSION):
    # A fixed-length signed object: checked header and length, then its fields after type and version.
    data = bytes(data)
    _check_header(data, kind, name, version)
    _check_len(data, length, name)
    return cls(*(struct.unpack_from(fmt, data, 0)[2:] + (data,)))


# ---- device certificate ----
# type, version, serial u32, device_id 8, role u8, identity_pub 33 (compressed P-256),
# [x25519_pub 32 if role has ROLE_PAYEE], currency u16, limit_payment u32, limit_offline u32,
# max_holding u32, not_before u32, not_after u32, issuer_key_id 4, signature 64
_CERT_HEAD = ">BBI8sB33s"
_CERT_TAIL = ">HIIIII4s"
_CERT_HEAD_LEN = struct.calcsize(_CERT_HEAD)
_CERT_TAIL_LEN = struct.calcsize(_CERT_TAIL)

Certificate = namedtuple("Certificate", (
    "serial", "device_id", "role", "identity_pub", "x25519_pub", "currency", "limit_payment",
    "limit_offline", "max_holding", "not_before", "not_after", "issuer_key_id", "raw"))


def cert_length(role):
    return _CERT_HEAD_LEN + (32 if role & ROLE_PAYEE else 0) + _CERT_TAIL_LEN + SIG_LEN


def cert_body(serial, device_id, role, identity_pub, x25519_pub, currency, limit_payment, limit_offline,
              max_holding, not_before, not_after, issuer_key_id):
    # The bytes the issuer signs; the certificate is these bytes followed by the signature.
    if role not in (ROLE_PAYER, ROLE_PAYEE, ROLE_PAYER | ROLE_PAYEE):
        raise WireError("certificate: bad role")
    if len(device_id) != ID_LEN or len(identity_pub) != 33 or len(issuer_key_id) != KEY_ID_LEN:
        raise WireError("certificate: bad field length")
    if bool(role & ROLE_PAYEE) != (x25519_pub is not None) or (x25519_pub is not None and len(x25519_pub) != 32):
        raise WireError("certificate: x25519 key goes with the payee role")
    head = struct.pack(_CERT_HEAD, T_CERT, VERSION, serial, device_id, role, identity_pub)
    tail = struct.pack(_CERT_TAIL, currency, limit_payment, limit_offline, max_holding, not_before, not_after,
                       issuer_key_id)
    return head + (x25519_pub or b"") + tail


def decode_cert(data):
    data = bytes(data)
    _check_header(data, T_CERT, "certificate")
    if len(data) < _CERT_HEAD_LEN:
        raise WireError("certificate: wrong length")
    _, _, serial, device_id, role, identity_pub = struct.unpack_from(_CERT_HEAD, data, 0)
    if role not in (ROLE_PAYER, ROLE_PAYEE, ROLE_PAYER | ROLE_PAYEE):
        raise WireError("certificate: bad role")
    _check_len(data, cert_length(role), "certificate")
    off = _CERT_HEAD_LEN
    xpub = None
    if role & ROLE_PAYEE:
        xpub = data[off:off + 32]
        off += 32
    currency, lim_pay, lim_off, max_hold, nb, na, key_id = struct.unpack_from(_CERT_TAIL, data, off)
    if identity_pub[0] not in (2, 3):
        raise WireError("certificate: identity key not compressed SEC1")
    return Certificate(serial, device_id, role, identity_pub, xpub, currency, lim_pay, lim_off, max_hold,
                       nb, na, key_id, data)


# ---- revocation delta (backend-signed): type T_REVOCATION, defined in paytoken/revocation.py, loaded only where
# a device has a revocation list or syncs, never on the payment path of one without ----

# ---- payment (signed by the payer's identity key) ----
# type, version, txid 16 (txid(payer_id, counter)), payer_id 8, payee_id 8, amount u32 (minor units),
# currency u16, counter u32,
# offline_spent u32 (payer's offline spending before this payment), prev_hash 32 (SHA-256 of the payer's
# previous payment, zeros for its first), qr_nonce 8, handshake_hash 32, time u32 (0 = unknown),
# signature 64
_PAY = ">BB16s8s8sIHII32s8s32sI"
PAYMENT_BODY_LEN = struct.calcsize(_PAY)
PAYMENT_LEN = PAYMENT_BODY_LEN + SIG_LEN

Payment = namedtuple("Payment", (
    "txid", "payer_id", "payee_id", "amount", "currency", "counter", "offline_spent", "prev_hash",
    "qr_nonce", "handshake_hash", "time", "raw"))


def txid(payer_id, counter):
    # Derived, not random: unique per payer counter, recomputable by anyone, and never stored twice.
    return sha256(b"paytoken/txid" + bytes(payer_id) + struct.pack(">I", counter)).digest()[:TXID_LEN]


def payment_body(txid, payer_id, payee_id, amount, currency, counter, offline_spent, prev_hash, qr_nonce,
                 handshake_hash, time):
    if (len(txid), len(payer_id), len(payee_id), len(prev_hash), len(qr_nonce), len(handshake_hash)) != \
            (TXID_LEN, ID_LEN, ID_LEN, HASH_LEN, NONCE_LEN, HASH_LEN):
        raise WireError("payment: bad field length")
    return struct.pack(_PAY, T_PAYMENT, VERSION, txid, payer_id, payee_id, amount, currency, counter,
                       offline_spent, prev_hash, qr_nonce, handshake_hash, time)


def decode_payment(data):
    return _fixed(data, T_PAYMENT, "payment", _PAY, PAYMENT_LEN, Payment)


# ---- receipt (the payee's countersignature over a payment) ----
# type, version, payment_hash 32 (SHA-256 of the whole signed payment), status u8 (reasons.OK: accepted
# and credited; otherwise the reason the payee refused it, which voids the payment), payee_seq u32 (the
# payee's own record counter), time u32 (0 = unknown), signature 64
_RCPT = ">BB32sBII"
RECEIPT_BODY_LEN = struct.calcsize(_RCPT)
RECEIPT_LEN = RECEIPT_BODY_LEN + SIG_LEN

Receipt = namedtuple("Receipt", ("payment_hash", "status", "payee_seq", "time", "raw"))


def receipt_body(payment_hash, status, payee_seq, time):
    if len(payment_hash) != HASH_LEN:
        raise WireError("receipt: bad field length")
    return struct.pack(_RCPT, T_RECEIPT, VERSION, payment_hash, status, payee_seq, time)


def decode_receipt(data):
    return _fixed(data, T_RECEIPT, "receipt", _RCPT, RECEIPT_LEN, Receipt)


def signed_part(raw):
    # The bytes a signature covers: everything but the trailing signature.
    return raw[:-SIG_LEN]


def signature(raw):
    return raw[-SIG_LEN:]


# ---- QR payload (what the payee shows; base45 text in a QR code) ----
# byte 0: version << 4 | flags (_QR_ADDR_RANDOM, _QR_HAS_AMOUNT); wallet_short 4 (first bytes of the payee's
# device id); ble_addr 6; x25519_pub 32; nonce 8; [amount u32, currency u16 if _QR_HAS_AMOUNT]
# 51 bytes = 77 base45 characters without an amount: exactly a version-3 QR at level L.
_QR = ">B4s6s32s8s"
QR_LEN = struct.calcsize(_QR)
QR_AMOUNT_LEN = QR_LEN + 6

QrPayload = namedtuple("QrPayload", ("wallet_short", "ble_addr", "addr_random", "x25519_pub", "nonce",
                                     "amount", "currency", "raw"))


def qr_payload(wallet_short, ble_addr, addr_random, x25519_pub, nonce, amount=None, currency=None):
    if (len(wallet_short), len(ble_addr), len(x25519_pub), len(nonce)) != (WALLET_SHORT_LEN, 6, 32, NONCE_LEN):
        raise WireError("qr: bad field length")
    flags = _QR_ADDR_RANDOM if addr_random else 0
    tail = b""
    if amount is not None:
        flags |= _QR_HAS_AMOUNT
        tail = struct.pack(">IH", amount, currency)
    return struct.pack(_QR, _QR_VERSION << 4 | flags, wallet_short, ble_addr, x25519_pub, nonce) + tail


def decode_qr(data):
    data = bytes(data)
    if not data:
        raise WireError("qr: empty")
    if data[0] >> 4 != _QR_VERSION:
        raise WireError("qr: unknown version")
    flags = data[0] & 15
    if flags & ~(_QR_ADDR_RANDOM | _QR_HAS_AMOUNT):
        raise WireError("qr: unknown flags")
    _check_len(data, QR_AMOUNT_LEN if flags & _QR_HAS_AMOUNT else QR_LEN, "qr")
    _, wallet_short, addr, xpub, nonce = struct.unpack_from(_QR, data, 0)
    amount = currency = None
    if flags & _QR_HAS_AMOUNT:
        amount, currency = struct.unpack_from(">IH", data, QR_LEN)
    return QrPayload(wallet_short, addr, bool(flags & _QR_ADDR_RANDOM), xpub, nonce, amount, currency, data)


# ---- session messages (plaintext inside the Noise session; the prologue binds the protocol version) ----
# msg1 payer -> payee, Noise handshake payload: PAYER_HELLO, cert_len u16, payer certificate
# msg2 payee -> payer, Noise handshake payload: PAYEE_HELLO, status u8, then if status is OK:
#      requested amount u32 (0: the payer enters it), currency u16, cert_len u16, payee certificate
# msg3 payer -> payee, transport: PAYMENT_MSG, payment  |  ABORT, reason u8
# msg4 payee -> payer, transport: RECEIPT_MSG, receipt
_M_PAYER_HELLO = const(0x11)
_M_PAYEE_HELLO = const(0x12)
_M_PAYMENT = const(0x13)
_M_RECEIPT = const(0x14)
_M_ABORT = const(0x15)

PayeeHello = namedtuple("PayeeHello", ("status", "amount", "currency", "cert"))


def _expect(data, kind, min_len):
    if len(data) < min_len or data[0] != kind:
        raise WireError("session: unexpected message")


def payer_hello(cert):
    return struct.pack(">BH", _M_PAYER_HELLO, len(cert)) + cert


def decode_payer_hello(data):
    data = bytes(data)
    _expect(data, _M_PAYER_HELLO, 3)
    n = struct.unpack_from(">H", data, 1)[0]
    _check_len(data, 3 + n, "payer hello")
    return data[3:]


def payee_hello(status, amount=0, currency=0, cert=b""):
    if status:
        return bytes((_M_PAYEE_HELLO, status))
    return struct.pack(">BBIHH", _M_PAYEE_HELLO, status, amount, currency, len(cert)) + cert


def decode_payee_hello(data):
    data = bytes(data)
    _expect(data, _M_PAYEE_HELLO, 2)
    status = data[1]
    if status:
        _check_len(data, 2, "payee hello")
        return PayeeHello(status, 0, 0, b"")
    if len(data) < 10:
        raise WireError("payee hello: wrong length")
    _, _, amount, currency, n = struct.unpack_from(">BBIHH", data, 0)
    _check_len(data, 10 + n, "payee hello")
    return PayeeHello(status, amount, currency, data[10:])


def payment_msg(payment):
    return bytes((_M_PAYMENT,)) + payment


def abort_msg(reason):
    return bytes((_M_ABORT, reason))


def receipt_msg(receipt):
    return bytes((_M_RECEIPT,)) + receipt


def decode_payer_final(data):
    # msg3: ("payment", payment bytes) or ("abort", reason)
    data = bytes(data)
    if len(data) == 2 and data[0] == _M_ABORT:
        return "abort", data[1]
    _expect(data, _M_PAYMENT, 1 + PAYMENT_LEN)
    _check_len(data, 1 + PAYMENT_LEN, "payment message")
    return "payment", data[1:]


def decode_receipt_msg(data):
    data = bytes(data)
    _expect(data, _M_RECEIPT, 1 + RECEIPT_LEN)
    _check_len(data, 1 + RECEIPT_LEN, "receipt message")
    return data[1:]


# ---- backend-signed updates for one device ----
# Load voucher: type, version, device_id 8, voucher_counter u32 (1, 2, 3, ... each applied exactly once, in
# order), amount u32, currency u16, issued_at u32, signature 64
_VOUCHER = ">BB8sIIHI"
VOUCHER_LEN = struct.calcsize(_VOUCHER) + SIG_LEN
Voucher = namedtuple("Voucher", ("device_id", "counter", "amount", "currency", "issued_at", "raw"))


def voucher_body(device_id, counter, amount, currency, issued_at):
    return struct.pack(_VOUCHER, T_VOUCHER, VERSION, device_id, counter, amount, currency, issued_at)


def decode_voucher(data):
    return _fixed(data, T_VOUCHER, "voucher", _VOUCHER, VOUCHER_LEN, Voucher)


# Acknowledgement: type, version, device_id 8, upto_seq u32 (ledger sequence), chain_hash 32 (the device's
# ledger chain hash after upto_seq), issued_at u32 (also the device's new lower bound for the time),
# signature 64. The backend holds and has verified every record up to upto_seq.
_ACK = ">BB8sI32sI"
ACK_LEN = struct.calcsize(_ACK) + SIG_LEN
Ack = namedtuple("Ack", ("device_id", "upto_seq", "chain_hash", "issued_at", "raw"))


def ack_body(device_id, upto_seq, chain_hash, issued_at):
    return struct.pack(_ACK, T_ACK, VERSION, device_id, upto_seq, chain_hash, issued_at)


def decode_ack(data):
    return _fixed(data, T_ACK, "ack", _ACK, ACK_LEN, Ack)


# Settlement status of one payment: type, version, device_id 8 (the device told), txid 16, status u8,
# issued_at u32, signature 64
ST_SETTLED = const(1)  # money moved in the bank: final
ST_REJECTED = const(2)  # will never settle (fraud, fork, invalid): final, no refund
ST_REFUNDED = const(3)  # payer only: never reached the payee in time; the amount returns to the payer
_STATUS = ">BB8s16sBI"
STATUS_LEN = struct.calcsize(_STATUS) + SIG_LEN
Status = namedtuple("Status", ("device_id", "txid", "status", "issued_at", "raw"))


def status_body(device_id, txid, status, issued_at):
    if status not in (ST_SETTLED, ST_REJECTED, ST_REFUNDED):
        raise WireError("status: unknown value")
    return struct.pack(_STATUS, T_STATUS, VERSION, device_id, txid, status, issued_at)


def decode_status(data):
    st = _fixed(data, T_STATUS, "status", _STATUS, STATUS_LEN, Status)
    if st.status not in (ST_SETTLED, ST_REJECTED, ST_REFUNDED):
        raise WireError("status: unknown value")
    return st


# ---- ledger records (the wallet's: paytoken/wallet.py; the backend reads them in uploads) ----
# A record's payload is a kind byte and the layout of its kind, kept small so that 5,000 payments fit in 1 MB:
#   SENT    payee_id 8, amount u32, qr_nonce 8, handshake_hash 32, time u32, payment_hash 32
#           (the rest of the payment is derived: txid, own id, currency, counter, offline spending,
#           previous hash; the signature is deterministic, recomputed when the payment is uploaded)
#   RESULT  receipt status u8, payee_seq u32, time u32, payee signature 64: the receipt of the last SENT
#   RCVD    the payer's payment without type, version, txid and payee id (payer_id, amount, currency, counter,
#           offline_spent, prev_hash, nonce, handshake_hash, time, payer signature); receipt status u8, time u32
#   VOUCHER / ACK / STATUS   the backend's signed message as received; STATUS adds role u8, amount u32
# A compacted ledger's checkpoint is the wallet's state at its base (LEDGER_SNAPSHOT, then the QR nonces it
# remembers, 8 bytes each).
K_SENT = const(1)
K_RESULT = const(2)
K_RCVD = const(3)
K_VOUCHER = const(4)
K_ACK = const(5)
K_STATUS = const(6)
LEDGER_SENT = ">8sI8s32sI32s"
LEDGER_RESULT = ">BII64s"
LEDGER_RCVD = ">8sIHII32s8s32sI64sBI"
RCVD_STATUS = const(162)  # offset of the receipt status in a RCVD record after its kind byte
LEDGER_STATUS_SUFFIX = ">BI"  # role, amount
LEDGER_SNAPSHOT = ">iI32sIIIIIB"  # balance, counter, prev_hash, offline_spent, seq, voucher_counter, acked_seq,
# known_time, number of nonces
