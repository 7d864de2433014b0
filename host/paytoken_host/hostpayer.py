"""A payer on the host: pays a paytoken payee terminal over BLE with bleak, as a payer card would.

    python -m paytoken_host.hostpayer --qr=TEXT --key identity.key --cert cert.bin --issuer issuer.pub \\
        --amount 100.00 [--backend sim|native] [--radio HOST:PORT] [--state FILE] [--json]

An implementation of the payer's side (docs/protocol.md sections 2, 4, 5, 8 and 9) independent of the firmware's:
Noise_NK_25519_AESGCM_SHA256 from the `noiseprotocol` package, signatures with `cryptography`
(paytoken_host.protocol); what it shares with the firmware is the definition of the bytes: `paytoken.wire`
(certificates, payments, receipts, session messages, the QR), `paytoken.framing` (GATT frames), `paytoken.base45`,
`paytoken.ble.gatt` (UUIDs, nonce tag, control frames) and `paytoken.reasons`.

The payee is found at the QR's address, or else by a scan for the paytoken service advertising the QR nonce's tag.
The payer's counter, hash chain, offline spending and the nonces it paid live in a JSON state file (default: the
key file's name + ".state.json"); the debit is written there before the signed payment leaves, as on the card.
There is no balance: the host payer is a development and test tool, its spending bounded by its certificate's
limits, which it checks before signing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from bleak import BleakClient, BleakScanner
from bleak.backends.characteristic import BleakGATTCharacteristic
from bleak.backends.device import BLEDevice
from bleak.backends.scanner import AdvertisementData
from bleak.exc import BleakDeviceNotFoundError, BleakError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from noise.connection import Keypair, NoiseConnection

from paytoken import base45, framing, reasons, wire
from paytoken.ble import gatt
from paytoken.link import BUSY, CLOSED, FRAME, TIMEOUT, UNREACHABLE, LinkError
from paytoken_host import protocol

NOISE_PROTOCOL = b"Noise_NK_25519_AESGCM_SHA256"
PROLOGUE = b"paytoken/1"  # docs/protocol.md section 2: the prologue is this followed by the QR payload

CONNECT_S = 10.0  # finding and connecting to the payee, up to READY
ANSWER_S = 10.0  # message 2: the payee checks our certificate
RECEIPT_S = 10.0  # message 4
WRITE_S = 5.0  # one frame's write response
PAYMENT_UUIDS = (gatt.SERVICE_UUID, gatt.WRITE_UUID, gatt.NOTIFY_UUID)

CURRENCIES = {840: ("USD", 2), 978: ("EUR", 2), 826: ("GBP", 2), 756: ("CHF", 2), 392: ("JPY", 0)}

_LINK_REASONS = {UNREACHABLE: reasons.UNREACHABLE, BUSY: reasons.BUSY, TIMEOUT: reasons.TIMEOUT,
                 CLOSED: reasons.LINK, FRAME: reasons.LINK}


class PaymentError(Exception):
    """The payment did not complete. `code` is a paytoken.reasons code; `unconfirmed` is True when the signed
    payment left and no valid receipt came back (it stays reserved until the backend settles it)."""

    def __init__(self, code: int, detail: str = "", step: str = "", unconfirmed: bool = False):
        super().__init__(reasons.name(code) + (f": {detail}" if detail else ""))
        self.code = code
        self.step = step
        self.unconfirmed = unconfirmed


def link_error(exc: LinkError, step: str) -> PaymentError:
    return PaymentError(_LINK_REASONS.get(exc.reason, reasons.LINK), str(exc), step)


# --------------------------------------------------------------------------- amounts, QR


def currency_name(code: int) -> str:
    return CURRENCIES.get(code, (str(code), 2))[0]


def minor_digits(code: int) -> int:
    return CURRENCIES.get(code, (str(code), 2))[1]


def format_amount(amount: int, currency: int) -> str:
    digits = minor_digits(currency)
    value = Decimal(amount).scaleb(-digits)
    return f"{value:.{digits}f} {currency_name(currency)}"


def parse_amount(text: str, digits: int = 2) -> int:
    """ "100.00" (major units, at most `digits` decimals) -> 10000 minor units. ValueError with the reason."""
    try:
        value = Decimal(text.strip())
    except InvalidOperation:
        raise ValueError(f"not an amount: {text!r} (write it as 100.00)") from None
    if not value.is_finite() or value <= 0:
        raise ValueError(f"the amount must be positive, got {text!r}")
    minor = value.scaleb(digits)
    if minor != minor.to_integral_value():
        raise ValueError(f"{text!r} has more than {digits} decimals")
    if minor > 0xFFFFFFFF:
        raise ValueError(f"{text!r} is too large for a payment")
    return int(minor)


def parse_qr(text: str) -> wire.QrPayload:
    """The QR as scanned (base45 text) -> its payload; PaymentError(FORMAT) for anything else. A scanner's line
    ending is dropped; spaces are not: space is one of base45's characters."""
    try:
        return wire.decode_qr(base45.decode(text.strip("\r\n")))
    except (ValueError, UnicodeError) as exc:
        raise PaymentError(reasons.FORMAT, f"not a paytoken QR ({exc})", "scan") from None


