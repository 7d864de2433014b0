# NIST P-256 (secp256r1): ECDSA with SHA-256 (deterministic k, RFC 6979) and ECDH, in pure MicroPython.
#
# Points are Jacobian (X, Y, Z) with x = X/Z^2, y = Y/Z^3; Z == 0 is the point at infinity.
# Speed comes from big-int products reduced once per product, a = -3 doubling (3M + 5S), mixed
# additions against affine tables, a 6-tooth comb for k*G and interleaved wNAF for verification.
#
# Side channels (docs/security.md): secret scalars drive loops of fixed length with no branch on
# their bits (comb columns and signed odd window digits are never zero), and inverses of secret
# values are blinded. MicroPython's big-int arithmetic still takes operand-size-dependent time and
# table lookups index memory by secret digits; a secure element closes both.
from hashlib import sha256

from paytoken.crypto import kdf, rand
from paytoken.crypto import p256_tables as _tab

P = 0xFFFFFFFF00000001000000000000000000000000FFFFFFFFFFFFFFFFFFFFFFFF
N = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551
B = 0x5AC635D8AA3A93E7B3EBBD55769886BC651D06B0CC53B0F63BCE3C3E27D2604B
GX = 0x6B17D1F2E12C4247F8BCE6E563A440F277037D812DEB33A0F4A13945D898C296
GY = 0x4FE342E2FE1A7F9B8EE7EB4A7C0F9E162BCE33576B315ECECBB6406837BF51F5
_SQRT_EXP = (P + 1) // 4  # P = 3 (mod 4)

_COMB = memoryview(_tab.COMB)
_G_ODD = memoryview(_tab.G_ODD)
_FIX = memoryview(_tab.COMB_FIX)
_SPACING = _tab.SPACING
_CMASK = (1 << _SPACING) - 1


def _int(b):
    return int.from_bytes(b, "big")


def _inv(a, m):
    # Extended Euclid: ~5x faster than pow(a, m-2, m) here, but variable-time,
    # so callers blind secret inputs first (_inv_blinded).
    a %= m
    if a == 0:
        raise ZeroDivisionError("no inverse of 0")
    r0, r1 = m, a
    t0, t1 = 0, 1
    while r1:
        q = r0 // r1
        r0, r1 = r1, r0 - q * r1
        t0, t1 = t1, t0 - q * t1
    return t0 % m


def _inv_blinded(a, m):
    # (a*b)^-1 * b = a^-1: the variable-time inversion only ever sees a random multiple of a.
    b = rand.random_scalar(m)
    return _inv(a * b % m, m) * b % m


def _table_point(mv, i):
    o = i << 6
    return _int(mv[o:o + 32]), _int(mv[o + 32:o + 64])


# ---- point arithmetic (general, handles every special case) ----

def _double(X, Y, Z):
    p = P
    if Z == 0 or Y == 0:
        return 1, 1, 0
    d = Z * Z % p
    g = Y * Y % p
    b = X * g % p
    a = 3 * (X - d) * (X + d) % p
    X3 = (a * a - 8 * b) % p
    Z3 = 2 * Y * Z % p
    return X3, (a * (4 * b - X3) - 8 * g * g) % p, Z3


def _add_affine(X, Y, Z, x2, y2):
    # Jacobian + affine (x2, y2), the affine point never infinity.
    p = P
    if Z == 0:
        return x2, y2, 1
    zz = Z * Z % p
    h = (x2 * zz - X) % p
    r = (y2 * zz * Z - Y) % p
    if h == 0:
        if r == 0:
            return _double(x2, y2, 1)
        return 1, 1, 0
    hh = h * h % p
    hhh = h * hh % p
    v = X * hh % p
    X3 = (r * r - hhh - 2 * v) % p
    return X3, (r * (v - X3) - Y * hhh) % p, Z * h % p


def _affine(X, Y, Z, secret):
    if Z == 0:
        raise ValueError("point at infinity")
    zi = _inv_blinded(Z, P) if secret else _inv(Z, P)
    zi2 = zi * zi % P
    return X * zi2 % P, Y * zi2 * zi % P


def _on_curve(x, y):
    p = P
    return 0 <= x < p and 0 <= y < p and (y * y - (x * x * x - 3 * x + B)) % p == 0


def decode_point(pub):
    # SEC1 uncompressed (65 bytes) or compressed (33 bytes) -> (x, y) on the curve, else ValueError.
    n = len(pub)
    if n == 65 and pub[0] == 4:
        x, y = _int(pub[1:33]), _int(pub[33:65])
    elif n == 33 and pub[0] in (2, 3):
        x = _int(pub[1:33])
        if x >= P:
            raise ValueError("x out of range")
        y = pow((x * x * x - 3 * x + B) % P, _SQRT_EXP, P)
        if (y & 1) != (pub[0] & 1):
            y = P - y
    else:
        raise ValueError("bad public key encoding")
    if not _on_curve(x, y):
        raise ValueError("point not on P-256")
    return x, y


