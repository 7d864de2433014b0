# Framing: protocol messages <-> BLE GATT frames (one ATT write or notification each), see docs/framing.md.
# Pure logic with no hardware imports: used by the payer (central), the payee (peripheral) and CPython tools.
#
#   frame 0:  [b0][idx=0][len_hi][len_lo][data ...]      b0: bit 7 LAST, bit 6 reserved (0),
#   frame k:  [b0][idx=k][data ...]                          bits 5..0 message sequence number mod 64
#
# Every frame except the last of a message has the same length (the frame size, ATT_MTU - 3); the receiver
# takes it from frame 0, so a frame truncated by the BLE stack is caught on arrival.
try:
    from micropython import const
except ImportError:  # CPython host tools

    def const(x):
        return x


MAX_MESSAGE = const(4096)  # hard limit on one message; 16 + 255 * 18 = 4606 still fits 256 frames of 20 bytes
MIN_FRAME = const(20)  # ATT_MTU 23 (the default) - 3
MAX_FRAME = const(514)  # ATT_MTU 517 (the maximum) - 3
HEADER = const(2)  # bytes of header in every frame
FIRST_HEADER = const(4)  # header plus the 2-byte message length, in frame 0
SEQ_MOD = const(64)  # sequence numbers travel mod 64

_LAST = const(0x80)
_RESERVED = const(0x40)
_SEQ = const(0x3F)

# FrameError reasons
BAD_HEADER = "bad_header"  # frame shorter than its header, reserved bit set, frame 0 declaring length 0
OVERSIZE = "oversize"  # declared length above max_message, or a frame longer than MAX_FRAME
STALE_SEQ = "stale_seq"  # frame of an earlier message (sequence 1..32 behind the expected one)
FUTURE_SEQ = "future_seq"  # frame of a later message (sequence 1..31 ahead)
NO_FIRST = "no_first"  # frame k > 0 with no message in progress: frame 0 was lost
DUPLICATE = "duplicate"  # frame index already received for this message
OUT_OF_ORDER = "out_of_order"  # frame index skips ahead: a frame was lost or reordered
TRUNCATED = "truncated"  # non-last frame shorter than the frame size, or the message ends short of its length
OVERRUN = "overrun"  # frame longer than the frame size, or more data than the declared length


