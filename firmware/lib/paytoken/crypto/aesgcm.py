# AES-GCM (NIST SP 800-38D): 96-bit nonces, 128-bit tags, 128- and 256-bit keys, over cryptolib's ECB AES.
from cryptolib import aes
from micropython import const

from paytoken.crypto.ct import equal

_G = const(1)  # GHASH blocks per reduction; H^1..H^G kept per key. 4 is ~20% faster on 256 B but holds
# 20 big ints per key instead of 5: with three keys alive in a payment, 1 saves ~2 KB of a 64 KB heap
_CB = const(16)  # counter blocks per ECB call: one C call per 256 bytes, from a fixed 256-byte buffer
_MAX_PT = const((1 << 36) - 32)  # SP 800-38D limit: the 32-bit block counter must not wrap
_S = const(256)  # slot width: a 128x128-bit product fits, so slots never carry into each other

_M128 = const((1 << 128) - 1)
_R5 = const(((1 << 260) - 1) // 31)  # bits 0, 5, 10, ..., 255


# GHASH multiplies by integer multiplication with holes (as BearSSL's ghash_ctmul): split each operand
# into 5 bit-classes, every 5th bit; a product of two classes sums at most 26 terms per bit, which fits
# in the 5 bits up to the next bit of its class, so that bit is the carry-less (XOR) product bit.
# All 5 classes of X ride in one integer, so a block costs 5 multiplications and no table lookups.
# Timing: a Shoup table (4- or 8-bit) is indexed by secret nibbles/bytes of the GHASH state, so the
# cache lines it touches leak them (and an 8-bit table of 128-bit ints needs ~18 KB per key); here the
# only index (pw[...]) is the public block position. What remains: mpz time follows operand lengths,
# which shrink only when a value's top 16-bit digit is zero (2^-16 per value), and cryptolib's AES:
# mbedTLS software T-tables on the unix port, the AES peripheral in ESP-IDF's default configuration.
_REP = const(1 | 1 << _S | 1 << 2 * _S | 1 << 3 * _S | 1 << 4 * _S)  # X into 5 slots of _S bits
_MA = const(  # keeps class i of X in slot i
    (_R5 & _M128)
    | ((_R5 << 1) & _M128) << _S
    | ((_R5 << 2) & _M128) << 2 * _S
    | ((_R5 << 3) & _M128) << 3 * _S
    | ((_R5 << 4) & _M128) << 4 * _S
)
_M256 = const((1 << 256) - 1)
_MM = const(  # keeps class k of the 256-bit product in slot k
    (_R5 & _M256)
    | ((_R5 << 1) & _M256) << _S
    | ((_R5 << 2) & _M256) << 2 * _S
    | ((_R5 << 3) & _M256) << 3 * _S
    | ((_R5 << 4) & _M256) << 4 * _S
)

# _CB counter blocks (nonce || c), (nonce || c+1), ... as one integer: (nonce || c) * _CREP + _CDESC,
# with _CREP = sum r^k and _CDESC = sum (_CB-1-k) r^k over k < _CB, r = 2^128.
_CREP = const(((1 << 128 * _CB) - 1) // ((1 << 128) - 1))
_CDESC = const(((1 << 128 * _CB) - _CB * (1 << 128) + _CB - 1) // ((1 << 128) - 1) ** 2)


# Keystream scratch shared by every key: nothing runs two encryptions at once, and per key it would cost
# 256 bytes of heap for as long as the key lives.
_KS = memoryview(bytearray(16 * _CB))


def _pieces(h):
    return (
        h & _R5 & _M128,
        h & (_R5 << 1) & _M128,
        h & (_R5 << 2) & _M128,
        h & (_R5 << 3) & _M128,
        h & (_R5 << 4) & _M128,
    )


class AESGCM:
    # Keeps the AES key schedule, the powers of H and a keystream buffer for many messages.

    def __init__(self, key):
        if len(key) != 16 and len(key) != 32:
            raise ValueError("AES-GCM key must be 16 or 32 bytes")
        self._aes = aes(key, 1)
        h = int.from_bytes(self._aes.encrypt(bytes(16)), "big")
        self._pw = [_pieces(h)]
        hk = h
        for _ in range(_G - 1):
            hk = self._fold(hk, 0, 1)  # (hk ^ 0) * H
            self._pw.append(_pieces(hk))

    def _fold(self, y, g, nb):
        # (y ^ X1) H^nb ^ X2 H^(nb-1) ^ ... ^ Xnb H for the nb blocks of g (X1 on top): the products
        # are XORed unreduced, so the group pays for one merge and one reduction.
        pw = self._pw
        rep = _REP
        ma = _MA
        m128 = _M128
        sh = 128 * nb
        g ^= y << (sh - 128)
        t0 = t1 = t2 = t3 = t4 = 0
        while sh:
            sh -= 128
            a = (((g >> sh) & m128) * rep) & ma
            p0, p1, p2, p3, p4 = pw[sh >> 7]
            t0 ^= a * p0
            t1 ^= a * p1
            t2 ^= a * p2
            t3 ^= a * p3
            t4 ^= a * p4
        # Class i of X times class j of H sits in slot i+j; bring slots 5..8 onto 0..3, mask
        # each slot to its class, then merge the 5 slots (their bits are disjoint).
        w = t0 ^ (t1 << _S) ^ (t2 << 2 * _S) ^ (t3 << 3 * _S) ^ (t4 << 4 * _S)
        w = (w ^ (w >> 5 * _S)) & _MM
        w ^= (w >> 2 * _S) ^ (w >> 4 * _S)
        w ^= w >> _S
        # w: 255-bit product of two bit-reflected (GCM order) values, bit 254-d holding x^d.
        # Reduce mod x^128 + x^7 + x^2 + x + 1: the low part L stands for L * x^128 =
        # L * (1 + x + x^2 + x^7); in this bit order multiplying by x is a right shift, so widen
        # by 7 bits and fold the 7 bits that overflow once more.
        lo = (w << 1) & m128
        e = (lo << 7) ^ (lo << 6) ^ (lo << 5) ^ lo
        q = e & 0x7F
        return ((w >> 127) & m128) ^ (e >> 7) ^ (((q << 7) ^ (q << 6) ^ (q << 5) ^ q) << 114)

    def _absorb(self, y, g, nb, data):
        # Appends data, zero-padded to whole blocks, to the nb (< _G) pending blocks in g and
        # folds every full group into y. Groups run across the AAD/ciphertext/length boundaries.
        n = len(data)
        off = 0
        while off < n:
            ln = n - off
            if ln > 16 * (_G - nb):
                ln = 16 * (_G - nb)
            k = (ln + 15) >> 4
            g = (g << (128 * k)) | (int.from_bytes(data[off : off + ln], "big") << (128 * k - 8 * ln))
            nb += k
            off += ln
            if nb == _G:
                y = self._fold(y, g, nb)
                g = 0
                nb = 0
        return y, g, nb

    def _ctr(self, nonce, src, dst):
        # dst = src ^ keystream from counter 2 (counter 1 masks the tag). The counter blocks are
        # built as one integer and encrypted by one ECB call per 256 bytes: no per-block Python loop.
        n = len(src)
        if n > _MAX_PT:
            raise ValueError("AES-GCM message too long")
        base = (int.from_bytes(nonce, "big") << 32) | 2
        ks = _KS
        enc = self._aes.encrypt
        off = 0
        while off < n:
            ln = n - off
            if ln > 16 * _CB:
                ln = 16 * _CB
            m = (ln + 15) >> 4
            ctr = (base * _CREP + _CDESC) >> (128 * (_CB - m))
            k = ks[: 16 * m]
            enc(ctr.to_bytes(16 * m, "big"), k)
            x = int.from_bytes(src[off : off + ln], "big") ^ (int.from_bytes(k, "big") >> (8 * (16 * m - ln)))
            dst[off : off + ln] = x.to_bytes(ln, "big")
            base += m
            off += ln

    def _tag(self, nonce, aad, ct):
        y, g, nb = self._absorb(0, 0, 0, aad)
        y, g, nb = self._absorb(y, g, nb, ct)
        # Fewer than _G blocks are pending, so the length block always fits the last group.
        y = self._fold(y, (g << 128) | (8 * len(aad)) << 64 | (8 * len(ct)), nb + 1)
        j0 = bytearray(16)
        j0[:12] = nonce
        j0[15] = 1
        return (int.from_bytes(self._aes.encrypt(j0), "big") ^ y).to_bytes(16, "big")

    def encrypt(self, nonce, plaintext, aad=b""):
        if len(nonce) != 12:
            raise ValueError("AES-GCM nonce must be 12 bytes")
        n = len(plaintext)
        out = bytearray(n + 16)
        mv = memoryview(out)
        self._ctr(nonce, memoryview(plaintext), mv)
        mv[n:] = self._tag(nonce, aad, mv[:n])
        return bytes(out)

    def decrypt(self, nonce, data, aad=b""):
        if len(nonce) != 12:
            raise ValueError("AES-GCM nonce must be 12 bytes")
        n = len(data) - 16
        if n < 0:
            raise ValueError("AES-GCM data shorter than the tag")
        mv = memoryview(data)
        # Verify before decrypting: a forgery never yields plaintext.
        if not equal(self._tag(nonce, aad, mv[:n]), mv[n:]):
            raise ValueError("AES-GCM tag mismatch")
        out = bytearray(n)
        self._ctr(nonce, mv[:n], memoryview(out))
        return bytes(out)


def encrypt(key, nonce, plaintext, aad=b""):
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def decrypt(key, nonce, data, aad=b""):
    return AESGCM(key).decrypt(nonce, data, aad)
