"""Backend test rig: devices whose ledgers are real `paytoken.ledger` files written in the wallet's record formats
(on CPython, signed with `cryptography`), a backend on SQLite or PostgreSQL, and helpers to upload and fetch.

The record layouts and replay rules mirror firmware/lib/paytoken/wallet.py; test_backend_firmware.py checks the
same flows against the real wallet on MicroPython.
"""

from __future__ import annotations

import hashlib
import os
import socket
import struct
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import text

from paytoken import reasons, wire
from paytoken.ledger import ZERO_HASH, Ledger
from paytoken_host import protocol
from paytoken_host.backend import auth, db, local, migrate
from paytoken_host.backend import formats as F
from paytoken_host.backend.local import free_port, stop_server  # noqa: F401 (the tests' imports)
from paytoken_host.backend.service import ISSUER_SETTING, Backend

NOW = 1_790_000_000
DAY = 86_400
USD = 840
PG_URL = os.environ.get("PAYTOKEN_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")


class Clock:
    def __init__(self, t: float = NOW):
        self.t = t

    def __call__(self) -> float:
        return self.t


def pg_reachable() -> bool:
    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            pass
    except OSError:
        return False
    try:
        eng = db.make_engine(PG_URL)
        with eng.connect() as c:
            c.execute(text("SELECT 1"))
        eng.dispose()
        return True
    except Exception:
        return False


@dataclass
class Database:
    kind: str
    url: str
    cleanup: object = None


def make_database(kind: str, tmp: Path) -> Database:
    if kind == "sqlite":
        return Database(kind, f"sqlite:///{tmp}/backend.db")
    schema = f"ptk_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    admin = db.make_engine(PG_URL)
    with admin.begin() as c:
        c.execute(text(f"CREATE SCHEMA {schema}"))

    def drop() -> None:
        with admin.begin() as c:
            c.execute(text(f"DROP SCHEMA IF EXISTS {schema} CASCADE"))
        admin.dispose()

    return Database(kind, f"{PG_URL}?options=-csearch_path%3D{schema}", drop)


def database_params() -> list:
    reachable = pg_reachable()
    return ["sqlite", pytest.param("postgresql", marks=pytest.mark.skipif(
        not reachable, reason=f"PostgreSQL not reachable at {PG_URL}: backend tests ran on SQLite only"))]


@dataclass
class Device:
    device_id: bytes
    key: ec.EllipticCurvePrivateKey
    cert: bytes
    path: str
    role: int
    # the wallet's replay state (wallet.py)
    counter: int = 0
    prev_hash: bytes = ZERO_HASH
    offline_spent: int = 0
    rcvd: int = 0
    last_sent: tuple | None = None  # (counter, payment bytes)
    sent_log: list = field(default_factory=list)  # [seq, amount, voided]
    attach: dict = field(default_factory=dict)  # seq -> (payment, receipt) as recorded, for raw_batch

    def sign(self, body: bytes) -> bytes:
        return protocol.sign(self.key, body)

    def append(self, payload: bytes) -> int:
        led = Ledger(self.path)
        try:
            return led.append(payload)
        finally:
            led.close()

    def head(self) -> tuple[int, bytes]:
        led = Ledger(self.path)
        try:
            return led.head
        finally:
            led.close()

    def batch(self, since: int | None = None, certs: tuple = ()) -> str:
        return F.build_batch(self.path, self.cert, self.sign, since, certs)

    def raw_batch(self, since: int = 0) -> str:
        """A batch of the ledger as it is, with the payment and receipt bytes kept when they were recorded (no
        recomputation: a test can make a device whose signed payments disagree with its ledger)."""
        led = Ledger(self.path)
        try:
            recs = [F.Record(s, bytes(p), *self.attach.get(s, (None, None))) for s, p in led.records(since + 1)]
            base, (upto, h) = led.hash_at(since), led.head
        finally:
            led.close()
        head = self.sign(F.sync_head_body(self.device_id, since, base, upto, h))
        return F.batch_json(self.device_id, since, base, recs, head)

    def apply(self, raw: bytes) -> None:
        """Stores a backend message as the wallet would (without its refusal checks)."""
        kind = raw[0]
        if kind == wire.T_VOUCHER:
            self.append(bytes((F.K_VOUCHER,)) + raw)
        elif kind == wire.T_ACK:
            a = wire.decode_ack(raw)
            seq = self.append(bytes((F.K_ACK,)) + raw)
            self.offline_spent = sum(amt for s, amt, v in self.sent_log if a.upto_seq < s < seq and not v)
        elif kind == wire.T_STATUS:
            self.append(bytes((F.K_STATUS,)) + raw + struct.pack(">BI", wire.ROLE_PAYER, 0))


@dataclass
class World:
    tmp: Path
    issuer: protocol.Issuer = field(default_factory=protocol.Issuer)
    backend_key: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def device(self, role: int, limits: protocol.Limits | None = None, not_before: int = NOW - DAY,
               not_after: int = NOW + 365 * DAY, issuer: protocol.Issuer | None = None) -> Device:
        key = ec.generate_private_key(ec.SECP256R1())
        device_id = os.urandom(8)
        xpub = os.urandom(32) if role & wire.ROLE_PAYEE else None
        cert = (issuer or self.issuer).issue(device_id, role, protocol.sec1(key.public_key()), xpub,
                                             limits or protocol.Limits(), not_before, not_after)
        return Device(device_id, key, cert, str(self.tmp / f"{device_id.hex()}.log"), role)

    def voucher(self, dev: Device, counter: int, amount: int) -> bytes:
        return protocol.sign(self.backend_key, wire.voucher_body(dev.device_id, counter, amount, USD, NOW))


