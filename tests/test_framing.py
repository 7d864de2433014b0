"""BLE framing (paytoken.framing): messages <-> GATT frames of at most ATT_MTU - 3 bytes.

On MicroPython: round trips of every message size 1..MAX_MESSAGE at several frame sizes, every FrameError
reason, recovery after an error, argument checks and a RAM budget. Under CPython (the same module, as host
tools import it) with hypothesis: adversarial frame streams give back exactly the original messages or
FrameError, nothing else.

Overhead of the format: 2 header bytes per frame plus 2 length bytes per message, so a message of L bytes
takes ceil((L + 2) / (frame_size - 2)) frames and L + 2 * frames + 2 bytes; every frame but the last is
full, so no split into fewer frames exists for this header.
"""

from __future__ import annotations

import importlib
import math
import sys
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.harness.mp import MicroPythonError, run_script

sys.path.append(str(Path(__file__).resolve().parents[1] / "firmware" / "lib"))
fr = importlib.import_module("paytoken.framing")  # the firmware module, imported by CPython

SPLIT = "paytoken.framing.split"
REASONS = {
    "bad_header",
    "oversize",
    "stale_seq",
    "future_seq",
    "no_first",
    "duplicate",
    "out_of_order",
    "truncated",
    "overrun",
}
FRAME_SIZES = [20, 21, 23, 182, 244, 514]  # 20 = ATT_MTU 23 - 3 (default); 244 = MTU 247; 514 = MTU 517


def expected_frames(length: int, frame_size: int) -> int:
    return math.ceil((length + 2) / (frame_size - 2))


# --- MicroPython side -----------------------------------------------------------------------------------

MP_HELPERS = """
from binascii import unhexlify as _fr_unhex
from paytoken import framing as _fr

def _fr_sweep(fs):
    pool = bytes(range(256)) * 17
    r = _fr.Reassembler()
    counts = []
    air = []
    bad = []
    maxlen = 0
    short = 0
    for n in range(1, _fr.MAX_MESSAGE + 1):
        m = pool[n % 251 : n % 251 + n]
        frames = _fr.split(m, fs, r.expected_seq)
        out = None
        for i, f in enumerate(frames):
            if out is not None:
                bad.append(n)
            maxlen = max(maxlen, len(f))
            if i < len(frames) - 1 and len(f) != fs:
                short += 1
            out = r.feed(f)
        if out != m or _fr.frame_count(n, fs) != len(frames):
            bad.append(n)
        counts.append(len(frames))
        air.append(sum(len(f) for f in frames))
    return {"counts": counts, "air": air, "bad": bad, "maxlen": maxlen, "short": short,
            "seq": r.expected_seq, "busy": r.in_progress}

def _fr_feed(max_message, start_seq, hexes, kind):
    r = _fr.Reassembler(max_message)
    r.reset(start_seq)
    out = []
    for h in hexes:
        f = _fr_unhex(h)
        if kind == "memoryview":
            f = memoryview(f)
        elif kind == "bytearray":
            f = bytearray(f)
        try:
            out.append(r.feed(f))
        except _fr.FrameError as e:
            out.append([e.reason, isinstance(e, ValueError), r.in_progress])
    return {"out": out, "seq": r.expected_seq, "busy": r.in_progress}
"""


@pytest.fixture(scope="module")
def mpf(mp):
    mp.exec(MP_HELPERS)
    return mp


def mp_feed(mp, frames, max_message=fr.MAX_MESSAGE, start_seq=0, kind="bytes"):
    """Feed frames to a fresh Reassembler on MicroPython: (outcomes, expected_seq, in_progress).

    Each outcome is None, the returned message (bytes) or the FrameError reason (str).
    """
    hexes = [bytes(f).hex() for f in frames]
    res = mp.eval(f"_fr_feed({max_message}, {start_seq}, {hexes!r}, {kind!r})")
    outcomes = []
    for o in res["out"]:
        if isinstance(o, list):
            reason, is_value_error, busy = o
            assert is_value_error and not busy, o  # FrameError is a ValueError and drops the partial message
            outcomes.append(reason)
        else:
            outcomes.append(o)
    return outcomes, res["seq"], res["busy"]


