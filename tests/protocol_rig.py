"""A payer and a payee on the real MicroPython unix port, driven message by message from pytest.

The issuer, certificates and keys are made on the host with `cryptography`; the sessions, wallets and
checks run in firmware. Messages pass through pytest, so a test can alter, drop or replay any of them.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from paytoken import wire
from paytoken_host import protocol
from tests.harness.mp import MicroPython

NOW = 1_790_000_000  # the devices' idea of the time
DAY = 86_400
USD = 840


def raw_x25519(key: x25519.X25519PrivateKey) -> tuple[bytes, bytes]:
    priv = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return priv, pub


@dataclass
class Device:
    device_id: bytes
    identity: ec.EllipticCurvePrivateKey
    cert: bytes
    static: tuple[bytes, bytes] | None = None  # X25519 (priv, pub) for payees

    @property
    def priv(self) -> bytes:
        return self.identity.private_numbers().private_value.to_bytes(32, "big")


@dataclass
class World:
    issuer: protocol.Issuer = field(default_factory=protocol.Issuer)
    backend: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def device(
        self,
        role: int,
        limits: protocol.Limits | None = None,
        not_before: int = NOW - DAY,
        not_after: int = NOW + 365 * DAY,
        issuer: protocol.Issuer | None = None,
        static: tuple[bytes, bytes] | None = None,
    ) -> Device:
        identity = ec.generate_private_key(ec.SECP256R1())
        device_id = os.urandom(8)
        if role & wire.ROLE_PAYEE and static is None:
            static = raw_x25519(x25519.X25519PrivateKey.generate())
        cert = (issuer or self.issuer).issue(
            device_id,
            role,
            protocol.sec1(identity.public_key()),
            static[1] if static and role & wire.ROLE_PAYEE else None,
            limits or protocol.Limits(),
            not_before,
            not_after,
        )
        return Device(device_id, identity, cert, static)

    @property
    def backend_pub(self) -> bytes:
        return protocol.sec1(self.backend.public_key())

    def voucher(self, device: Device, counter: int, amount: int, currency: int = USD) -> bytes:
        return protocol.sign(self.backend, wire.voucher_body(device.device_id, counter, amount, currency, NOW))

    def ack(self, device: Device, upto_seq: int, chain_hash: bytes, issued_at: int = NOW) -> bytes:
        return protocol.sign(self.backend, wire.ack_body(device.device_id, upto_seq, chain_hash, issued_at))

    def status(self, device: Device, txid: bytes, status: int) -> bytes:
        return protocol.sign(self.backend, wire.status_body(device.device_id, txid, status, NOW))


class Rig:
    """One MicroPython process holding a payer wallet `pw`, a payee wallet `ew`, and their sessions."""

    def __init__(self, mp: MicroPython, world: World, payer: Device, payee: Device, balance: int = 100_000):
        self.mp, self.world, self.payer, self.payee = mp, world, payer, payee
        self.dir = tempfile.mkdtemp(prefix="paytoken-ledgers-")
        mp.exec(
            "from paytoken import base45, payee, payer, reasons, trust, wallet, wire\n"
            f"T = trust.Trust({world.issuer.public!r}, backend_pub={world.backend_pub!r}, now={NOW})\n"
            f"pw = wallet.Wallet({self.dir + '/payer.log'!r}, {payer.priv!r}, {payer.cert!r}, T)\n"
            f"ew = wallet.Wallet({self.dir + '/payee.log'!r}, {payee.priv!r}, {payee.cert!r}, T)\n"
        )
        if balance:
            assert mp.eval(f"pw.apply_update({world.voucher(payer, 1, balance)!r})") is True

    def qr(self, amount: int | None = None, static_pub: bytes | None = None, nonce: bytes | None = None) -> bytes:
        assert self.payee.static
        return wire.qr_payload(
            self.payee.device_id[:4],
            bytes.fromhex("a4cf12345678"),
            False,
            static_pub or self.payee.static[1],
            nonce or os.urandom(8),
            amount,
            USD if amount is not None else None,
        )

    def open(self, qr: bytes, amount: int | None = None, static: tuple[bytes, bytes] | None = None) -> None:
        """Fresh sessions: ps (payer, from the QR text) and es (payee, showing qr)."""
        priv, pub = static or self.payee.static or (b"", b"")
        self.mp.exec(
            f"ps = payer.PayerSession(pw, T, base45.encode({qr!r}))\n"
            f"es = payee.PayeeSession(ew, T, {priv!r}, {pub!r}, {qr!r}, {amount!r})\n"
        )

    def call(self, expr: str):
        return self.mp.eval(expr)

    def state(self) -> dict:
        return self.mp.eval(
            "{'payer': [pw.balance, pw.counter, pw.offline_spent, [r[3] for r in pw.history()]],"
            " 'payee': [ew.balance, ew.seq, [r[3] for r in ew.history()]]}"
        )

    def pay(self, amount: int | None = 10_000, requested: int | None = None) -> dict:
        """A whole payment; returns the four messages."""
        self.open(self.qr(), requested)
        m1 = self.call("ps.start()")
        m2 = self.call(f"es.read_hello({m1!r})")
        self.call(f"ps.read_hello({m2!r})")
        m3 = self.call(f"ps.confirm({amount!r})")
        m4 = self.call(f"es.read_payment({m3!r})")
        self.call(f"ps.read_receipt({m4!r}) and None")
        return {"m1": m1, "m2": m2, "m3": m3, "m4": m4}
