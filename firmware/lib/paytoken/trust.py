# What a device trusts offline: the issuer's key (certificates), the backend's key (revocation lists) and
# its best knowledge of the time. Every check raises reasons.Refused with the code the other side is told.
import os
import struct
from hashlib import sha256

from paytoken import reasons, wire
from paytoken.crypto import p256
from paytoken.reasons import Refused


def key_id(pub):
    # Short name of a P-256 public key, as certificates carry it: SHA-256 of the SEC1 encoding, 4 bytes.
    return sha256(pub).digest()[:wire.KEY_ID_LEN]


def signed_by(pub, raw):
    return p256.verify(pub, wire.signed_part(raw), wire.signature(raw))


class RevokedIds:
    # The backend's revocation list in a file: version u32, then the revoked device ids, 8 bytes each, strictly
    # ascending. Looked up by binary search in the file and merged with a delta into a new file: the list is
    # never in RAM, however long it grows.
    def __init__(self, path):
        self.path = path
        self.version = 0
        self.count = 0
        try:
            size = os.stat(path)[6]
            with open(path, "rb") as f:
                head = f.read(4)
        except OSError:
            return  # no list yet
        if len(head) != 4 or (size - 4) % wire.ID_LEN:
            return  # damaged: held as empty at version 0, so the backend sends the whole list again
        self.version = struct.unpack(">I", head)[0]
        self.count = (size - 4) // wire.ID_LEN

    def __contains__(self, device_id):
        lo, hi = 0, self.count
        if not hi:
            return False
        device_id = bytes(device_id)
        with open(self.path, "rb") as f:
            while lo < hi:
                mid = (lo + hi) // 2
                f.seek(4 + mid * wire.ID_LEN)
                d = f.read(wire.ID_LEN)
                if d == device_id:
                    return True
                if d < device_id:
                    lo = mid + 1
                else:
                    hi = mid
        return False

    def merge(self, version, ids):
        # The list with `ids` (8 bytes each, ascending, in one bytes object) added, as `version`: streamed into
        # <path>.new, which then replaces the file, so a power cut leaves either the old list and version or the
        # new ones, never a mix.
        tmp = self.path + ".new"
        left = self.count
        n = 0
        old = open(self.path, "rb") if left else None
        try:
            with open(tmp, "wb") as out:
                out.write(struct.pack(">I", version))
                if old:
                    old.seek(4)
                cur = old.read(wire.ID_LEN) if left else None
                for o in range(0, len(ids), wire.ID_LEN):
                    d = ids[o:o + wire.ID_LEN]
                    while cur is not None and cur <= d:
                        if cur != d:  # an id listed already is written once, below
                            out.write(cur)
                            n += 1
                        left -= 1
                        cur = old.read(wire.ID_LEN) if left else None
                    out.write(d)
                    n += 1
                while cur is not None:
                    out.write(cur)
                    n += 1
                    left -= 1
                    cur = old.read(wire.ID_LEN) if left else None
        finally:
            if old:
                old.close()
        os.rename(tmp, self.path)
        self.version, self.count = version, n


class Trust:
    def __init__(self, issuer_pub, backend_pub=None, now=None, revoked=None):
        self.issuer_pub = issuer_pub
        self.issuer_key_id = key_id(issuer_pub)
        self.backend_pub = backend_pub
        self.now = now  # unix seconds, or None when the device has never learnt the time
        self.revoked = revoked  # RevokedIds: the wallet gives it its file; None: no list, nobody revoked

    @property
    def revocation_version(self):
        return self.revoked.version if self.revoked else 0

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
        return self.revoked is not None and device_id in self.revoked

    def apply_revocation(self, raw):
        # Adds a backend-signed revocation delta that starts at the version we hold; any other (applied already,
        # rolled back, or after a gap) changes nothing and gives False. Versions only increase: a relay can
        # withhold deltas but neither forge one nor roll the list back.
        if self.backend_pub is None:
            raise Refused(reasons.CERT_INVALID, "no backend key")
        if self.revoked is None:
            raise Refused(reasons.FORMAT, "no revocation list file")
        try:
            rl = wire.decode_revocation(raw)
        except ValueError as e:
            raise Refused(reasons.FORMAT, str(e))
        if not signed_by(self.backend_pub, rl.raw):
            raise Refused(reasons.SIGNATURE, "revocation list")
        if rl.from_version != self.revoked.version:
            return False
        self.revoked.merge(rl.to_version, rl.ids)
        return True


def payment_hash(payment_raw):
    return sha256(payment_raw).digest()
