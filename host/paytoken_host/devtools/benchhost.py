"""Host-side reference operations for the bench: the same work done by the `cryptography` package.

Each factory prepares keys and data and returns a zero-argument callable that does one operation.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from cryptography.hazmat.primitives import hashes, hmac
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

Thunk = Callable[[], object]


def p256_keygen() -> Thunk:
    return lambda: ec.generate_private_key(ec.SECP256R1()).public_key()


def p256_sign() -> Thunk:
    key = ec.generate_private_key(ec.SECP256R1())
    msg = bytes(100)
    return lambda: key.sign(msg, ec.ECDSA(hashes.SHA256(), deterministic_signing=True))


def p256_verify() -> Thunk:
    key = ec.generate_private_key(ec.SECP256R1())
    msg = bytes(100)
    sig = key.sign(msg, ec.ECDSA(hashes.SHA256()))
    pub = key.public_key()
    return lambda: pub.verify(sig, msg, ec.ECDSA(hashes.SHA256()))


def p256_ecdh() -> Thunk:
    key = ec.generate_private_key(ec.SECP256R1())
    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    return lambda: key.exchange(ec.ECDH(), peer)


def x25519_shared() -> Thunk:
    key = x25519.X25519PrivateKey.generate()
    peer = x25519.X25519PrivateKey.generate().public_key()
    return lambda: key.exchange(peer)


def x25519_public() -> Thunk:
    raw = os.urandom(32)
    return lambda: x25519.X25519PrivateKey.from_private_bytes(raw).public_key()


def aesgcm_encrypt() -> Thunk:
    aead = AESGCM(bytes(32))
    pt, ad, nonce = bytes(256), bytes(32), bytes(12)
    return lambda: aead.encrypt(nonce, pt, ad)


def aesgcm_decrypt() -> Thunk:
    aead = AESGCM(bytes(32))
    ad, nonce = bytes(32), bytes(12)
    ct = aead.encrypt(nonce, bytes(256), ad)
    return lambda: aead.decrypt(nonce, ct, ad)


def hmac_sha256() -> Thunk:
    def run() -> bytes:
        h = hmac.HMAC(bytes(32), hashes.SHA256())
        h.update(bytes(64))
        return h.finalize()

    return run


def hkdf_sha256() -> Thunk:
    return lambda: HKDF(hashes.SHA256(), 64, b"salt", b"info").derive(bytes(32))
