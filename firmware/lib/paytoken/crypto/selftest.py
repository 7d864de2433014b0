# Power-on known-answer tests: a device whose crypto is broken (bad build, corrupted flash, a wrong
# port) must refuse to sign or pay rather than produce bad signatures. Vectors from the RFCs and
# Wycheproof, so a failure here points at the platform, not at the vectors.
from binascii import unhexlify as _h

_P256_PRIV = "c9afa9d845ba75166b5c215767b1d6934e50c3db36e89b127b8a622b120f6721"  # RFC 6979 A.2.5
_P256_SIG = ("efd48b2aacb6a8fd1140dd9cd45e81d69d2c877b56aaf991c34d0ea84eaf3716"
             "f7cb1c942d657c41d436c7a1b6e29f65f3e900dbb9aff4064dc4ab2f843acda8")


def _hmac():
    from paytoken.crypto import kdf
    # RFC 4231 test case 2
    return kdf.hmac_sha256(b"Jefe", b"what do ya want for nothing?") == \
        _h("5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")


def _hkdf():
    from paytoken.crypto import kdf
    # RFC 5869 test case 1
    okm = kdf.hkdf_sha256(_h("000102030405060708090a0b0c"), b"\x0b" * 22, _h("f0f1f2f3f4f5f6f7f8f9"), 42)
    return okm == _h("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c5db02d56ecc4c5bf34007208d5b887185865")


def _x25519():
    from paytoken.crypto import x25519
    # RFC 7748 section 5.2, first vector
    return x25519.shared(_h("a546e36bf0527c9d3b16154b82465edd62144c0ac1fc5a18506a2244ba449ac4"),
                         _h("e6db6867583030db3594c1a424b15f7c726624ec26b3353b10a903a6d0ab1c4c")) == \
        _h("c3da55379de9c6908e94ea4df28d084f32eccf03491c71f754b4075577a28552")


def _aesgcm():
    from paytoken.crypto import aesgcm
    # Wycheproof aes_gcm_test tcId 91 (AES-256), both directions
    key = _h("92ace3e348cd821092cd921aa3546374299ab46209691bc28b8752d17f123c20")
    iv = _h("00112233445566778899aabb")
    aad = _h("00000000ffffffff")
    msg = _h("00010203040506070809")
    sealed = _h("e27abdd2d2a53d2f136b9a4a2579529301bcfb71c78d4060f52c")
    return aesgcm.encrypt(key, iv, msg, aad) == sealed and aesgcm.decrypt(key, iv, sealed, aad) == msg


def _p256_sign():
    from paytoken.crypto import p256
    return p256.sign(_h(_P256_PRIV), b"sample") == _h(_P256_SIG)


def _p256_verify():
    from paytoken.crypto import p256
    pub = p256.public_key(_h(_P256_PRIV))
    sig = _h(_P256_SIG)
    return p256.verify(pub, b"sample", sig) and not p256.verify(pub, b"samplf", sig)


def _p256_ecdh():
    from paytoken.crypto import p256
    # ECDH is symmetric: both orders must agree.
    a = _h(_P256_PRIV)
    b = _h("0612465c89a023ab17855b0a6bcebfd3febb53aef84138647b5352e02c10c346")
    return p256.ecdh(a, p256.public_key(b)) == p256.ecdh(b, p256.public_key(a))


_TESTS = (("hmac_sha256", _hmac), ("hkdf_sha256", _hkdf), ("x25519", _x25519), ("aesgcm", _aesgcm),
          ("p256_sign", _p256_sign), ("p256_verify", _p256_verify), ("p256_ecdh", _p256_ecdh))


def run():
    # Names of the failing primitives; empty when every primitive answered correctly. A primitive that
    # raises is as broken as one that answers wrongly.
    failures = []
    for name, test in _TESTS:
        try:
            ok = test()
        except Exception:
            ok = False
        if not ok:
            failures.append(name)
    return failures