# --------------------------------------------------------------------------- identity and state


@dataclass
class PayerIdentity:
    """What provisioning gives a payer: its P-256 identity key, its certificate and the issuer's public key."""

    key: ec.EllipticCurvePrivateKey
    cert: wire.Certificate
    issuer_pub: bytes

    @classmethod
    def load(cls, key_path: Path, cert_path: Path, issuer_path: Path) -> PayerIdentity:
        """From the files a device store holds (identity.key: 32-byte scalar, or a PEM key; cert.bin;
        issuer.pub: 65-byte SEC1). ValueError saying which file is wrong and how."""
        key = load_key(key_path)
        try:
            issuer_pub = issuer_path.read_bytes()
            if len(issuer_pub) != 65 or issuer_pub[0] != 4:
                raise ValueError("expected the issuer's 65-byte uncompressed SEC1 public key")
            ec.EllipticCurvePublicKey.from_encoded_point(protocol.CURVE, issuer_pub)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{issuer_path}: {exc}") from None
        try:
            cert = protocol.verify_cert(cert_path.read_bytes(), issuer_pub)
        except (OSError, ValueError) as exc:
            raise ValueError(f"{cert_path}: {exc}") from None
        if not cert.role & wire.ROLE_PAYER:
            raise ValueError(f"{cert_path}: the certificate does not hold the payer role")
        if protocol.sec1(key.public_key(), compressed=True) != cert.identity_pub:
            raise ValueError(f"{key_path}: this key is not the one {cert_path} certifies")
        return cls(key, cert, issuer_pub)


def load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    try:
        data = path.read_bytes()
        if data.lstrip().startswith(b"-----BEGIN"):
            key = serialization.load_pem_private_key(data, password=None)
            if not isinstance(key, ec.EllipticCurvePrivateKey) or key.curve.name != protocol.CURVE.name:
                raise ValueError("not a P-256 private key")
            return key
        if len(data) != 32:
            raise ValueError(f"expected a 32-byte P-256 private scalar (or a PEM key), got {len(data)} bytes")
        return ec.derive_private_key(int.from_bytes(data, "big"), protocol.CURVE)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"{path}: {exc}") from None


@dataclass
class PayerState:
    """The payer's own record: counter, hash chain head, offline spending, the nonces it paid and every payment
    with its receipt. Saved atomically (written beside, then renamed over) before anything leaves."""

    path: Path
    device_id: str
    counter: int = 0
    prev_hash: str = "00" * wire.HASH_LEN
    offline_spent: int = 0
    nonces: list[str] = field(default_factory=list)
    payments: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path, device_id: bytes) -> PayerState:
        if not path.exists():
            return cls(path, device_id.hex())
        try:
            d = json.loads(path.read_text())
            state = cls(path, d["device_id"], int(d["counter"]), d["prev_hash"], int(d["offline_spent"]),
                        list(d["nonces"]), list(d["payments"]))
            if len(bytes.fromhex(state.prev_hash)) != wire.HASH_LEN or state.counter < 0 or state.offline_spent < 0:
                raise ValueError("counter, chain or spending out of range")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{path}: not a host payer state file ({exc})") from None
        if state.device_id != device_id.hex():
            raise ValueError(f"{path}: the state of payer {state.device_id}, not of {device_id.hex()}")
        return state

    def save(self) -> None:
        d = {k: getattr(self, k) for k in ("device_id", "counter", "prev_hash", "offline_spent", "nonces",
                                           "payments")}
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w") as f:
            json.dump(d, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)

    def nonce_used(self, nonce: bytes) -> bool:
        return nonce.hex() in self.nonces


