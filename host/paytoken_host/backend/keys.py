"""Key files: P-256 private keys in PKCS#8 PEM, encrypted at rest with a passphrase, readable by the owner only."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from paytoken_host import protocol

PASSPHRASE_ENV = "PAYTOKEN_KEY_PASSPHRASE"


def create_key_file(path: str | Path, passphrase: bytes) -> ec.EllipticCurvePrivateKey:
    """A new P-256 key written to path (mode 0600, refusing to overwrite) and its public key to path + '.pub'
    (SEC1 uncompressed, hex)."""
    if len(passphrase) < 8:
        raise ValueError("passphrase: at least 8 characters")
    path = Path(path)
    key = ec.generate_private_key(protocol.CURVE)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.BestAvailableEncryption(passphrase))
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    Path(str(path) + ".pub").write_text(protocol.sec1(key.public_key()).hex() + "\n")
    return key


def load_key_file(path: str | Path, passphrase: bytes) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(Path(path).read_bytes(), passphrase)
    if not isinstance(key, ec.EllipticCurvePrivateKey) or not isinstance(key.curve, ec.SECP256R1):
        raise ValueError("not a P-256 key")
    return key


def passphrase_from_env() -> bytes:
    value = os.environ.get(PASSPHRASE_ENV)
    if not value:
        raise ValueError(f"set {PASSPHRASE_ENV} to the key file's passphrase")
    return value.encode()


def read_public(path: str | Path) -> bytes:
    """An issuer public key from a .pub file (hex SEC1) or from a key file's public half."""
    text = Path(path).read_text().strip()
    pub = bytes.fromhex(text)
    ec.EllipticCurvePublicKey.from_encoded_point(protocol.CURVE, pub)  # validates the point
    return protocol.sec1(ec.EllipticCurvePublicKey.from_encoded_point(protocol.CURVE, pub))


NOISE_INFO = b"paytoken backend noise static v1"


def noise_static(key: ec.EllipticCurvePrivateKey) -> tuple[bytes, bytes]:
    """The backend's X25519 static key for devices' sync sessions (docs/protocol.md §10), derived from its P-256
    key with HKDF-SHA256 and a label of its own: one secret to keep, back up and rotate, and the two keys stay
    unrelated to anyone without it (docs/security.md, "Keys"). Returns (private, public), raw 32 bytes each."""
    scalar = key.private_numbers().private_value.to_bytes(32, "big")
    seed = HKDF(hashes.SHA256(), 32, salt=None, info=NOISE_INFO).derive(scalar)
    priv = x25519.X25519PrivateKey.from_private_bytes(seed)
    raw = (serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    return priv.private_bytes(*raw), priv.public_key().public_bytes(serialization.Encoding.Raw,
                                                                     serialization.PublicFormat.Raw)