@pytest.mark.parametrize("frame_size", FRAME_SIZES)
def test_round_trip_every_size(mpf, frame_size):
    res = mpf.eval(f"_fr_sweep({frame_size})")
    assert res["bad"] == []
    assert res["maxlen"] == frame_size  # never above frame_size, and frames are filled
    assert res["short"] == 0  # every frame but the last of a message is exactly frame_size
    sizes = range(1, fr.MAX_MESSAGE + 1)
    assert res["counts"] == [expected_frames(n, frame_size) for n in sizes]
    assert res["air"] == [n + 2 * c + 2 for n, c in zip(sizes, res["counts"], strict=True)]
    assert res["seq"] == fr.MAX_MESSAGE and not res["busy"]  # one message each, through 64 wraps of seq


def test_overhead_figures(mpf):
    # The figures quoted in docs/framing.md: a 250-byte message.
    at20 = mpf.call(SPLIT, bytes(250), 20, 0)
    at244 = mpf.call(SPLIT, bytes(250), 244, 0)
    assert (len(at20), sum(map(len, at20))) == (14, 280)
    assert (len(at244), sum(map(len, at244))) == (2, 256)
    assert [len(f) for f in at244] == [244, 12]
    # 4096 bytes at the default MTU: 228 frames, fewer than the 256 the 1-byte frame index allows.
    assert mpf.call("paytoken.framing.frame_count", fr.MAX_MESSAGE, fr.MIN_FRAME) == 228


def test_frames_identical_on_micropython_and_cpython(mpf):
    cases = []
    for i, n in enumerate([1, 2, 15, 16, 17, 33, 34, 35, 240, 241, 511, 512, 1000, 4095, 4096]):
        fs = FRAME_SIZES[i % len(FRAME_SIZES)]
        cases.append((bytes((n * 7 + k) & 0xFF for k in range(n)), fs, i * 37))
    for (msg, fs, seq), (ok, frames) in zip(cases, mpf.map(SPLIT, cases), strict=True):
        assert ok, frames
        assert frames == fr.split(msg, fs, seq)
        assert frames[0][0] & 0x3F == seq % 64 and frames[-1][0] & 0x80


@pytest.mark.parametrize(
    "args",
    [(b"", 20, 0), (bytes(4097), 20, 0), (b"x", 19, 0), (b"x", 515, 0), (b"x", 0, 0), (b"x", 20, -1)],
    ids=["empty", "oversize", "frame19", "frame515", "frame0", "negative_seq"],
)
def test_split_rejects_bad_arguments(mpf, args):
    with pytest.raises(MicroPythonError) as exc:
        mpf.call(SPLIT, *args)
    assert exc.value.kind == "ValueError"


@pytest.mark.parametrize("max_message", [0, -1, fr.MAX_MESSAGE + 1])
def test_reassembler_rejects_bad_limit(mpf, max_message):
    with pytest.raises(MicroPythonError) as exc:
        mpf.call("paytoken.framing.Reassembler", max_message)
    assert exc.value.kind == "ValueError"


A = bytes(range(50))  # at frame size 20: 3 frames of 20, 20, 18 bytes (16 + 18 + 16 data bytes)
B = bytes(range(100, 130))  # the message after A: 2 frames
S = b"0123456789"  # one frame of 14 bytes
F = bytes(range(34))  # 2 frames, both full (16 + 18 data bytes)


def flip(frame, byte, mask):
    f = bytearray(frame)
    f[byte] ^= mask
    return bytes(f)


def with_len(frame, n):
    return frame[:2] + n.to_bytes(2, "big") + frame[4:]