# --------------------------------------------------------------------------- the session


@dataclass(frozen=True)
class Offer:
    payee_id: bytes
    amount: int | None  # None: the payer enters it
    currency: int
    payee_cert: wire.Certificate


class HostPayerSession:
    """The payer's side of one session (protocol.md section 2), bytes in and out:
    hello() -> read_hello(msg2) -> confirm(amount, state) -> read_receipt(msg4, state); or decline(reason)."""

    def __init__(self, identity: PayerIdentity, qr: wire.QrPayload, now: int):
        self.identity = identity
        self.qr = qr
        self.now = now
        self.noise = NoiseConnection.from_name(NOISE_PROTOCOL)
        self.noise.set_as_initiator()
        self.noise.set_prologue(PROLOGUE + qr.raw)
        self.noise.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, qr.x25519_pub)
        self.noise.start_handshake()
        self.offer: Offer | None = None
        self.payment: bytes | None = None
        self.handshake_hash = b""

    def hello(self) -> bytes:
        return bytes(self.noise.write_message(wire.payer_hello(self.identity.cert.raw)))

    def read_hello(self, msg: bytes) -> Offer:
        try:
            payload = bytes(self.noise.read_message(msg))
        except Exception as exc:  # noqa: BLE001 - any failure to decrypt: not the holder of the QR's key
            raise PaymentError(reasons.KEY_MISMATCH, f"payee did not prove the QR key ({exc!r})", "hello") from None
        try:
            hello = wire.decode_payee_hello(payload)
        except ValueError as exc:
            raise PaymentError(reasons.FORMAT, str(exc), "hello") from None
        if hello.status:
            raise PaymentError(hello.status, "refused by the payee", "hello")
        cert = self.check_payee_cert(hello.cert)
        qr = self.qr
        if cert.x25519_pub != qr.x25519_pub:
            raise PaymentError(reasons.KEY_MISMATCH, "the certificate's key is not the QR's", "hello")
        if cert.device_id[: wire.WALLET_SHORT_LEN] != qr.wallet_short:
            raise PaymentError(reasons.WALLET_ID, "the certificate is not the QR's wallet", "hello")
        if hello.currency != cert.currency or cert.currency != self.identity.cert.currency:
            raise PaymentError(reasons.CURRENCY, step="hello")
        amount = hello.amount or None
        if qr.amount is not None and (qr.amount != amount or qr.currency != hello.currency):
            raise PaymentError(reasons.AMOUNT, "the QR and the payee ask for different amounts", "hello")
        self.handshake_hash = self.noise.get_handshake_hash()
        self.offer = Offer(cert.device_id, amount, hello.currency, cert)
        return self.offer

    def check_payee_cert(self, raw: bytes) -> wire.Certificate:
        """As the device's Trust.check_cert: issuer, signature, validity now, role (no revocation list here)."""
        try:
            cert = wire.decode_cert(raw)
        except ValueError as exc:
            raise PaymentError(reasons.FORMAT, str(exc), "hello") from None
        if cert.issuer_key_id != protocol.key_id(self.identity.issuer_pub):
            raise PaymentError(reasons.CERT_ISSUER, step="hello")
        if not protocol.signed_by(self.identity.issuer_pub, cert.raw):
            raise PaymentError(reasons.CERT_INVALID, step="hello")
        if not cert.not_before <= self.now <= cert.not_after:
            raise PaymentError(reasons.CERT_EXPIRED, step="hello")
        if not cert.role & wire.ROLE_PAYEE:
            raise PaymentError(reasons.ROLE, step="hello")
        return cert

    def check_amount(self, amount: int, state: PayerState) -> int | None:
        """The reason this payer may not pay `amount` now, or None."""
        assert self.offer is not None
        cert = self.identity.cert
        if amount <= 0 or (self.offer.amount is not None and amount != self.offer.amount):
            return reasons.AMOUNT
        if amount > cert.limit_payment:
            return reasons.LIMIT_PAYMENT
        if state.offline_spent + amount > cert.limit_offline:
            return reasons.LIMIT_OFFLINE
        if not cert.not_before <= self.now <= cert.not_after:
            return reasons.CERT_EXPIRED
        return None

    def confirm(self, amount: int, state: PayerState) -> bytes:
        """Sign the payment and store the debit (counter, chain, spending, nonce) before returning message 3."""
        offer = self.offer
        assert offer is not None and self.check_amount(amount, state) is None
        payer_id = self.identity.cert.device_id
        counter = state.counter + 1
        body = wire.payment_body(wire.txid(payer_id, counter), payer_id, offer.payee_id, amount, offer.currency,
                                 counter, state.offline_spent, bytes.fromhex(state.prev_hash), self.qr.nonce,
                                 self.handshake_hash, self.now)
        payment = protocol.sign(self.identity.key, body)
        state.counter = counter
        state.prev_hash = protocol.payment_hash(payment).hex()
        state.offline_spent += amount
        state.nonces.append(self.qr.nonce.hex())
        state.payments.append({"payment": payment.hex(), "receipt": None, "status": "unconfirmed",
                               "payee_cert": offer.payee_cert.raw.hex()})
        state.save()
        self.payment = payment
        return bytes(self.noise.encrypt(wire.payment_msg(payment)))

    def decline(self, reason: int) -> bytes:
        return bytes(self.noise.encrypt(wire.abort_msg(reason)))

    def read_receipt(self, msg: bytes, state: PayerState) -> wire.Receipt:
        offer, payment = self.offer, self.payment
        assert offer is not None and payment is not None
        try:
            raw = wire.decode_receipt_msg(bytes(self.noise.decrypt(msg)))
            receipt = protocol.verify_receipt(raw, offer.payee_cert, payment)
        except Exception as exc:  # noqa: BLE001 - undecryptable, malformed or not the payee's signature
            raise PaymentError(reasons.RECEIPT, f"no valid receipt ({exc})", "receipt", unconfirmed=True) from None
        record = state.payments[-1]
        record["receipt"] = raw.hex()
        if receipt.status != reasons.OK:
            record["status"] = "voided"  # a signed refusal: the payment can never settle
            state.offline_spent -= wire.decode_payment(payment).amount
            state.save()
            raise PaymentError(receipt.status, "refused by the payee (signed receipt)", "receipt")
        record["status"] = "paid"
        state.save()
        return receipt


