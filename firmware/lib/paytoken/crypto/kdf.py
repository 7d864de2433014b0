# HMAC-SHA256 (RFC 2104) and HKDF-SHA256 (RFC 5869) over hashlib.sha256.
from hashlib import sha256

from micropython import const

_BLOCK = const(64)
_HASHLEN = const(32)
_IPAD = int.from_bytes(b"\x36" * 64, "big")
_OPAD = int.from_bytes(b"\x5c" * 64, "big")


def _pads(key):
    if len(key) > _BLOCK:
        key = sha256(key).digest()
    k = int.from_bytes(key, "big") << (8 * (_BLOCK - len(key)))  # zero-padded on the right
    return (k ^ _IPAD).to_bytes(_BLOCK, "big"), (k ^ _OPAD).to_bytes(_BLOCK, "big")


def hmac_sha256(key, msg):
    ipad, opad = _pads(key)
    inner = sha256(ipad)
    inner.update(msg)
    outer = sha256(opad)
    outer.update(inner.digest())
    return outer.digest()


def hkdf_extract(salt, ikm):
    return hmac_sha256(salt if salt else bytes(_HASHLEN), ikm)


def hkdf_expand(prk, info, length):
    if length < 0 or length > 255 * _HASHLEN:
        raise ValueError("HKDF length out of range")
    ipad, opad = _pads(prk)
    out = bytearray()
    t = b""
    i = 1
    while len(out) < length:
        inner = sha256(ipad)
        inner.update(t)
        inner.update(info)
        inner.update(bytes((i,)))
        outer = sha256(opad)
        outer.update(inner.digest())
        t = outer.digest()
        out.extend(t)
        i += 1
    return bytes(out[:length])


def hkdf_sha256(salt, ikm, info, length):
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)
