# The USB serial frame (docs/protocol.md §11): one definition for the device and the host station.
#
#   0  2  magic b"PT"
#   2  1  version (1)
#   3  1  type: a request 0x01-0x7f; its response type | 0x80; 0xff: "your frame was bad"
#   4  2  payload length n, big-endian, at most MAX_PAYLOAD
#   6  n  payload (a response: status u8, then the body; status 0 is OK, else an error code and a message)
#   6+n 4 CRC-32 (IEEE, binascii.crc32) of bytes 2 .. 6+n, big-endian
#
#   encode(type, payload) -> bytes                   a whole frame
#   read_frame(port, idle_ms, byte_ms) -> (type, payload) | None   None: nothing came within idle_ms
#       port.read(n, ms) gives 1..n bytes, or b"" when none came within ms (-1: wait for ever)
#   FrameError(reason)                               a frame that is not one; .reason is a short word
from binascii import crc32

try:
    from micropython import const
except ImportError:  # CPython: the host station imports this module too
    def const(x):
        return x

MAGIC = b"PT"
VERSION = const(1)
HEADER = const(6)
MAX_PAYLOAD = const(4096)  # a sealed sync message 1 of four records is about 2 KB
RESPONSE = const(0x80)
T_BAD_FRAME = const(0xFF)

# Requests (the response is type | RESPONSE). 0x01-0x0f provisioning (paytoken.provisioning);
# 0x10-0x1f sync over USB (paytoken.sync_usb).
T_IDENTIFY = const(0x01)
T_KEYS = const(0x02)
T_INSTALL = const(0x03)
T_VOUCHER = const(0x04)
T_FINALISE = const(0x05)
T_SYNC_PULL = const(0x10)
T_SYNC_PUSH = const(0x11)
T_SYNC_STATUS = const(0x12)

# Response status codes
OK = const(0)
E_FRAME = const(1)  # the request frame was bad (type T_BAD_FRAME)
E_UNKNOWN = const(2)  # no handler for this request type
E_REQUEST = const(3)  # malformed request payload
E_STATE = const(4)  # not now: a step before this one is missing
E_LOCKED = const(5)  # the device is finalised: provisioning is over
E_REFUSED = const(6)  # a certificate, key or voucher that does not check
E_DEVICE = const(7)  # the device failed (storage)
E_BUSY = const(8)  # a payment is under way: ask again after it
E_SYNC = const(9)  # the backend refused the device's sync (final for this sync; the message says why)

ERRORS = {E_FRAME: "bad frame", E_UNKNOWN: "unknown request", E_REQUEST: "bad request", E_STATE: "wrong state",
          E_LOCKED: "locked", E_REFUSED: "refused", E_DEVICE: "device error", E_BUSY: "busy", E_SYNC: "sync refused"}


POP_LABEL = b"paytoken/provisioning/pop/v1"


def pop_message(challenge, device_id, role, identity_pub, x25519_pub):
    # What a device signs in answer to T_KEYS to prove it holds the identity key it just made: a domain label,
    # the station's challenge, the id and role it is made for, its public keys (x25519_pub b"" for a payer).
    return POP_LABEL + challenge + device_id + bytes((role,)) + identity_pub + x25519_pub


class FrameError(ValueError):
    def __init__(self, reason):
        super().__init__("frame: " + reason)
        self.reason = reason


def _crc(data):
    return (crc32(data) & 0xFFFFFFFF).to_bytes(4, "big")


def encode(ftype, payload=b""):
    n = len(payload)
    if n > MAX_PAYLOAD:
        raise FrameError("too long")
    if not 0 < ftype <= 0xFF:
        raise FrameError("type")
    body = bytearray(HEADER + n)
    body[0:2] = MAGIC
    body[2] = VERSION
    body[3] = ftype
    body[4] = n >> 8
    body[5] = n & 0xFF
    body[HEADER:] = payload
    return bytes(body) + _crc(memoryview(body)[2:])


def _exact(port, n, ms):
    buf = bytearray()
    while len(buf) < n:
        got = port.read(n - len(buf), ms)
        if not got:
            raise FrameError("truncated")
        buf += got
    return buf


def read_frame(port, idle_ms=-1, byte_ms=1000):
    # Skips bytes until the magic, then reads one whole frame; every byte after the first must come within
    # byte_ms of the previous read, else FrameError("truncated") (a sender that went away mid-frame).
    b = port.read(1, idle_ms)
    if not b:
        return None
    while True:
        while b[0] != MAGIC[0]:
            b = _exact(port, 1, byte_ms)
        b = _exact(port, 1, byte_ms)
        if b[0] == MAGIC[1]:
            break
    head = _exact(port, HEADER - 2, byte_ms)
    if head[0] != VERSION:
        raise FrameError("version %d" % head[0])
    n = (head[2] << 8) | head[3]
    if n > MAX_PAYLOAD:
        raise FrameError("too long")
    rest = _exact(port, n + 4, byte_ms)
    mv = memoryview(rest)
    if _crc(head + mv[:n]) != bytes(mv[n:]):
        raise FrameError("crc")
    return head[1], bytes(mv[:n])


def decode(frame):
    # One whole frame held in memory -> (type, payload); strict: exactly one frame, nothing more.
    class _Buf:
        def __init__(self, data):
            self.data = data
            self.off = 0

        def read(self, n, ms):
            out = self.data[self.off:self.off + n]
            self.off += len(out)
            return out

    src = _Buf(bytes(frame))
    got = read_frame(src, 0, 0)
    if got is None or src.off != len(src.data) or frame[:2] != MAGIC:
        raise FrameError("not exactly one frame")
    return got


def response(ftype, status, body=b""):
    return encode(ftype | RESPONSE if ftype != T_BAD_FRAME else T_BAD_FRAME, bytes((status,)) + body)
