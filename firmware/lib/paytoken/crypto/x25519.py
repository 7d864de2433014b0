# X25519 Diffie-Hellman (RFC 7748) on MicroPython big ints.
#
# Timing: the ladder's control flow and operation sequence never depend on the scalar, but
# MicroPython's mpz operations still take time that varies with operand length and sign, and
# both depend on secret values, so a local attacker timing many runs could learn something.
from micropython import const

_P = const(0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFED)  # 2^255 - 19
_M = const(0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF)  # 2^255 - 1
_A24 = const(121665)  # (486662 - 2) / 4

# Values are kept only partially reduced: a fold (c & M) + 19*(c >> 255) uses 2^255 = 19 (mod p)
# and costs far less than c % p. One fold after a product of the ladder's operands leaves up to
# ~2^293, so every chain of two products from one ladder state to the next gets one extra fold:
# that keeps the state below 2^255 + 2^43 (magnitude; it may be negative) at every step.


def _sqn(x, n):
    m = _M
    for _ in range(n):
        x = x * x
        x = (x & m) + (x >> 255) * 19
        x = (x & m) + (x >> 255) * 19
    return x


def _mul(a, b):
    m = _M
    x = a * b
    x = (x & m) + (x >> 255) * 19
    return (x & m) + (x >> 255) * 19


def _inv(z):
    # z^(p-2) by the usual 254-squaring, 11-multiplication chain: about half of pow(z, p - 2, p),
    # whose every step is a full division.
    z2 = _mul(z, z)
    z9 = _mul(_sqn(z2, 2), z)
    z11 = _mul(z9, z2)
    t = _mul(_mul(z11, z11), z9)  # z^(2^5 - 1)
    t10 = _mul(_sqn(t, 5), t)
    t = _mul(_sqn(t10, 10), t10)
    t = _mul(_sqn(t, 20), t)
    t50 = _mul(_sqn(t, 10), t10)
    t = _mul(_sqn(t50, 50), t50)
    t = _mul(_sqn(t, 100), t)
    t = _mul(_sqn(t, 50), t50)
    return _mul(_sqn(t, 5), z11)  # z^(2^255 - 21)


def _ladder(k, x1):
    # Montgomery ladder over projective (X:Z), 255 steps from bit 254 down to bit 0. Slot 2 always
    # receives the doubling and slot 3 the differential addition (symmetric in its inputs); the
    # bit only chooses which slot is doubled, by an arithmetic select that multiplies by s = +-1
    # (never 0, which mpz would short-cut). Selecting 2*(X+Z), 2*(X-Z) only rescales that point,
    # which projective coordinates absorb. After step t the ladder's R0 is in slot 2 iff bit t is
    # 0, and clamping clears bit 0, so slot 2 holds the result.
    m = _M
    x2 = 1
    z2 = 0
    x3 = x1
    z3 = 1
    prev = 0
    for t in range(254, -1, -1):
        bit = (k[t >> 3] >> (t & 7)) & 1
        s = 1 - ((prev ^ bit) << 1)
        prev = bit
        p2 = x2 + z2
        m2 = x2 - z2
        p3 = x3 + z3
        m3 = x3 - z3
        a = p2 + p3 + (p2 - p3) * s
        b = m2 + m3 + (m2 - m3) * s
        da = m3 * p2
        da = (da & m) + (da >> 255) * 19
        cb = p3 * m2
        cb = (cb & m) + (cb >> 255) * 19
        a = a * a
        a = (a & m) + (a >> 255) * 19
        b = b * b
        b = (b & m) + (b >> 255) * 19
        x3 = da + cb
        x3 = x3 * x3
        x3 = (x3 & m) + (x3 >> 255) * 19
        x3 = (x3 & m) + (x3 >> 255) * 19
        z3 = da - cb
        z3 = z3 * z3
        z3 = (z3 & m) + (z3 >> 255) * 19
        z3 = z3 * x1
        z3 = (z3 & m) + (z3 >> 255) * 19
        z3 = (z3 & m) + (z3 >> 255) * 19
        x2 = a * b
        x2 = (x2 & m) + (x2 >> 255) * 19
        x2 = (x2 & m) + (x2 >> 255) * 19
        e = a - b
        z2 = e * (a + e * _A24)
        z2 = (z2 & m) + (z2 >> 255) * 19
        z2 = (z2 & m) + (z2 >> 255) * 19
    x2 = _mul(x2 % _P, _inv(z2 % _P)) % _P
    if x2 == 0:
        # Z = 0 (inverse 0) or X = 0: the peer's point has small order; RFC 7748 section 6.1.
        raise ValueError("x25519: all-zero shared secret")
    return x2.to_bytes(32, "little")


def _clamp(priv):
    if len(priv) != 32:
        raise ValueError("x25519: private key must be 32 bytes")
    k = bytearray(priv)
    k[0] &= 248
    k[31] = (k[31] & 127) | 64
    return k


def shared(priv, pub):
    k = _clamp(priv)
    if len(pub) != 32:
        raise ValueError("x25519: public key must be 32 bytes")
    # Top bit ignored; values p..2^255-1 are taken mod p, as RFC 7748 section 5 requires.
    return _ladder(k, (int.from_bytes(pub, "little") & _M) % _P)


def public_key(priv):
    return _ladder(_clamp(priv), 9)