def encode_point(x, y, compressed=False):
    if compressed:
        return bytes((2 | (y & 1),)) + x.to_bytes(32, "big")
    return b"\x04" + x.to_bytes(32, "big") + y.to_bytes(32, "big")


# ---- scalar multiplication ----

def _mul_g(k):
    # k*G by a 6-tooth comb, k in [1, N-1]. Columns run 42..0, each one doubling and one mixed
    # addition of a table point offset by Q0 (so column 0 still adds a point); COMB_FIX cancels
    # the offsets. A collision (h == 0) can only happen for a negligible set of scalars and is
    # then handled by the general formula.
    p = P
    tab = _COMB
    sp = _SPACING
    m = _CMASK
    c0 = k & m
    c1 = (k >> sp) & m
    c2 = (k >> 2 * sp) & m
    c3 = (k >> 3 * sp) & m
    c4 = (k >> 4 * sp) & m
    c5 = k >> 5 * sp
    j = sp - 1
    col = (c0 >> j & 1) | (c1 >> j & 1) << 1 | (c2 >> j & 1) << 2 | (c3 >> j & 1) << 3 \
        | (c4 >> j & 1) << 4 | (c5 >> j & 1) << 5
    X, Y = _table_point(tab, col)
    Z = 1
    while j:
        j -= 1
        # double (a = -3)
        d = Z * Z % p
        g = Y * Y % p
        b = X * g % p
        a = 3 * (X - d) * (X + d) % p
        Z = 2 * Y * Z % p
        X = (a * a - 8 * b) % p
        Y = (a * (4 * b - X) - 8 * g * g) % p
        # add the column's table point
        col = (c0 >> j & 1) | (c1 >> j & 1) << 1 | (c2 >> j & 1) << 2 | (c3 >> j & 1) << 3 \
            | (c4 >> j & 1) << 4 | (c5 >> j & 1) << 5
        o = col << 6
        x2 = _int(tab[o:o + 32])
        y2 = _int(tab[o + 32:o + 64])
        zz = Z * Z % p
        h = (x2 * zz - X) % p
        r = (y2 * zz * Z - Y) % p
        if h == 0:
            X, Y, Z = _add_affine(X, Y, Z, x2, y2)
            continue
        hh = h * h % p
        hhh = h * hh % p
        v = X * hh % p
        Z = Z * h % p
        X = (r * r - hhh - 2 * v) % p
        Y = (r * (v - X) - Y * hhh) % p
    fx, fy = _table_point(_FIX, 0)
    return _add_affine(X, Y, Z, fx, fy)


def _odd_multiples(x, y, count):
    # Affine (x, y), 3(x, y), ..., (2*count-1)(x, y): Jacobian sums made affine with one inversion
    # (Montgomery's trick), converted in place to keep the peak small. Inputs are public.
    p = P
    dx, dy = _affine(*_double(x, y, 1), False)
    pts = [(x, y, 1)]
    pre = [1]  # pre[i] = product of the Z of points 0..i
    for i in range(count - 1):
        X, Y, Z = _add_affine(*pts[i], dx, dy)
        pts.append((X, Y, Z))
        pre.append(pre[i] * Z % p)
    acc = _inv(pre[-1], p)
    for i in range(count - 1, -1, -1):
        X, Y, Z = pts[i]
        zi = acc * pre[i - 1] % p if i else acc
        acc = acc * Z % p
        zi2 = zi * zi % p
        pts[i] = (X * zi2 % p, Y * zi2 * zi % p)
    return pts


def _mul_point(k, x, y):
    # k*(x, y) for a secret k in [1, N-1] and a public point, by signed odd 4-bit windows: every
    # digit is odd in [-15, 15], so every window adds a point. k is made odd by k -> N - k, which
    # negates the result and leaves its x (all ECDH needs) unchanged; the caller takes x only.
    p = P
    k = k + (1 - (k & 1)) * (N - 2 * k)
    tab = _odd_multiples(x, y, 8)
    digits = bytearray(64)
    for i in range(64):
        digits[i] = k & 31  # odd: the digit is this minus 16
        k = (k >> 4) | 1
    X, Y, Z = x, y, 1  # the top digit is always 1
    i = 64
    while i:
        i -= 1
        for _ in range(4):
            d = Z * Z % p
            g = Y * Y % p
            b = X * g % p
            a = 3 * (X - d) * (X + d) % p
            Z = 2 * Y * Z % p
            X = (a * a - 8 * b) % p
            Y = (a * (4 * b - X) - 8 * g * g) % p
        u = digits[i]
        neg = (u >> 4) ^ 1
        low = u & 15
        mag = low + neg * (16 - 2 * low)  # |u - 16|
        x2, y2 = tab[mag >> 1]
        y2 = y2 + neg * (p - 2 * y2)
        zz = Z * Z % p
        h = (x2 * zz - X) % p
        r = (y2 * zz * Z - Y) % p
        if h == 0:
            X, Y, Z = _add_affine(X, Y, Z, x2, y2)
            continue
        hh = h * h % p
        hhh = h * hh % p
        v = X * hh % p
        Z = Z * h % p
        X = (r * r - hhh - 2 * v) % p
        Y = (r * (v - X) - Y * hhh) % p
    return X, Y, Z