class Frames:
    """Frames made by split on MicroPython, for the failure scenarios."""

    def __init__(self, mp):
        def sp(m, fs, seq):
            return mp.call(SPLIT, m, fs, seq)

        self.a, self.b, self.s, self.f = sp(A, 20, 0), sp(B, 20, 1), sp(S, 20, 0), sp(F, 20, 0)
        self.s8, self.s71 = sp(S, 20, 8), sp(S, 20, 71)
        self.c = sp(bytes(300), 244, 0)  # 244 + 62 bytes
        self.d = sp(bytes(100), 40, 0)  # 40 + 40 + 28 bytes
        self.e = sp(bytes(600), 514, 0)  # 514 + 92 bytes
        self.o = sp(bytes(101), 20, 0)


# id: (frames, expected outcomes, max_message, start_seq); outcomes are None, the message or the reason.
SCENARIOS = {
    "empty_frame": lambda x: ([b""], ["bad_header"]),
    "one_byte_frame": lambda x: ([b"\x80"], ["bad_header"]),
    "reserved_bit": lambda x: ([flip(x.a[0], 0, 0x40)], ["bad_header"]),
    "first_frame_without_length": lambda x: ([b"\x80\x00\x00"], ["bad_header"]),
    "declared_length_zero": lambda x: ([b"\x80\x00\x00\x00"], ["bad_header"]),
    "garbage_mid_message": lambda x: (
        [x.a[0], b"\x00", *x.a[1:]],
        [None, "bad_header", "no_first", "no_first"],
    ),
    "declared_above_max_message": lambda x: ([with_len(x.a[0], fr.MAX_MESSAGE + 1)], ["oversize"]),
    "declared_above_own_limit": lambda x: (x.o[:1], ["oversize"], 100, 0),
    "frame_above_514": lambda x: ([x.e[0] + b"\x00"], ["oversize"]),
    "repeated_first_frame": lambda x: ([x.a[0]] * 2, [None, "duplicate"]),
    "repeated_middle_frame": lambda x: (_pick(x.a, 0, 1, 1, 2), [None, None, "duplicate", "no_first"]),
    "first_frame_again": lambda x: (_pick(x.a, 0, 1, 0), [None, None, "duplicate"]),
    "swapped_frames": lambda x: (_pick(x.a, 0, 2, 1), [None, "out_of_order", "no_first"]),
    "lost_middle_frame": lambda x: (_pick(x.a, 0, 2), [None, "out_of_order"]),
    "lost_first_frame": lambda x: (_pick(x.a, 1, 2), ["no_first", "no_first"]),
    "only_last_frame": lambda x: (_pick(x.a, 2), ["no_first"]),
    "replayed_last_frame": lambda x: (_pick(x.a, 0, 1, 2, 2), [None, None, A, "stale_seq"]),
    "replayed_message": lambda x: (x.a * 2, [None, None, A, *["stale_seq"] * 3]),
    "seq_32_behind": lambda x: (x.s8, ["stale_seq"], fr.MAX_MESSAGE, 40),
    "next_message_first": lambda x: (x.b, ["future_seq", "future_seq"]),
    "next_message_then_this_one": lambda x: (x.b + x.a, ["future_seq", "future_seq", None, None, A]),
    "spliced_with_next_message": lambda x: ([x.a[0], x.b[1]], [None, "future_seq"]),
    "seq_31_ahead": lambda x: (x.s71, ["future_seq"], fr.MAX_MESSAGE, 40),
    "short_middle_frame": lambda x: ([x.a[0], x.a[1][:-1]], [None, "truncated"]),
    "short_last_frame": lambda x: ([x.a[0], x.a[1], x.a[2][:-1]], [None, None, "truncated"]),
    "short_single_frame": lambda x: ([x.s[0][:-1]], ["truncated"]),
    "first_frame_under_20": lambda x: ([x.a[0][:19]], ["truncated"]),
    "stack_cut_frames_to_20": lambda x: ([f[:20] for f in x.c], [None, "truncated"]),
    "last_bit_on_middle_frame": lambda x: ([x.a[0], flip(x.a[1], 0, 0x80)], [None, "truncated"]),
    "declared_longer": lambda x: ([with_len(x.s[0], 11)], ["truncated"]),
    "long_middle_frame": lambda x: ([x.a[0], x.a[1] + b"\x00"], [None, "overrun"]),
    "long_single_frame": lambda x: ([x.s[0] + b"\x00"], ["overrun"]),
    "last_bit_cleared": lambda x: ([x.f[0], flip(x.f[1], 0, 0x80)], [None, "overrun"]),
    "first_frame_cut": lambda x: ([x.d[0][:30], x.d[1]], [None, "overrun"]),
    "declared_shorter": lambda x: ([with_len(x.s[0], 9)], ["overrun"]),
    "first_frame_fills_declared": lambda x: ([with_len(x.a[0], 16)], ["overrun"]),
}


