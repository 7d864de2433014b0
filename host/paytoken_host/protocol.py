"""The paytoken formats on the host, signed and verified with the `cryptography` package.

The byte layouts come from the firmware's own definition (`paytoken.wire`, shared); the cryptography is
independent of the firmware's, so a record that verifies on both sides was made correctly by either.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from paytoken import revocation, wire

CURVE = ec.SECP256R1()


def sec1(pub: ec.EllipticCurvePublicKey, compressed: bool = False) -> bytes:
    fmt = serialization.PublicFormat.CompressedPoint if compressed else serialization.PublicFormat.UncompressedPoint
    return pub.public_bytes(serialization.Encoding.X962, fmt)


def key_id(pub: bytes) -> bytes:
    """The 4-byte name certificates give an issuer key (same as the firmware's trust.key_id)."""
    return hashlib.sha256(pub).digest()[: wire.KEY_ID_LEN]


def sign(key: ec.EllipticCurvePrivateKey, body: bytes) -> bytes:
    """body || r || s: deterministic ECDSA P-256 over SHA-256, the firmware's signature layout."""
    r, s = decode_dss_signature(key.sign(body, ec.ECDSA(hashes.SHA256(), deterministic_signing=True)))
    return body + r.to_bytes(32, "big") + s.to_bytes(32, "big")


def _der_int(b: bytes) -> bytes:
    b = b.lstrip(b"\0")
    if not b or b[0] & 0x80:  # DER integers are signed and minimal: a zero byte before a high bit, none else
        b = b"\0" + b
    return b"\x02" + bytes((len(b),)) + b


def der_signature(sig: bytes) -> bytes:
    """The DER (X9.62) form of a raw 64-byte r || s signature, built from the bytes (the backend converts two per
    payment: 0.83 us each against 0.97 through integers and encode_dss_signature). At most 70 bytes: short
    lengths."""
    body = _der_int(sig[:32]) + _der_int(sig[32:64])
    return b"\x30" + bytes((len(body),)) + body


_ECDSA = ec.ECDSA(hashes.SHA256())


def verifies(key: ec.EllipticCurvePublicKey, raw: bytes) -> bool:
    """True if the trailing 64-byte signature of raw verifies under key."""
    if len(raw) <= wire.SIG_LEN:
        return False
    try:
        key.verify(der_signature(raw[-wire.SIG_LEN:]), raw[: -wire.SIG_LEN], _ECDSA)
    except InvalidSignature:
        return False
    return True


@lru_cache(maxsize=65536)
def public_key(pub: bytes) -> ec.EllipticCurvePublicKey:
    """A SEC1 public key, parsed (ValueError if it is not a P-256 point). Cached: a key is immutable, and parsing
    one costs a third of a verification (a compressed point's square root); the backend meets each device's key
    again in every upload that names it."""
    return ec.EllipticCurvePublicKey.from_encoded_point(CURVE, pub)


def signed_by(pub: bytes, raw: bytes) -> bool:
    """True if the trailing 64-byte signature of raw verifies under the SEC1 public key pub."""
    try:
        key = public_key(pub)
    except ValueError:
        return False
    return verifies(key, raw)


@dataclass(frozen=True)
class Limits:
    currency: int = 840  # ISO 4217 numeric: USD
    per_payment: int = 50_000  # minor units
    offline: int = 200_000
    max_holding: int = 1_000_000


class Issuer:
    """Signs device certificates. The key file handling (encrypted at rest) belongs to provisioning."""

    def __init__(self, key: ec.EllipticCurvePrivateKey | None = None):
        self.key = key or ec.generate_private_key(CURVE)
        self.public = sec1(self.key.public_key())
        self.key_id = key_id(self.public)

    def issue(
        self,
        device_id: bytes,
        role: int,
        identity_pub: bytes,
        x25519_pub: bytes | None,
        limits: Limits,
        not_before: int,
        not_after: int,
        serial: int = 1,
    ) -> bytes:
        identity = ec.EllipticCurvePublicKey.from_encoded_point(CURVE, identity_pub)
        body = wire.cert_body(
            serial,
            device_id,
            role,
            sec1(identity, compressed=True),
            x25519_pub,
            limits.currency,
            limits.per_payment,
            limits.offline,
            limits.max_holding,
            not_before,
            not_after,
            self.key_id,
        )
        return sign(self.key, body)


def verify_cert(raw: bytes, issuer_pub: bytes, now: int | None = None) -> wire.Certificate:
    """Decoded certificate if it is well-formed, from this issuer, correctly signed and valid at now."""
    cert = wire.decode_cert(raw)
    if cert.issuer_key_id != key_id(issuer_pub) or not signed_by(issuer_pub, cert.raw):
        raise ValueError("certificate not signed by this issuer")
    if now is not None and not cert.not_before <= now <= cert.not_after:
        raise ValueError("certificate not valid at this time")
    return cert


def payment_hash(payment_raw: bytes) -> bytes:
    return hashlib.sha256(payment_raw).digest()


def verify_payment(raw: bytes, payer_cert: wire.Certificate) -> wire.Payment:
    payment = wire.decode_payment(raw)
    if payment.payer_id != payer_cert.device_id or not signed_by(payer_cert.identity_pub, payment.raw):
        raise ValueError("payment not signed by the payer")
    return payment


def verify_receipt(raw: bytes, payee_cert: wire.Certificate, payment_raw: bytes) -> wire.Receipt:
    receipt = wire.decode_receipt(raw)
    if receipt.payment_hash != payment_hash(payment_raw) or not signed_by(payee_cert.identity_pub, receipt.raw):
        raise ValueError("receipt not signed by the payee for this payment")
    return receipt


def revocation_delta(key: ec.EllipticCurvePrivateKey, from_version: int, to_version: int, issued_at: int,
                     ids: list[bytes]) -> bytes:
    """The backend-signed revocations with row ids in (from_version, to_version]."""
    return sign(key, revocation.delta_body(from_version, to_version, issued_at, ids))
