"""Who may call what.

Operators: API tokens (`ptk_` + 32 random bytes in URL-safe base64), given once at creation and stored only as
their SHA-256, each with one role: `provisioning` (register and revoke devices), `treasury` (issue top-up
vouchers, run the expiry), `auditor` (read devices, balances, payments, alerts, journal, metrics).
Devices: a request signed with the device's identity key (formats.UpdatesRequest: device id, status cursor, revocation
list version, time and a fresh nonce), sent as `Authorization: PaytokenDevice <hex>` (with `since` and `rl_version`
in the query as signed); the time must be within CLOCK_SKEW of the backend's and each nonce is accepted once (stored
until it could no longer pass the time check).
"""

from __future__ import annotations

import base64
import hashlib
import os

from sqlalchemy import Connection, delete, insert, select
from sqlalchemy.exc import IntegrityError

from paytoken import wire
from paytoken_host.backend import db
from paytoken_host.backend import formats as F
from paytoken_host.backend.verify import Reject, signed_by

ROLES = ("provisioning", "treasury", "auditor")
CLOCK_SKEW = 300


def token_hash(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def create_token(conn: Connection, name: str, role: str, now: int) -> str:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    token = "ptk_" + base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
    conn.execute(insert(db.api_tokens).values(name=name, role=role, token_hash=token_hash(token), created_at=now))
    return token


def operator(conn: Connection, authorization: str | None, roles: tuple[str, ...]) -> str:
    """The token's name if it holds one of roles; Reject 401 without a valid token, 403 with the wrong role."""
    if not authorization or not authorization.startswith("Bearer "):
        raise Reject(401, "operator endpoint: send Authorization: Bearer <token>")
    token = authorization[len("Bearer "):].strip()
    row = conn.execute(select(db.api_tokens.c.name, db.api_tokens.c.role, db.api_tokens.c.revoked_at)
                       .where(db.api_tokens.c.token_hash == token_hash(token))).first()
    if row is None or row.revoked_at is not None:
        raise Reject(401, "unknown or revoked token")
    if row.role not in roles:
        raise Reject(403, f"role {row.role!r} may not do this (needs {' or '.join(roles)})")
    return row.name


def device_request(conn: Connection, authorization: str | None, device_id: bytes, since: int,
                   cert_of, now: int, rl_version: int = 0) -> F.UpdatesRequest:
    """A verified, fresh, first-seen device request for device_id's own updates."""
    if not authorization or not authorization.startswith("PaytokenDevice "):
        raise Reject(401, "device endpoint: send Authorization: PaytokenDevice <signed request, hex>")
    try:
        req = F.decode_updates_request(bytes.fromhex(authorization[len("PaytokenDevice "):].strip()))
    except (ValueError, wire.WireError) as e:
        raise Reject(401, f"device request: {e}") from None
    _signed_by_device(req, cert_of)
    if req.device_id != device_id:
        raise Reject(403, "a device may read only its own updates")
    if req.since != since:
        raise Reject(401, "device request: signed cursor differs from the query")
    if req.rl_version != rl_version:
        raise Reject(401, "device request: signed revocation list version differs from the query")
    if abs(req.time - now) > CLOCK_SKEW:
        raise Reject(401, f"device request: time {req.time} is more than {CLOCK_SKEW} s from the backend's {now}")
    conn.execute(delete(db.nonces).where(db.nonces.c.expires_at < now))
    try:
        with conn.begin_nested():
            conn.execute(insert(db.nonces).values(device_id=req.device_id, nonce=req.nonce,
                                                  expires_at=now + 2 * CLOCK_SKEW))
    except IntegrityError:
        raise Reject(401, "device request: nonce already used (replay)") from None
    return req


def _signed_by_device(req: F.UpdatesRequest, cert_of) -> None:
    cert = cert_of(req.device_id)
    if cert is None:
        raise Reject(401, "device request: unknown device")
    if not signed_by(cert.identity_pub, req.raw):
        raise Reject(401, "device request: signature does not verify")


def sealed_request(raw: bytes, ephemeral: bytes, cert_of) -> F.UpdatesRequest:
    """A verified updates request from inside a sealed exchange: signed by its device, its nonce the first 16
    bytes of the handshake's ephemeral key. No time or first-seen check: only that device's ephemeral key reads
    the answer, so a replayed message 1 gains its sender nothing (docs/security.md, "Sealed sync")."""
    try:
        req = F.decode_updates_request(raw)
    except wire.WireError as e:
        raise Reject(400, f"device request: {e}") from None
    _signed_by_device(req, cert_of)
    if req.nonce != ephemeral[:16]:
        raise Reject(401, "device request: not bound to this handshake (nonce is not its ephemeral key)")
    return req