def _pick(frames, *idx):
    return [frames[i] for i in idx]


@pytest.fixture(scope="module")
def frames(mpf):
    return Frames(mpf)


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_frame_errors_and_recovery(mpf, frames, name):
    """Each failure kind raises FrameError(reason); the reassembler then takes the next valid message."""
    bad, expected, *rest = SCENARIOS[name](frames)
    max_message, start = rest or (fr.MAX_MESSAGE, 0)
    completed = sum(isinstance(e, bytes) for e in expected)
    fresh = bytes(range(140, 200))  # 4 frames at 20
    fresh_frames = mpf.call(SPLIT, fresh, 20, start + completed)
    outcomes, seq, busy = mp_feed(mpf, bad + fresh_frames, max_message, start)
    assert outcomes[: len(bad)] == expected
    assert outcomes[len(bad) :] == [None] * (len(fresh_frames) - 1) + [fresh]
    assert seq == start + completed + 1 and not busy


def test_error_keeps_expected_seq(mpf):
    """After an error mid-message, the same message sent again from frame 0 is accepted."""
    frames = mpf.call(SPLIT, bytes(range(50)), 20, 5)
    outcomes, seq, _ = mp_feed(mpf, [frames[0], frames[2], *frames], start_seq=5)
    assert outcomes == [None, "out_of_order", None, None, bytes(range(50))] and seq == 6


@pytest.mark.parametrize("kind", ["memoryview", "bytearray"])
def test_feed_takes_any_buffer(mpf, kind):
    """BLE IRQs hand frames over as memoryviews of internal buffers; feed copies what it keeps."""
    msg = bytes(range(256)) * 3
    outcomes, seq, _ = mp_feed(mpf, mpf.call(SPLIT, msg, 182, 0), kind=kind)
    assert outcomes[-1] == msg and outcomes[:-1] == [None] * (len(outcomes) - 1) and seq == 1


def test_declared_length_at_own_limit_is_accepted(mpf):
    msg = bytes(range(100))
    outcomes, _, _ = mp_feed(mpf, mpf.call(SPLIT, msg, 20, 0), max_message=100)
    assert outcomes[-1] == msg


def test_streams_max_message_in_small_heap(firmware_build):
    """A MAX_MESSAGE message streams through iter_frames and a Reassembler in a 32K heap, and the live heap
    does not grow from one message to the next."""
    script = """
import gc
from paytoken import framing
r = framing.Reassembler()
msg = bytes(range(256)) * 16
buf = bytearray(framing.MIN_FRAME)
used = []
for seq in range(12):
    out = None
    for f in framing.iter_frames(msg, framing.MIN_FRAME, seq, buf):
        out = r.feed(f)
    ok = out == msg
    out = None
    gc.collect()
    used.append(gc.mem_alloc())
    if not ok:
        raise SystemExit(1)
print("SPREAD", max(used[1:]) - min(used[1:]), "SEQ", r.expected_seq)
"""
    proc = run_script(script, heapsize="32K")
    assert proc.returncode == 0, proc.stderr
    words = proc.stdout.split()
    assert words[0] == "SPREAD" and int(words[1]) <= 256, proc.stdout
    assert words[2:] == ["SEQ", "12"]


# --- CPython side, hypothesis ---------------------------------------------------------------------------