def _wnaf(k, w):
    # Width-w NAF of k < 2^256 into a preallocated 257-byte array, least significant digit first,
    # each digit stored + 128; nonzero digits are odd with |d| < 2^(w-1).
    full = 1 << w
    half = full >> 1
    out = bytearray(b"\x80" * 257)
    i = 0
    while k:
        if k & 1:
            d = k & (full - 1)
            if d >= half:
                d -= full
            k -= d
            out[i] = d + 128
        k >>= 1
        i += 1
    return out


def _mul_sum(u1, u2, qx, qy):
    # u1*G + u2*Q with one shared chain of doublings (public inputs: verification only).
    p = P
    gw = _wnaf(u1, _tab.GWINDOW)
    qw = _wnaf(u2, 4)
    qtab = _odd_multiples(qx, qy, 4)
    gtab = _G_ODD
    X, Y, Z = 1, 1, 0
    for i in range(256, -1, -1):
        if Z:
            d = Z * Z % p
            g = Y * Y % p
            b = X * g % p
            a = 3 * (X - d) * (X + d) % p
            Z = 2 * Y * Z % p
            X = (a * a - 8 * b) % p
            Y = (a * (4 * b - X) - 8 * g * g) % p
        dg = gw[i] - 128
        if dg:
            x2, y2 = _table_point(gtab, abs(dg) >> 1)
            X, Y, Z = _add_affine(X, Y, Z, x2, y2 if dg > 0 else p - y2)
        dq = qw[i] - 128
        if dq:
            x2, y2 = qtab[abs(dq) >> 1]
            X, Y, Z = _add_affine(X, Y, Z, x2, y2 if dq > 0 else p - y2)
    return X, Y, Z


# ---- public API ----

def _private_scalar(priv):
    if len(priv) != 32:
        raise ValueError("private key must be 32 bytes")
    d = _int(priv)
    if not 0 < d < N:
        raise ValueError("private key out of range")
    return d


def public_key(priv32):
    # 65-byte uncompressed SEC1 public key of a 32-byte private key.
    x, y = _affine(*_mul_g(_private_scalar(priv32)), True)
    return encode_point(x, y)


def _rfc6979_k(d, h1):
    # RFC 6979 section 3.2 with HMAC-SHA256; qlen = hlen = 256, so bits2octets is a reduction mod N.
    hmac = kdf.hmac_sha256
    x = d.to_bytes(32, "big")
    h = (_int(h1) % N).to_bytes(32, "big")
    K = bytes(32)
    V = b"\x01" * 32
    K = hmac(K, V + b"\x00" + x + h)
    V = hmac(K, V)
    K = hmac(K, V + b"\x01" + x + h)
    V = hmac(K, V)
    # Each round succeeds with probability ~1 - 2^-32; a long run means a broken HMAC, not bad luck.
    for _ in range(16):
        V = hmac(K, V)
        k = _int(V)
        if 0 < k < N:
            yield k
        K = hmac(K, V + b"\x00")
        V = hmac(K, V)
    raise RuntimeError("RFC 6979: no nonce found")


def sign(priv32, msg):
    # 64-byte r || s over SHA-256(msg); equal to cryptography's deterministic ECDSA byte for byte.
    d = _private_scalar(priv32)
    h1 = sha256(msg).digest()
    e = _int(h1)
    for k in _rfc6979_k(d, h1):
        x, _ = _affine(*_mul_g(k), True)
        r = x % N
        if r == 0:
            continue
        s = _inv_blinded(k, N) * (e + r * d) % N
        if s:
            return r.to_bytes(32, "big") + s.to_bytes(32, "big")


def verify(pub, msg, sig):
    # True only for a valid signature; False (never an exception) for any malformed input.
    try:
        if len(sig) != 64:
            return False
        qx, qy = decode_point(pub)
    except (ValueError, TypeError):
        return False
    r = _int(sig[:32])
    s = _int(sig[32:])
    if not (0 < r < N and 0 < s < N):
        return False
    e = _int(sha256(msg).digest())
    w = _inv(s, N)
    X, Y, Z = _mul_sum(e * w % N, r * w % N, qx, qy)
    if Z == 0:
        return False
    # x(R) mod N == r without an inversion: X == x*Z^2 for x in {r, r+N} (when r+N < P).
    zz = Z * Z % P
    if X == r * zz % P:
        return True
    return r + N < P and X == (r + N) * zz % P


def ecdh(priv32, pub):
    # 32-byte x coordinate of priv*pub; ValueError for an invalid public key.
    d = _private_scalar(priv32)
    qx, qy = decode_point(pub)
    x, _ = _affine(*_mul_point(d, qx, qy), True)
    return x.to_bytes(32, "big")
