# What a device trusts offline: the issuer's key (certificates), the backend's key (revocation lists) and
# its best knowledge of the time. Every check raises reasons.Refused with the code the other side is told.
from hashlib import sha256

from paytoken import reasons, wire
from paytoken.crypto import p256
from paytoken.reasons import Refused


def key_id(pub):
    # Short name of a P-256 public key, as certificates carry it: SHA-256 of the SEC1 encoding, 4 bytes.
    return sha256(pub).digest()[:wire.KEY_ID_LEN]


def signed_by(pub, raw):
    return p256.verify(pub, wire.signed_part(raw), wire.signature(raw))


class Trust:
    def __init__(self, issuer_pub, backend_pub=None, now=None):
        self.issuer_pub = issuer_pub
        self.issuer_key_id = key_id(issuer_pub)
        self.backend_pub = backend_pub
        self.now = now  # unix seconds, or None when the device has never learnt the time
        self.revocation_version = 0
        self._revoked = ()

    def check_cert(self, raw, role):
        # The decoded certificate if it chains to our issuer, is valid now, holds the role and is not
        # revoked; the checks run in that order.
        try:
            cert = wire.decode_cert(raw)
        except ValueError as e:
            raise Refused(reasons.FORMAT, str(e))
        if cert.issuer_key_id != self.issuer_key_id:
            raise Refused(reasons.CERT_ISSUER)
        if not signed_by(self.issuer_pub, cert.raw):
            raise Refused(reasons.CERT_INVALID)
        now = self.now
        if now is not None and not cert.not_before <= now <= cert.not_after:
            raise Refused(reasons.CERT_EXPIRED)
        if not cert.role & role:
            raise Refused(reasons.ROLE)
        if self.is_revoked(cert.device_id):
            raise Refused(reasons.REVOKED)
        return cert

    def is_revoked(self, device_id):
        return device_id in self._revoked

    def apply_revocation(self, raw):
        # Install a backend-signed revocation list if it is newer than ours; a relay cannot roll it back.
        if self.backend_pub is None:
            raise Refused(reasons.CERT_INVALID, "no backend key")
        try:
            rl = wire.decode_revocation(raw)
        except ValueError as e:
            raise Refused(reasons.FORMAT, str(e))
        if not signed_by(self.backend_pub, rl.raw):
            raise Refused(reasons.SIGNATURE, "revocation list")
        if rl.list_version <= self.revocation_version:
            return False
        self.revocation_version = rl.list_version
        self._revoked = set(rl.device_ids)
        return True


def payment_hash(payment_raw):
    return sha256(payment_raw).digest()