class FrameError(ValueError):
    """A frame that does not continue the expected message; reason is one of the codes above."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


def frame_count(length, frame_size):
    """Frames split() makes for a message of `length` bytes: ceil((length + 2) / (frame_size - 2))."""
    _check(length, frame_size, 0)
    return (length + frame_size - 1) // (frame_size - HEADER)


def _check(length, frame_size, msg_seq):
    if not MIN_FRAME <= frame_size <= MAX_FRAME:
        raise ValueError("frame_size out of range")
    if not 0 < length <= MAX_MESSAGE:
        raise ValueError("message length out of range")
    if msg_seq < 0:
        raise ValueError("negative msg_seq")


def iter_frames(message, frame_size, msg_seq, buf=None):
    """Yield the frames of `message` one at a time, as memoryviews of one reused buffer.

    Arguments are checked now (ValueError); each frame is valid only until the next one is drawn, so send it
    (or copy it) before asking for the next. buf, if given, is a bytearray of at least frame_size bytes.
    """
    _check(len(message), frame_size, msg_seq)
    if buf is None:
        buf = bytearray(frame_size)
    elif len(buf) < frame_size:
        raise ValueError("buffer smaller than frame_size")
    return _frames(memoryview(message), frame_size, msg_seq & _SEQ, memoryview(buf))


def _frames(msg, frame_size, seq, buf):
    n = len(msg)
    buf[2] = n >> 8
    buf[3] = n & 0xFF
    pos = 0
    idx = 0
    hdr = FIRST_HEADER
    while True:
        take = frame_size - hdr
        if take >= n - pos:
            take = n - pos
            buf[0] = seq | _LAST
        else:
            buf[0] = seq
        buf[1] = idx
        buf[hdr : hdr + take] = msg[pos : pos + take]
        pos += take
        yield buf[: hdr + take]
        if pos >= n:
            return
        idx += 1
        hdr = HEADER


def split(message, frame_size, msg_seq):
    """The frames of `message` as a list of bytes, none longer than frame_size (= ATT_MTU - 3, 20..514).

    msg_seq is the number of messages sent before this one in this direction of the session (0, 1, 2, ...).
    """
    return [bytes(f) for f in iter_frames(message, frame_size, msg_seq)]


class Reassembler:
    """Rebuilds messages from frames, strictly in order, into one preallocated buffer of max_message bytes.

    feed() returns the complete message (bytes) when its last frame arrives, else None, and raises FrameError
    for any frame that does not continue the expected message exactly. After a FrameError the partial message
    is dropped and expected_seq is unchanged: only frame 0 of message expected_seq is accepted next.
    """

    def __init__(self, max_message=MAX_MESSAGE):
        if not 0 < max_message <= MAX_MESSAGE:
            raise ValueError("max_message out of range")
        self.max_message = max_message
        self._mv = memoryview(bytearray(max_message))
        self.expected_seq = 0  # messages completed so far; the next message must carry this (mod 64)
        self._total = 0  # declared length of the message in progress; 0 when none is
        self._pos = 0  # bytes of it received
        self._next = 0  # index of the frame expected next
        self._fsize = 0  # frame size, from frame 0

    @property
    def in_progress(self):
        return self._total != 0

    def reset(self, expected_seq=None):
        """Drop any partial message; with expected_seq, also restart the count (a new session: 0)."""
        self._total = 0
        if expected_seq is not None:
            self.expected_seq = expected_seq

    def _fail(self, reason):
        self._total = 0
        raise FrameError(reason)

    def feed(self, frame):
        n = len(frame)
        if n < HEADER:
            self._fail(BAD_HEADER)
        if n > MAX_FRAME:
            self._fail(OVERSIZE)
        b0 = frame[0]
        if b0 & _RESERVED:
            self._fail(BAD_HEADER)
        d = ((b0 & _SEQ) - self.expected_seq) & _SEQ
        if d:
            self._fail(FUTURE_SEQ if d < SEQ_MOD // 2 else STALE_SEQ)
        last = b0 & _LAST
        idx = frame[1]
        if idx == 0:
            if self._total:
                self._fail(DUPLICATE)
            if n < FIRST_HEADER:
                self._fail(BAD_HEADER)
            total = frame[2] << 8 | frame[3]
            if total == 0:
                self._fail(BAD_HEADER)
            if total > self.max_message:
                self._fail(OVERSIZE)
            hdr = FIRST_HEADER
            pos = 0
            data = n - FIRST_HEADER
            if last:
                if data < total:
                    self._fail(TRUNCATED)
                if data > total:
                    self._fail(OVERRUN)
            else:
                if n < MIN_FRAME:
                    self._fail(TRUNCATED)
                if data >= total:
                    self._fail(OVERRUN)
                self._fsize = n
        else:
            total = self._total
            if not total:
                self._fail(NO_FIRST)
            if idx != self._next:
                self._fail(DUPLICATE if idx < self._next else OUT_OF_ORDER)
            hdr = HEADER
            pos = self._pos
            data = n - HEADER
            rem = total - pos
            if n > self._fsize or data > rem:
                self._fail(OVERRUN)
            if last:
                if data < rem:
                    self._fail(TRUNCATED)
            else:
                if n < self._fsize:
                    self._fail(TRUNCATED)
                if data == rem:
                    self._fail(OVERRUN)
        end = pos + data
        self._mv[pos:end] = memoryview(frame)[hdr:n]
        if last:
            self._total = 0
            self.expected_seq += 1
            return bytes(self._mv[:end])
        self._total = total
        self._pos = end
        self._next = idx + 1
        return None
