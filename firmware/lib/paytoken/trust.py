# What a device trusts offline: the issuer's key (certificates), the backend's key (revocation lists) and
# its best knowledge of the time. Every check raises reasons.Refused with the code the other side is told.
import os
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
    def __init__(self, issuer_pub, backend_pub=None, now=None, revoked_path=None):
        self.issuer_pub = issuer_pub
        self.issuer_key_id = key_id(issuer_pub)
        self.backend_pub = backend_pub
        self.now = now  # unix seconds, or None when the device has never learnt the time
        self.revoked_path = revoked_path  # the revocation list's file (the wallet gives it); None: nobody revoked
        self._revoked = None

    @property
    def revoked(self):
        # The list (paytoken.revocation.RevokedIds), opened on first use: the payment path of a device without a list
        # never loads its code
        if self._revoked is None and self.revoked_path is not None:
            from paytoken.revocation import RevokedIds

            self._revoked = RevokedIds(self.revoked_path)
        return self._revoked

    @revoked.setter
    def revoked(self, value):
        self._revoked = value  # None: read the file again on next use (as after a restart)

    @property
    def revocation_version(self):
        r = self.revoked
        return r.version if r else 0

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
        if self._revoked is None and not _exists(self.revoked_path):
            return False  # no list yet: nothing of it loaded
        return device_id in self.revoked

    def apply_revocation(self, raw):
        # Adds a backend-signed revocation delta that starts at the version we hold; any other (applied already,
        # rolled back, or after a gap) changes nothing and gives False. Versions only increase: a relay can
        # withhold deltas but neither forge one nor roll the list back.
        if self.backend_pub is None:
            raise Refused(reasons.CERT_INVALID, "no backend key")
        if self.revoked_path is None:
            raise Refused(reasons.FORMAT, "no revocation list file")
        try:
            from paytoken.revocation import decode_delta

            rl = decode_delta(raw)
        except ValueError as e:
            raise Refused(reasons.FORMAT, str(e))
        if not signed_by(self.backend_pub, rl.raw):
            raise Refused(reasons.SIGNATURE, "revocation list")
        if rl.from_version != self.revoked.version:
            return False
        self.revoked.merge(rl.to_version, rl.ids)
        return True


def _exists(path):
    if path is None:
        return False
    try:
        os.stat(path)
        return True
    except OSError:
        return False


def payment_hash(payment_raw):
    return sha256(payment_raw).digest()