frame_sizes = st.one_of(st.sampled_from(FRAME_SIZES), st.integers(fr.MIN_FRAME, fr.MAX_FRAME))
small_messages = st.binary(min_size=1, max_size=700)
any_message = st.one_of(small_messages, st.binary(min_size=1, max_size=fr.MAX_MESSAGE))
sessions = st.lists(small_messages, min_size=1, max_size=5)
start_seqs = st.integers(0, 200)  # crosses the mod-64 wrap


def session_frames(msgs, frame_size, start):
    """All frames of a session, in order, with the index of the message each belongs to."""
    frames, owner = [], []
    for k, m in enumerate(msgs):
        fs = fr.split(m, frame_size, start + k)
        frames += fs
        owner += [k] * len(fs)
    return frames, owner


def run(frames, start, max_message=fr.MAX_MESSAGE):
    """Feed every frame; only FrameError may escape feed. Returns (messages returned, reasons raised)."""
    r = fr.Reassembler(max_message)
    r.reset(start)
    returned, reasons = [], []
    for f in frames:
        try:
            m = r.feed(f)
        except fr.FrameError as e:
            assert isinstance(e, ValueError) and e.reason in REASONS
            assert not r.in_progress
            reasons.append(e.reason)
            continue
        if m is not None:
            assert isinstance(m, bytes) and 0 < len(m) <= max_message
            returned.append(m)
    assert len(r._mv) == max_message  # the one preallocated buffer, never grown
    assert r.expected_seq == start + len(returned)
    return returned, reasons


@given(any_message, frame_sizes, st.integers(0, 10**6))
def test_split_and_reassemble(msg, frame_size, seq):
    frames = fr.split(msg, frame_size, seq)
    assert len(frames) == fr.frame_count(len(msg), frame_size) == expected_frames(len(msg), frame_size)
    assert all(len(f) <= frame_size for f in frames)
    assert all(len(f) == frame_size for f in frames[:-1])
    assert [bytes(f) for f in fr.iter_frames(msg, frame_size, seq)] == frames
    assert run(frames, seq) == ([msg], [])


MUTATIONS = st.lists(
    st.tuples(
        st.sampled_from(["drop", "duplicate", "move", "swap", "truncate", "splice", "insert"]),
        st.integers(0, 10**6),
        st.integers(0, 10**6),
    ),
    max_size=8,
)


def mutate(frames, ops):
    """Structural mutations of the genuine frames of one session (no header tampering)."""
    frames = list(frames)
    for op, a, b in ops:
        if not frames:
            break
        i, j = a % len(frames), b % len(frames)
        if op == "drop":
            del frames[i]
        elif op == "duplicate":
            frames.insert(j, frames[i])
        elif op == "move":
            frames.insert(j, frames.pop(i))
        elif op == "swap":
            frames[i], frames[j] = frames[j], frames[i]
        elif op == "truncate" and frames[i]:
            frames[i] = frames[i][: b % len(frames[i])]
        elif op == "splice":  # a frame taken from elsewhere (another message, or another place) replaces one
            frames[i] = frames[j]
        elif op == "insert":  # frames of two messages interleaved
            frames.insert(i, frames[j])
    return frames


@settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])
@given(sessions, frame_sizes, start_seqs, MUTATIONS)
def test_structural_mutations_give_originals_or_frame_error(msgs, frame_size, start, ops):
    frames, _ = session_frames(msgs, frame_size, start)
    mutated = mutate(frames, ops)
    returned, reasons = run(mutated, start)
    assert returned == msgs[: len(returned)]  # exactly the originals, in order, or nothing
    if mutated == frames:
        assert (returned, reasons) == (msgs, [])


