"""The bank webhook's signature, shared by the sender (backend/outbox.py) and the sample receiver
(bank_receiver.py): hex HMAC-SHA256 over `timestamp + "." + body` with the secret both sides hold."""

from __future__ import annotations

import hashlib
import hmac


def signature(secret: bytes, timestamp: str | int, body: bytes) -> str:
    return hmac.new(secret, str(timestamp).encode() + b"." + body, hashlib.sha256).hexdigest()