# --------------------------------------------------------------------------- the BLE link (bleak)


@dataclass(frozen=True)
class Radio:
    """Which bleak backend: the host's Bluetooth ("native") or the simulated radio ("sim", broker at `radio` or
    PAYTOKEN_RADIO)."""

    backend: str = "native"
    radio: str | None = None

    def scanner_kwargs(self) -> dict[str, Any]:
        if self.backend == "native":
            return {}
        from paytoken_host.simradio.bleak_backend import SimBleakScanner

        return {"backend": SimBleakScanner, "radio": self.radio}

    def client_kwargs(self) -> dict[str, Any]:
        if self.backend == "native":
            return {}
        from paytoken_host.simradio.bleak_backend import SimBleakClient

        return {"backend": SimBleakClient, "radio": self.radio}


def advertises_nonce(ad: AdvertisementData, nonce: bytes) -> bool:
    """The advertising of the payee showing the QR with this nonce (protocol.md section 9, "Advertising")."""
    tag = bytes((gatt.ADV_FORMAT,)) + gatt.nonce_tag(nonce)
    return gatt.SERVICE_UUID in ad.service_uuids and ad.manufacturer_data.get(gatt.COMPANY_ID) == tag


class BleakLink:
    """One session's messages over paytoken's GATT service (protocol.md section 9), the payer's end, on bleak.
    send/recv/close/closed as paytoken.link; LinkError with its reasons."""

    def __init__(self, client: BleakClient, write_char: BleakGATTCharacteristic, frame_size: int):
        self.client = client
        self.write_char = write_char
        self.frame_size = frame_size
        self.frames: asyncio.Queue[bytes | None] = asyncio.Queue()  # None: the link dropped
        self.reassembler = framing.Reassembler()
        self.sent = 0
        self.closed = False

    @classmethod
    async def connect(cls, qr: wire.QrPayload, radio: Radio, timeout: float = CONNECT_S) -> BleakLink:
        deadline = asyncio.get_running_loop().time() + timeout
        return await cls.open(await find_payee(qr, radio, timeout), radio, deadline)

    @classmethod
    async def open(cls, device: BLEDevice, radio: Radio, deadline: float, uuids: tuple[str, str, str] = PAYMENT_UUIDS,
                   what: str = "payee") -> BleakLink:
        """Connect to `device` and open a session on the service `uuids` (service, write, notify) by loop time
        `deadline`: subscribe, OPEN, READY (protocol.md section 9; the sync service opens the same way)."""
        loop = asyncio.get_running_loop()
        service_uuid, write_uuid, notify_uuid = uuids
        holder: list[BleakLink] = []

        def gone(_: BleakClient) -> None:
            if holder:
                holder[0].closed = True
                holder[0].frames.put_nowait(None)

        client = BleakClient(device, gone, timeout=max(0.5, deadline - loop.time()), **radio.client_kwargs())
        try:
            await client.connect()
        except (BleakDeviceNotFoundError, TimeoutError) as exc:
            raise LinkError(UNREACHABLE, f"no connection to {device.address} ({exc or type(exc).__name__})") \
                from None
        except BleakError as exc:
            raise LinkError(UNREACHABLE, f"{device.address}: {exc}") from None
        try:
            service = client.services.get_service(service_uuid)
            write = service and service.get_characteristic(write_uuid)
            notify = service and service.get_characteristic(notify_uuid)
            if not (write and notify and "write" in write.properties and "notify" in notify.properties):
                raise LinkError(UNREACHABLE,
                                f"{device.address} is not a paytoken {what} (no service or characteristic)")
            frame = min(write.max_write_without_response_size, gatt.PREFERRED_MTU - 3)
            link = cls(client, write, max(framing.MIN_FRAME, min(frame, framing.MAX_FRAME)))
            holder.append(link)
            async with asyncio.timeout(max(0.1, deadline - loop.time())):
                await client.start_notify(notify, lambda _c, data: link.frames.put_nowait(bytes(data)))
                await client.write_gatt_char(write, gatt.OPEN_FRAME, response=True)
                first = await link.frames.get()
            if first is None:
                raise LinkError(CLOSED, f"the {what} disconnected before READY")
            if first == gatt.BUSY_FRAME:
                raise LinkError(BUSY, f"the {what} serves another peer")
            if first != gatt.READY_FRAME:
                raise LinkError(FRAME, f"expected READY, got {first[:8].hex()}")
            return link
        except BaseException as exc:
            with contextlib.suppress(BleakError, OSError, TimeoutError):
                await client.disconnect()
            if isinstance(exc, TimeoutError):
                raise LinkError(TIMEOUT, f"the {what} did not open the session in time") from None
            if isinstance(exc, BleakError):
                raise LinkError(CLOSED, str(exc)) from None
            raise

    async def send(self, msg: bytes) -> None:
        if self.closed:
            raise LinkError(CLOSED)
        try:
            for frame in framing.split(msg, self.frame_size, self.sent):
                async with asyncio.timeout(WRITE_S):
                    await self.client.write_gatt_char(self.write_char, frame, response=True)
        except TimeoutError:
            await self.close()
            raise LinkError(TIMEOUT, "no write response") from None
        except BleakError as exc:
            await self.close()
            raise LinkError(CLOSED, str(exc)) from None
        self.sent += 1

    async def recv(self, timeout: float) -> bytes:
        try:
            async with asyncio.timeout(timeout):
                while True:
                    frame = await self.frames.get()
                    if frame is None:
                        self.frames.put_nowait(None)  # later calls see it too
                        raise LinkError(CLOSED, "the link dropped")
                    try:
                        msg = self.reassembler.feed(frame)
                    except framing.FrameError as exc:
                        await self.close()
                        raise LinkError(FRAME, exc.reason) from None
                    if msg is not None:
                        return msg
        except TimeoutError:
            raise LinkError(TIMEOUT, "no message in time") from None

    async def close(self) -> None:
        self.closed = True
        with contextlib.suppress(BleakError, OSError, TimeoutError):
            await self.client.disconnect()


