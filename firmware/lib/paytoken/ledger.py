# Append-only, hash-chained, CRC-checked record log in one file of the device filesystem (LittleFS).
#
# File:    header | record | record | ...
# header:  b"PTLG" | version u8 | base_seq u32 | base_hash 32 | checkpoint_len u16 | checkpoint | crc32 u32
# record:  payload_len u16 | prev4 (first 4 bytes of the chain hash before it) | payload | crc32 u32
# The chain hash after record n is SHA-256(hash(n-1) || payload(n)); a fresh ledger starts from 32 zero bytes.
# The checkpoint is what the owner keeps about records dropped by compaction (for the wallet: the backend's
# signed acknowledgement of them and its own state at that point); the ledger treats it as opaque bytes.
#
# Power safety: append() writes one record and flushes (an atomic commit on LittleFS), so it is durable
# when it returns. On open a torn last record (a cut append on a filesystem without atomic commits) is
# cut off; a bad record with more data after it is corruption: reported, never silently dropped, and the
# ledger then refuses appends. compact() writes a new file and renames it over the old one (atomic on
# LittleFS), so a cut leaves either the old file or the new one.
import os
import struct
from binascii import crc32
from hashlib import sha256

try:
    from micropython import const
except ImportError:  # CPython tools reading a ledger image
    def const(x):
        return x

MAGIC = b"PTLG"
VERSION = const(1)
MAX_PAYLOAD = const(512)  # the largest wallet record is under 200 bytes; RAM holds two such buffers
_HEAD = ">4sBI32sH"
_HEAD_LEN = const(43)  # struct.calcsize(_HEAD)
_REC_HEAD = const(6)  # payload_len u16 + prev4: the link detects records moved or spliced
_CRC = const(4)
ZERO_HASH = bytes(32)


class LedgerCorrupt(Exception):
    # Data before the tail failed its check: the owner must not pay until this is resolved.
    def __init__(self, seq, offset, why):
        super().__init__("ledger corrupt after record %d (offset %d): %s" % (seq, offset, why))
        self.seq = seq
        self.offset = offset


def _crc_bytes(data):
    return struct.pack(">I", crc32(data) & 0xFFFFFFFF)


def _header(base_seq, base_hash, checkpoint):
    body = struct.pack(_HEAD, MAGIC, VERSION, base_seq, base_hash, len(checkpoint)) + checkpoint
    return body + _crc_bytes(body)


def _chain(h, payload):
    # The chain hash after a record: SHA-256(previous hash || payload), without concatenating.
    hasher = sha256(h)
    hasher.update(payload)
    return hasher.digest()


def _record(prev_hash, payload):
    body = struct.pack(">H", len(payload)) + prev_hash[:4] + payload
    return body + _crc_bytes(body)


