# The backend's revocation list on a device (docs/protocol.md section 6): the signed delta that carries it and the
# file it is kept in. Loaded only where a device has a list or syncs (paytoken.trust, wallet_sync): the payment
# path of a device without one carries none of it. The backend builds deltas with the same code under CPython.
#
# Delta: type 'R' (wire.T_REVOCATION), version 2, from_version u32, to_version u32, issued_at u32, count u16, device
# ids (8 each, strictly ascending), signature 64. Exactly the revocations whose backend row id is in
# (from_version, to_version]: a device holding version from_version applies it and then holds to_version. Row ids
# may have gaps, so count is 1 to to_version - from_version, and at most MAX_DELTA (a device holds the whole
# delta in RAM).
import os
import struct
from collections import namedtuple

from paytoken import wire

try:
    from micropython import const
except ImportError:  # CPython: the backend and host tools
    def const(x):
        return x


VERSION = const(2)
MAX_DELTA = const(255)
_RL_HEAD = ">BBIIIH"
_RL_HEAD_LEN = struct.calcsize(_RL_HEAD)

# ids: the count device ids as one bytes object (8 bytes each): a device holds no object per id.
Delta = namedtuple("Delta", ("from_version", "to_version", "issued_at", "ids", "raw"))


def delta_length(count):
    return _RL_HEAD_LEN + count * wire.ID_LEN + wire.SIG_LEN


def _check_delta(from_version, to_version, count):
    if not 0 <= from_version < to_version <= 0xFFFFFFFF:
        raise wire.WireError("revocation delta: versions must ascend")
    if not 1 <= count <= min(MAX_DELTA, to_version - from_version):
        raise wire.WireError("revocation delta: bad count")


def delta_body(from_version, to_version, issued_at, device_ids):
    ids = sorted(set(bytes(i) for i in device_ids))
    for i in ids:
        if len(i) != wire.ID_LEN:
            raise wire.WireError("revocation delta: bad device id")
    _check_delta(from_version, to_version, len(ids))
    return struct.pack(_RL_HEAD, wire.T_REVOCATION, VERSION, from_version, to_version, issued_at,
                       len(ids)) + b"".join(ids)


def decode_delta(data):
    data = bytes(data)
    wire._check_header(data, wire.T_REVOCATION, "revocation delta", VERSION)
    if len(data) < _RL_HEAD_LEN:
        raise wire.WireError("revocation delta: wrong length")
    _, _, from_version, to_version, issued_at, count = struct.unpack_from(_RL_HEAD, data, 0)
    wire._check_len(data, delta_length(count), "revocation delta")
    _check_delta(from_version, to_version, count)
    end = _RL_HEAD_LEN + count * wire.ID_LEN
    for o in range(_RL_HEAD_LEN + wire.ID_LEN, end, wire.ID_LEN):
        if data[o:o + wire.ID_LEN] <= data[o - wire.ID_LEN:o]:
            raise wire.WireError("revocation delta: ids not strictly ascending")
    return Delta(from_version, to_version, issued_at, data[_RL_HEAD_LEN:end], data)


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