def make_payment(payer: Device, payee: Device, amount: int, t: int = NOW, currency: int = USD,
                 counter: int | None = None, prev_hash: bytes | None = None, offline_spent: int | None = None
                 ) -> bytes:
    c = payer.counter + 1 if counter is None else counter
    body = wire.payment_body(wire.txid(payer.device_id, c), payer.device_id, payee.device_id, amount, currency, c,
                             payer.offline_spent if offline_spent is None else offline_spent,
                             payer.prev_hash if prev_hash is None else prev_hash, os.urandom(8), os.urandom(32), t)
    return payer.sign(body)


def record_sent(payer: Device, payment: bytes) -> int:
    p = wire.decode_payment(payment)
    phash = hashlib.sha256(payment).digest()
    seq = payer.append(bytes((F.K_SENT,)) + struct.pack(F.SENT_FMT, p.payee_id, p.amount, p.qr_nonce,
                                                        p.handshake_hash, p.time, phash))
    payer.counter, payer.prev_hash = p.counter, phash
    payer.offline_spent += p.amount
    payer.last_sent = (p.counter, payment)
    payer.sent_log.append([seq, p.amount, False])
    payer.attach[seq] = (payment, None)
    return seq


def record_rcvd(payee: Device, payment: bytes, status: int = reasons.OK, t: int = NOW) -> bytes:
    p = wire.decode_payment(payment)
    receipt = payee.sign(wire.receipt_body(hashlib.sha256(payment).digest(), status, payee.rcvd + 1, t))
    seq = payee.append(bytes((F.K_RCVD,)) + struct.pack(
        F.RCVD_FMT, p.payer_id, p.amount, p.currency, p.counter, p.offline_spent, p.prev_hash, p.qr_nonce,
        p.handshake_hash, p.time, wire.signature(payment), status, t))
    payee.rcvd += 1
    payee.attach[seq] = (payment, receipt)
    return receipt


def record_result(payer: Device, receipt: bytes) -> None:
    rc = wire.decode_receipt(receipt)
    seq = payer.append(bytes((F.K_RESULT,)) + struct.pack(F.RESULT_FMT, rc.status, rc.payee_seq, rc.time,
                                                          wire.signature(receipt)))
    payer.attach[seq] = (None, receipt)
    if rc.status != reasons.OK:
        payer.offline_spent -= payer.sent_log[-1][1]
        payer.sent_log[-1][2] = True
    payer.last_sent = None


def pay(payer: Device, payee: Device, amount: int, receipt_to_payer: bool = True, payee_keeps: bool = True,
        status: int = reasons.OK) -> bytes:
    """A whole offline payment, as both ledgers store it; returns the payment's txid."""
    payment = make_payment(payer, payee, amount)
    record_sent(payer, payment)
    if payee_keeps:
        receipt = record_rcvd(payee, payment, status)
        if receipt_to_payer:
            record_result(payer, receipt)
    return wire.decode_payment(payment).txid


def paid_and_uploaded(world: World, backend: Backend, load: int, amounts: list[int]) -> tuple[Device, Device]:
    """A registered payer loaded with `load`, its payments of `amounts` to a registered payee, and the payee's
    upload: the backend has settled them and queued a topup and a settlement for the bank."""
    payer, payee = world.device(wire.ROLE_PAYER), world.device(wire.ROLE_PAYEE)
    for d in (payer, payee):
        backend.register(d.cert)
    payer.apply(bytes.fromhex(backend.issue_voucher(payer.device_id, load)["voucher"]))
    for amount in amounts:
        pay(payer, payee, amount)
    backend.upload(payee.batch().encode())
    return payer, payee


def new_backend(database: Database, world: World, clock: Clock | None = None, **kw) -> Backend:
    engine = db.make_engine(database.url)
    migrate.upgrade(engine)
    with db.write_tx(engine) as conn:
        if db.get_setting(conn, ISSUER_SETTING) is None:
            db.set_setting(conn, ISSUER_SETTING, world.issuer.public.hex())
    return Backend(engine, world.backend_key, clock=clock or Clock(), **kw)


def tokens(backend: Backend) -> dict[str, str]:
    with db.write_tx(backend.engine) as conn:
        return {role: auth.create_token(conn, f"test-{role}", role, NOW) for role in auth.ROLES}


def updates_auth(dev: Device, since: int = 0, t: int = NOW, nonce: bytes | None = None, rl_version: int = 0) -> str:
    body = F.updates_request_body(dev.device_id, since, rl_version, t, nonce or os.urandom(16))
    return "PaytokenDevice " + dev.sign(body).hex()


def start_server(db_url: str, key_path: str, port: int, workers: int = 2, extra_env: dict | None = None,
                 log: str | None = None) -> subprocess.Popen:
    """paytoken_host.backend.local.start_server with the rig's passphrase and no background worker."""
    env = {**os.environ, "PAYTOKEN_KEY_PASSPHRASE": "test-passphrase", "PAYTOKEN_BACKGROUND_INTERVAL": "0",
           **(extra_env or {})}
    return local.start_server(db_url, key_path, port, env, workers, log)


def init_cli(db_url: str, world: World, tmp: Path) -> str:
    """Database and backend key made with the operator's CLI, as a deployment would; returns the key path."""
    env = {**os.environ, "PAYTOKEN_KEY_PASSPHRASE": "test-passphrase"}
    pub = tmp / "issuer.pub"
    pub.write_text(world.issuer.public.hex())
    key = tmp / "backend.key"
    from cryptography.hazmat.primitives import serialization

    fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(world.backend_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                serialization.BestAvailableEncryption(b"test-passphrase")))
    subprocess.run([sys.executable, "-m", "paytoken_host.backend.cli", "init", "--db", db_url, "--issuer-pub",
                    str(pub)], env=env, check=True, capture_output=True)
    return str(key)