class Ledger:
    def __init__(self, path):
        self.path = path
        self._buf = memoryview(bytearray(MAX_PAYLOAD + _CRC))
        self.corrupt = None  # a LedgerCorrupt once found on open
        self.dropped_tail = 0  # bytes of a torn last record cut off on open
        self._f = None
        tmp = path + ".new"
        if _exists(tmp):
            os.remove(tmp)  # a compaction cut before its rename: the old file is still whole
        if not _exists(path):
            # made whole beside it, then renamed: a cut while creating it leaves no ledger, never an empty one
            init = path + ".init"
            with open(init, "wb") as f:
                f.write(_header(0, ZERO_HASH, b""))
            os.rename(init, path)
        self._recover()

    # ---- reading ----
    def _read_header(self, f):
        head = f.read(_HEAD_LEN)
        if len(head) != _HEAD_LEN:
            raise LedgerCorrupt(0, 0, "short header")
        magic, version, base_seq, base_hash, cp_len = struct.unpack(_HEAD, head)
        if magic != MAGIC or version != VERSION:
            raise LedgerCorrupt(0, 0, "not a ledger file")
        rest = f.read(cp_len + _CRC)
        if len(rest) != cp_len + _CRC or rest[cp_len:] != _crc_bytes(head + rest[:cp_len]):
            raise LedgerCorrupt(0, 0, "header check failed")
        return base_seq, bytes(base_hash), rest[:cp_len], _HEAD_LEN + cp_len + _CRC

    def _scan(self):
        # Walks every record, checking CRC and chain; returns (seq, hash, good_end, file_size, problem).
        # problem is None, ("tail", offset) for a torn last record, or ("corrupt", offset, why).
        # One preallocated buffer for all records: opening a long ledger makes no garbage per record.
        with open(self.path, "rb") as f:
            base_seq, h, checkpoint, off = self._read_header(f)
            self.base_seq = base_seq
            self.base_hash = h
            self.checkpoint = checkpoint
            f.seek(0, 2)
            size = f.tell()
            f.seek(off)
            seq = base_seq
            head = bytearray(_REC_HEAD)
            mv = self._buf
            while off < size:
                problem = None
                if f.readinto(head) != _REC_HEAD:
                    problem = "short record header"
                else:
                    n = head[0] << 8 | head[1]
                    if n > MAX_PAYLOAD:
                        problem = "bad length"
                    elif f.readinto(mv[:n + _CRC]) != n + _CRC:
                        problem = "check failed"
                    elif int.from_bytes(mv[n:n + _CRC], "big") != crc32(mv[:n], crc32(head)) & 0xFFFFFFFF:
                        problem = "check failed"
                    elif head[2:] != h[:4]:
                        problem = "chain broken"
                if problem:
                    if problem != "chain broken" and not self._record_after(f, off, size):
                        return seq, h, off, size, ("tail", off)
                    return seq, h, off, size, ("corrupt", off, problem)
                h = _chain(h, mv[:n])
                seq += 1
                off += _REC_HEAD + n + _CRC
            return seq, h, off, size, None

    @staticmethod
    def _record_after(f, off, size):
        # Does a whole, CRC-valid record start anywhere after the bad spot? A cut append leaves at most a
        # prefix of one record at the end, so finding one means data was damaged in place, not torn.
        longest = _REC_HEAD + MAX_PAYLOAD + _CRC
        if size - off > longest:
            return True  # more than one record's worth follows: never a torn tail
        f.seek(off + 1)
        rest = f.read(size - off - 1)
        n = len(rest)
        for i in range(n - _REC_HEAD - _CRC + 1):
            ln = rest[i] << 8 | rest[i + 1]
            end = i + _REC_HEAD + ln
            if ln and end + _CRC <= n and rest[end:end + _CRC] == _crc_bytes(rest[i:end]):
                return True
        return False

    def _recover(self):
        seq, h, good_end, size, problem = self._scan()
        if problem and problem[0] == "tail":
            # Cut the torn record off (rewrite the good prefix: MicroPython files cannot truncate).
            self.dropped_tail = size - good_end
            self._rewrite_prefix(good_end)
        elif problem:
            self.corrupt = LedgerCorrupt(seq, problem[1], problem[2])
        self.seq = seq
        self.hash = h

    def _rewrite_prefix(self, end):
        tmp = self.path + ".new"
        with open(self.path, "rb") as src, open(tmp, "wb") as dst:
            buf = bytearray(512)
            left = end
            while left:
                n = src.readinto(buf)
                n = min(n, left)
                dst.write(memoryview(buf)[:n])
                left -= n
        os.rename(tmp, self.path)

    @property
    def head(self):
        return self.seq, self.hash

    def records(self, start=0):
        # (seq, payload) for every record with seq >= start that is still in the file, oldest first.
        # The payload is a memoryview into one reused buffer, valid until the next record is drawn:
        # copy what you keep. Memory does not grow with the ledger.
        buf = memoryview(bytearray(MAX_PAYLOAD))
        with open(self.path, "rb") as f:
            self._read_header(f)
            seq = self.base_seq
            head = bytearray(_REC_HEAD)
            while seq < self.seq:
                if f.readinto(head) != _REC_HEAD:
                    return
                n = head[0] << 8 | head[1]
                seq += 1
                if seq >= start:
                    f.readinto(buf[:n])
                    f.seek(_CRC, 1)
                    yield seq, buf[:n]
                else:
                    f.seek(n + _CRC, 1)

    # ---- writing ----
    def append(self, payload):
        # Sequence number of the new record, durable when this returns.
        if self.corrupt is not None:
            raise self.corrupt
        if not 0 < len(payload) <= MAX_PAYLOAD:
            raise ValueError("ledger record size")
        rec = _record(self.hash, payload)
        f = self._f
        if f is None:
            f = self._f = open(self.path, "ab")
        f.write(rec)
        f.flush()
        self.hash = _chain(self.hash, payload)
        self.seq += 1
        return self.seq

    def hash_at(self, seq):
        # Chain hash after record seq (base_seq <= seq <= head), from the checkpoint onwards.
        if seq == self.base_seq:
            return self.base_hash
        if not self.base_seq < seq <= self.seq:
            raise ValueError("no such record")
        h = self.base_hash
        for s, payload in self.records(self.base_seq + 1):
            h = _chain(h, payload)
            if s == seq:
                return h

    def compact(self, upto_seq, checkpoint):
        # Drop records up to upto_seq, keeping `checkpoint` (the owner's signed record of them) in the
        # header. The caller has checked that a backend acknowledgement covers them.
        if self.corrupt is not None:
            raise self.corrupt
        if not self.base_seq <= upto_seq <= self.seq:
            raise ValueError("compaction beyond the ledger")
        base_hash = self.hash_at(upto_seq)
        self.close()
        tmp = self.path + ".new"
        with open(tmp, "wb") as out:
            out.write(_header(upto_seq, base_hash, checkpoint))
            h = base_hash
            for _, payload in self.records(upto_seq + 1):
                out.write(_record(h, bytes(payload)))
                h = _chain(h, payload)
        os.rename(tmp, self.path)
        self.base_seq = upto_seq
        self.base_hash = base_hash
        self.checkpoint = checkpoint

    def close(self):
        if self._f is not None:
            self._f.close()
            self._f = None

    def size(self):
        return os.stat(self.path)[6]


def _exists(path):
    try:
        os.stat(path)
        return True
    except OSError:
        return False