async def find_payee(qr: wire.QrPayload, radio: Radio, timeout: float) -> BLEDevice:
    """The payee at the QR's address; failing that (within half the time), one advertising the paytoken service
    with the QR nonce's tag. LinkError(UNREACHABLE) if neither shows up."""
    address = ":".join(f"{b:02X}" for b in qr.ble_addr)
    kwargs = radio.scanner_kwargs()
    try:
        device = await BleakScanner.find_device_by_address(address, timeout=timeout / 2, **kwargs)
        if device is None:
            device = await BleakScanner.find_device_by_filter(
                lambda d, ad: advertises_nonce(ad, qr.nonce), timeout=timeout / 2,
                service_uuids=[gatt.SERVICE_UUID], **kwargs)
    except BleakError as exc:
        raise LinkError(UNREACHABLE, str(exc)) from None
    if device is None:
        raise LinkError(UNREACHABLE, f"no payee at {address} nor one advertising this QR")
    return device


# --------------------------------------------------------------------------- a payment


@dataclass
class Paid:
    amount: int
    currency: int
    payer_id: bytes
    payee_id: bytes
    counter: int
    payment: bytes
    receipt: wire.Receipt
    payee_cert: bytes

    def as_dict(self) -> dict[str, Any]:
        return {"amount": self.amount, "currency": self.currency, "payer": self.payer_id.hex(),
                "payee": self.payee_id.hex(), "counter": self.counter,
                "txid": wire.decode_payment(self.payment).txid.hex(), "payee_seq": self.receipt.payee_seq,
                "receipt_time": self.receipt.time, "payment": self.payment.hex(), "receipt": self.receipt.raw.hex(),
                "payee_cert": self.payee_cert.hex()}