@settings(max_examples=400)
@given(sessions, frame_sizes, start_seqs, st.data())
def test_single_mutation_is_detected(msgs, frame_size, start, data):
    """One lost, duplicated, swapped or cut frame: FrameError, and its message is never returned."""
    frames, owner = session_frames(msgs, frame_size, start)
    op = data.draw(st.sampled_from(["drop", "duplicate", "swap", "truncate"]))
    i = data.draw(st.integers(0, len(frames) - 1))
    k = owner[i]
    frames = list(frames)
    if op == "drop":
        del frames[i]
    elif op == "duplicate":
        frames.insert(i + 1, frames[i])
    elif op == "swap":
        if i == len(frames) - 1:
            i -= 1
        if i < 0:
            return  # a one-frame session has nothing to swap
        k = owner[i]
        frames[i], frames[i + 1] = frames[i + 1], frames[i]
    else:
        frames[i] = frames[i][: data.draw(st.integers(0, len(frames[i]) - 1))]
    returned, reasons = run(frames, start)
    last_of_message = i == len(owner) - 1 or owner[i + 1] != k
    if op == "drop" and i == len(owner) - 1:
        assert (returned, reasons) == (msgs[:k], [])  # the tail lost: only the session's timeout sees it
    elif op == "duplicate" and last_of_message:
        assert returned == msgs and reasons == ["stale_seq"]  # a replayed last frame of a complete message
    elif op == "swap" and owner[i + 1] != k:
        # the next message's frame 0 comes first (future_seq); a one-frame message k is still taken after it
        one_frame = i == 0 or owner[i - 1] != k
        assert returned == msgs[: k + one_frame] and reasons
    else:
        assert returned == msgs[:k] and reasons


@settings(max_examples=400)
@given(sessions, frame_sizes, start_seqs, st.data())
def test_any_single_header_bit_flip_is_detected(msgs, frame_size, start, data):
    frames, owner = session_frames(msgs, frame_size, start)
    i = data.draw(st.integers(0, len(frames) - 1))
    header = fr.FIRST_HEADER if frames[i][1] == 0 else fr.HEADER
    bit = data.draw(st.integers(0, 8 * header - 1))
    f = bytearray(frames[i])
    f[bit // 8] ^= 0x80 >> (bit % 8)
    frames[i] = bytes(f)
    returned, reasons = run(frames, start)
    assert returned == msgs[: owner[i]] and reasons


@pytest.mark.parametrize("frame_size", [20, 23, 40, 244])
def test_every_single_header_bit_flip_is_detected(frame_size):
    """Exhaustive: each bit of each header (b0, index, and frame 0's length) of every frame of a session."""
    msgs = [A, S, F, B, bytes(300), bytes(range(256)) * 4]
    genuine, owner = session_frames(msgs, frame_size, 62)  # crosses the mod-64 wrap
    for i, frame in enumerate(genuine):
        header = fr.FIRST_HEADER if frame[1] == 0 else fr.HEADER
        for bit in range(8 * header):
            frames = list(genuine)
            frames[i] = flip(frame, bit // 8, 0x80 >> (bit % 8))
            returned, reasons = run(frames, 62)
            assert returned == msgs[: owner[i]] and reasons, (i, bit)


FLIPS = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 31)))


@given(sessions, frame_sizes, start_seqs, MUTATIONS, FLIPS)
def test_tampered_headers_only_raise_frame_error(msgs, frame_size, start, ops, flips):
    """Several header bits changed on purpose can relabel or shorten a message (AEAD catches that, see
    docs/framing.md); the reassembler still raises nothing but FrameError and stays within its buffer."""
    frames = mutate(session_frames(msgs, frame_size, start)[0], ops)
    for a, bit in flips:
        if frames:
            f = bytearray(frames[a % len(frames)])
            if f:
                f[(bit // 8) % len(f)] ^= 0x80 >> (bit % 8)
            frames[a % len(frames)] = bytes(f)
    returned, _ = run(frames, start, max_message=1000)
    assert all(len(m) <= 1000 for m in returned)


@given(st.lists(st.binary(max_size=600), max_size=30), start_seqs, st.integers(1, fr.MAX_MESSAGE))
def test_random_bytes_only_raise_frame_error(frames, start, max_message):
    returned, reasons = run(frames, start, max_message)
    assert len(returned) + len(reasons) <= len(frames)