async def pay(qr_text: str, identity: PayerIdentity, state: PayerState, amount: int, radio: Radio,
              connect_s: float = CONNECT_S, now: Callable[[], float] = time.time) -> Paid:
    """One payment of `amount` (minor units) to the payee of this QR; Paid, or PaymentError saying why not."""
    qr = parse_qr(qr_text)
    if state.nonce_used(qr.nonce):
        raise PaymentError(reasons.NONCE, "this QR was paid already", "scan")
    session = HostPayerSession(identity, qr, int(now()))
    try:
        link = await BleakLink.connect(qr, radio, connect_s)
    except LinkError as exc:
        raise link_error(exc, "connect") from None
    try:
        try:
            await link.send(session.hello())
            offer = session.read_hello(await link.recv(ANSWER_S))
        except LinkError as exc:
            raise link_error(exc, "hello") from None
        refusal = session.check_amount(amount, state)
        if refusal is not None:
            with contextlib.suppress(LinkError):
                await link.send(session.decline(refusal))  # tell the payee; nothing was signed
            detail = format_amount(amount, offer.currency)
            if offer.amount is not None:
                detail += f", the payee asks for {format_amount(offer.amount, offer.currency)}"
            raise PaymentError(refusal, detail, "confirm")
        msg3 = session.confirm(amount, state)
        try:
            await link.send(msg3)
            msg4 = await link.recv(RECEIPT_S)
        except LinkError as exc:
            raise PaymentError(reasons.RECEIPT, f"payment sent, no receipt ({exc})", "receipt",
                               unconfirmed=True) from None
        receipt = session.read_receipt(msg4, state)
    finally:
        await link.close()
    return Paid(amount, offer.currency, identity.cert.device_id, offer.payee_id, state.counter, session.payment or b"",
                receipt, offer.payee_cert.raw)


# --------------------------------------------------------------------------- command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m paytoken_host.hostpayer",
        description="Pay a paytoken payee terminal over BLE (bleak) from the host, and print the receipt.")
    p.add_argument("--qr", required=True, metavar="TEXT",
                   help="the payee's QR code as scanned (base45 text); write --qr=TEXT, as the text may start with '-'")
    p.add_argument("--key", required=True, type=Path, metavar="FILE",
                   help="the payer's P-256 identity key: 32-byte scalar (a device store's identity.key) or PEM")
    p.add_argument("--cert", required=True, type=Path, metavar="FILE", help="the payer's certificate (cert.bin)")
    p.add_argument("--issuer", required=True, type=Path, metavar="FILE",
                   help="the issuer's public key, 65 bytes SEC1 (issuer.pub): checks the payee's certificate")
    p.add_argument("--amount", required=True, metavar="AMOUNT",
                   help="what you agree to pay, in major units (100.00); must equal what the payee asks for")
    p.add_argument("--backend", choices=("sim", "native"), default="native",
                   help="native: this host's Bluetooth; sim: the simulated radio (default: native)")
    p.add_argument("--radio", metavar="HOST:PORT", help="the simulated radio's broker (default: $PAYTOKEN_RADIO)")
    p.add_argument("--state", type=Path, metavar="FILE",
                   help="the payer's counter, chain and payments (default: KEY.state.json)")
    p.add_argument("--timeout", type=float, default=CONNECT_S, metavar="S",
                   help=f"seconds to find and connect to the payee (default: {CONNECT_S:g})")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.radio is not None and args.backend != "sim":
        parser.error("--radio goes with --backend sim")
    if not args.timeout > 0:
        parser.error("--timeout must be positive")
    try:
        identity = PayerIdentity.load(args.key, args.cert, args.issuer)
        state = PayerState.load(args.state or args.key.with_name(args.key.name + ".state.json"),
                                identity.cert.device_id)
        amount = parse_amount(args.amount, minor_digits(identity.cert.currency))
        radio = Radio(args.backend, args.radio)
        if args.backend == "sim":
            from paytoken_host.simradio.bleak_backend import radio_address

            if radio_address(args.radio) is None:
                raise ValueError("--backend sim needs the broker: --radio HOST:PORT or PAYTOKEN_RADIO")
        parse_qr(args.qr)
    except ValueError as exc:
        parser.error(str(exc))
    except PaymentError as exc:
        parser.error(f"--qr: {exc}")
    try:
        paid = asyncio.run(pay(args.qr, identity, state, amount, radio, args.timeout))
    except PaymentError as exc:
        result = {"ok": False, "reason": exc.code, "why": reasons.name(exc.code), "step": exc.step,
                  "unconfirmed": exc.unconfirmed, "detail": str(exc)}
        if args.json:
            print(json.dumps(result))
        else:
            what = "sent, unconfirmed" if exc.unconfirmed else "not paid"
            print(f"hostpayer: {what} at step {exc.step}: {exc}", file=sys.stderr)
        return 3 if exc.unconfirmed else 1
    if args.json:
        print(json.dumps({"ok": True, **paid.as_dict()}))
    else:
        r = paid.receipt
        print(f"paid {format_amount(paid.amount, paid.currency)} to payee {paid.payee_id.hex()}")
        print(f"  payer {paid.payer_id.hex()}, counter {paid.counter}, txid {paid.as_dict()['txid']}")
        print(f"  receipt: accepted, payee sequence {r.payee_seq}, time {r.time}, signature checked")
        print(f"  payment {paid.payment.hex()}")
        print(f"  receipt {r.raw.hex()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
