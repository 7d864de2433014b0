"""The offline payment protocol as pure firmware logic on MicroPython: QR payload, Noise NK session,
certificates, signed payment and receipt, and every refusal with its reason code."""

from __future__ import annotations

import functools
import os

import pytest
import qrcode
from cryptography.hazmat.primitives.asymmetric import x25519

from paytoken import base45, reasons, wire
from paytoken_host import protocol
from tests.harness.mp import MicroPython, MicroPythonError
from tests.protocol_rig import NOW, USD, Rig, World, raw_x25519


@pytest.fixture(scope="module")
def proc():
    with MicroPython(heapsize="2M") as mp:
        yield mp


@pytest.fixture
def world() -> World:
    return World()


@pytest.fixture
def rig(proc, world) -> Rig:
    return Rig(proc, world, world.device(wire.ROLE_PAYER), world.device(wire.ROLE_PAYEE))


def refused(fn, *args) -> int:
    with pytest.raises(MicroPythonError) as exc:
        fn(*args)
    assert exc.value.kind == "Refused", exc.value
    return exc.value


# ---- QR payload ----


def test_qr_payload_fits_version_3_level_l(rig):
    qr = rig.qr()
    text = rig.mp.call("paytoken.base45.encode", qr)
    assert text == base45.encode(qr) and len(text) == 77
    code = qrcode.QRCode(error_correction=qrcode.constants.ERROR_CORRECT_L)
    code.add_data(qrcode.util.QRData(text.encode(), mode=qrcode.util.MODE_ALPHA_NUM))
    code.make(fit=True)
    assert code.version == 3
    parsed = rig.mp.eval(f"payer.parse_qr({text!r})")
    assert parsed[0] == rig.payee.device_id[:4] and parsed[3] == rig.payee.static[1]


def test_qr_with_amount_is_longer_and_parses(rig):
    qr = rig.qr(amount=12_345)
    assert len(qr) == wire.QR_AMOUNT_LEN
    parsed = rig.mp.eval(f"payer.parse_qr({base45.encode(qr)!r})")
    assert parsed[5:7] == [12_345, USD]


@pytest.mark.parametrize(
    "text",
    [
        "",
        "HELLO WORLD",
        "https://example.com/pay",
        "A",  # dangling base45 character
        "GGW" * 26,  # base45 group out of range
        base45.encode(b"\x20" + bytes(50)),  # version 2
        base45.encode(b"\x10" + bytes(49)),  # one byte short
        base45.encode(b"\x10" + bytes(51)),  # trailing byte
        base45.encode(b"\x14" + bytes(50)),  # unknown flag
        base45.encode(b"\x12" + bytes(50)),  # amount flag without an amount
        "abc~",
    ],
)
def test_qr_parsing_rejects_garbage_with_a_clear_error(rig, text):
    err = refused(rig.mp.eval, f"payer.parse_qr({text!r})")
    assert "not a paytoken QR" in err.msg


# ---- the payment ----


def test_payment_completes_and_both_hold_the_same_doubly_signed_record(rig):
    msgs = rig.pay(10_000, requested=10_000)
    st = rig.state()
    assert st["payer"] == [90_000, 1, 10_000, ["done"]]
    assert st["payee"] == [10_000, 1, ["received"]]
    payment_raw, receipt_raw = rig.call("ps.payment"), rig.call("ps.receipt")
    assert (payment_raw, receipt_raw) == (rig.call("es.payment"), rig.call("es.receipt"))
    # Firmware-made records verify with the host's independent crypto.
    payer_cert = protocol.verify_cert(rig.payer.cert, rig.world.issuer.public, NOW)
    payee_cert = protocol.verify_cert(rig.payee.cert, rig.world.issuer.public, NOW)
    p = protocol.verify_payment(payment_raw, payer_cert)
    r = protocol.verify_receipt(receipt_raw, payee_cert, payment_raw)
    assert (p.amount, p.currency, p.counter, p.payee_id) == (10_000, USD, 1, rig.payee.device_id)
    assert p.prev_hash == bytes(32) and p.time == NOW and r.status == reasons.OK
    assert p.txid == wire.txid(rig.payer.device_id, 1)
    assert p.handshake_hash == rig.call("ps.handshake_hash") == rig.call("es.handshake_hash")
    # Two round trips after connect, and well under 1.5 KB over the air.
    assert sum(len(m) for m in msgs.values()) < 1500


def test_payments_chain_and_count(rig):
    rig.pay(1_000)
    first = rig.call("ps.payment")
    rig.pay(2_000)
    second = rig.call("ps.payment")
    p2 = wire.decode_payment(second)
    assert p2.counter == 2 and p2.prev_hash == protocol.payment_hash(first) and p2.offline_spent == 1_000
    assert rig.state()["payee"][:2] == [3_000, 2]


def test_payer_enters_the_amount_when_none_is_requested(rig):
    rig.open(rig.qr())
    rig.call("es.read_payment(ps.confirm(7_777)) if ps.read_hello(es.read_hello(ps.start())) else 0")
    offer_amount = rig.call("ps.offer.amount")
    assert offer_amount is None
    assert rig.state()["payee"][0] == 7_777


def test_host_made_records_verify_on_the_firmware(rig):
    """Certificates (every test), a payment, a receipt and a revocation list made by the host."""
    body = wire.payment_body(os.urandom(16), rig.payer.device_id, rig.payee.device_id, 500, USD, 1, 0,
                             bytes(32), os.urandom(8), os.urandom(32), NOW)
    payment = protocol.sign(rig.payer.identity, body)
    receipt = protocol.sign(rig.payee.identity, wire.receipt_body(protocol.payment_hash(payment), 0, 1, NOW))
    payer_pub = protocol.sec1(rig.payer.identity.public_key(), compressed=True)
    payee_pub = protocol.sec1(rig.payee.identity.public_key())
    assert rig.mp.call("paytoken.trust.signed_by", payer_pub, payment) is True
    assert rig.mp.call("paytoken.trust.signed_by", payee_pub, receipt) is True
    assert rig.mp.call("paytoken.trust.signed_by", payee_pub, payment) is False
    decoded = rig.mp.call("paytoken.wire.decode_payment", payment)
    assert decoded[:7] == list(wire.decode_payment(payment)[:7])
    rl = protocol.revocation_delta(rig.world.backend, 0, 3, NOW, [rig.payer.device_id])
    assert rig.call(f"T.apply_revocation({rl!r})") is True
    assert rig.call(f"T.is_revoked({rig.payer.device_id!r})") is True


# ---- refusals: each with its reason, nothing lost, nothing gained ----


def test_amount_over_balance_is_refused_before_anything_is_signed(proc, world):
    rig = Rig(proc, world, world.device(wire.ROLE_PAYER), world.device(wire.ROLE_PAYEE), balance=5_000)
    rig.open(rig.qr())
    rig.call("ps.read_hello(es.read_hello(ps.start())) and None")
    before = rig.state()
    err = refused(rig.call, "ps.confirm(6_000)")
    assert rig.call("ps.reason") == reasons.FUNDS and "insufficient funds" in err.msg
    assert rig.state() == before == {"payer": [5_000, 0, 0, []], "payee": [0, 0, []]}


@pytest.mark.parametrize(
    ("amount", "code"),
    [(60_000, reasons.LIMIT_PAYMENT), (0, reasons.AMOUNT)],
)
def test_payer_limits(rig, amount, code):
    rig.open(rig.qr())
    rig.call("ps.read_hello(es.read_hello(ps.start())) and None")
    refused(rig.call, f"ps.confirm({amount})")
    assert rig.call("ps.reason") == code
    assert rig.state() == {"payer": [100_000, 0, 0, []], "payee": [0, 0, []]}


def test_cumulative_offline_limit(proc, world):
    limits = protocol.Limits(per_payment=50_000, offline=60_000)
    rig = Rig(proc, world, world.device(wire.ROLE_PAYER, limits), world.device(wire.ROLE_PAYEE))
    rig.pay(40_000)
    rig.open(rig.qr())
    rig.call("ps.read_hello(es.read_hello(ps.start())) and None")
    refused(rig.call, "ps.confirm(30_000)")
    assert rig.call("ps.reason") == reasons.LIMIT_OFFLINE
    assert rig.state()["payer"][:3] == [60_000, 1, 40_000]


def test_payee_catches_a_payer_that_ignores_its_limits(rig):
    """A modified payer skips its own checks: the payee refuses with a signed receipt, nothing moves."""
    rig.call("setattr(pw, 'check_spend', lambda amount, currency: None) or 0")
    rig.open(rig.qr())
    rig.call("ps.read_hello(es.read_hello(ps.start())) and None")
    m3 = rig.call("ps.confirm(90_000)")
    m4 = rig.call(f"es.read_payment({m3!r})")
    assert rig.call("es.reason") == reasons.LIMIT_PAYMENT
    refused(rig.call, f"ps.read_receipt({m4!r})")
    assert rig.call("ps.reason") == reasons.LIMIT_PAYMENT
    st = rig.state()
    assert st["payer"][0] == 100_000 and st["payer"][3] == ["voided"]
    assert st["payee"][0] == 0 and st["payee"][2] == ["refused"]


def test_payee_holding_limit(proc, world):
    payee = world.device(wire.ROLE_PAYEE, protocol.Limits(max_holding=15_000))
    rig = Rig(proc, world, world.device(wire.ROLE_PAYER), payee)
    rig.pay(10_000)
    rig.open(rig.qr())
    rig.call("ps.read_hello(es.read_hello(ps.start())) and None")
    m4 = rig.call("es.read_payment(ps.confirm(6_000))")
    refused(rig.call, f"ps.read_receipt({m4!r})")
    assert rig.call("ps.reason") == reasons.LIMIT_HOLDING
    assert rig.state()["payer"][0] == 90_000 and rig.state()["payee"][0] == 10_000


def test_requested_amount_must_be_paid_exactly(rig):
    rig.open(rig.qr(), amount=2_500)
    offer = rig.call("ps.read_hello(es.read_hello(ps.start()))")
    assert offer[1] == 2_500
    refused(rig.call, "ps.confirm(2_400)")
    assert rig.call("ps.reason") == reasons.AMOUNT


def session_until_hello(rig) -> int:
    """Run msg1 and msg2; return the payer's reason code (or 0 when the offer was accepted)."""
    m2 = rig.call("es.read_hello(ps.start())")
    try:
        rig.call(f"ps.read_hello({m2!r}) and None")
    except MicroPythonError:
        return rig.call("ps.reason")
    return 0


@pytest.mark.parametrize("which", ["payer", "payee"])
def test_expired_certificates(proc, world, which):
    old = {"not_before": NOW - 400 * 86_400, "not_after": NOW - 86_400}
    payer = world.device(wire.ROLE_PAYER, **(old if which == "payer" else {}))
    payee = world.device(wire.ROLE_PAYEE, **(old if which == "payee" else {}))
    rig = Rig(proc, world, payer, payee)
    rig.open(rig.qr())
    assert session_until_hello(rig) == reasons.CERT_EXPIRED
    assert rig.state() == {"payer": [100_000, 0, 0, []], "payee": [0, 0, []]}


@pytest.mark.parametrize("which", ["payer", "payee"])
def test_foreign_issuer(proc, world, which):
    foreign = protocol.Issuer()
    payer = world.device(wire.ROLE_PAYER, issuer=foreign if which == "payer" else None)
    payee = world.device(wire.ROLE_PAYEE, issuer=foreign if which == "payee" else None)
    rig = Rig(proc, world, payer, payee)
    rig.open(rig.qr())
    assert session_until_hello(rig) == reasons.CERT_ISSUER
    assert rig.state() == {"payer": [100_000, 0, 0, []], "payee": [0, 0, []]}


@pytest.mark.parametrize("which", ["payer", "payee"])
def test_revoked_devices(rig, which):
    device = rig.payer if which == "payer" else rig.payee
    rl = protocol.revocation_delta(rig.world.backend, 0, 7, NOW, [os.urandom(8), device.device_id])
    assert rig.call(f"T.apply_revocation({rl!r})") is True
    rig.open(rig.qr())
    assert session_until_hello(rig) == reasons.REVOKED
    assert rig.state() == {"payer": [100_000, 0, 0, []], "payee": [0, 0, []]}


def test_revocation_deltas_apply_in_order_only_and_cannot_be_forged(rig):
    delta = functools.partial(protocol.revocation_delta, rig.world.backend)
    first = delta(0, 5, NOW, [rig.payer.device_id])
    second = delta(5, 9, NOW, [os.urandom(8), os.urandom(8)])
    assert rig.call(f"T.apply_revocation({second!r})") is False  # after a gap: nothing changes
    assert rig.call(f"T.apply_revocation({first!r})") is True
    assert rig.call(f"T.apply_revocation({first!r})") is False  # applied already
    rolled_back = delta(0, 4, NOW, [os.urandom(8)])
    assert rig.call(f"T.apply_revocation({rolled_back!r})") is False
    forged = protocol.revocation_delta(protocol.Issuer().key, 5, 9, NOW, [bytes(8)])
    refused(rig.call, f"T.apply_revocation({forged!r})")
    assert rig.call("[T.revocation_version, T.revoked.count]") == [5, 1]
    assert rig.call(f"T.apply_revocation({second!r})") is True
    assert rig.call("[T.revocation_version, T.revoked.count]") == [9, 3]
    assert rig.call(f"T.is_revoked({rig.payer.device_id!r})") is True
    assert rig.call(f"T.is_revoked({rig.payee.device_id!r})") is False


def test_tampered_certificate_is_refused(proc, world):
    payee = world.device(wire.ROLE_PAYEE)
    bad = bytearray(payee.cert)
    bad[-70] ^= 1  # inside the signed body: the issuer key id is intact, the signature no longer holds
    payee.cert = bytes(bad)
    rig = Rig(proc, world, world.device(wire.ROLE_PAYER), payee)
    rig.open(rig.qr())
    assert session_until_hello(rig) == reasons.CERT_INVALID


def test_wrong_role(proc, world):
    rig = Rig(proc, world, world.device(wire.ROLE_PAYEE), world.device(wire.ROLE_PAYEE))
    rig.open(rig.qr())
    assert session_until_hello(rig) == reasons.ROLE


def test_qr_with_another_key_fails_at_the_real_payee(rig):
    """The payer scanned a QR whose key the payee at that address does not hold."""
    other = raw_x25519(x25519.X25519PrivateKey.generate())
    rig.open(rig.qr(static_pub=other[1]))
    m1 = rig.call("ps.start()")
    refused(rig.call, f"es.read_hello({m1!r})")
    assert rig.call("es.reason") == reasons.KEY_MISMATCH


def test_device_holding_the_qr_key_without_its_certificate_is_refused(rig):
    """An impostor shows its own key in the QR but presents the real payee's certificate."""
    impostor = raw_x25519(x25519.X25519PrivateKey.generate())
    rig.open(rig.qr(static_pub=impostor[1]), static=impostor)
    assert session_until_hello(rig) == reasons.KEY_MISMATCH


def test_reused_qr_is_refused_by_the_payer(rig):
    qr = rig.qr()
    rig.open(qr)
    rig.call("es.read_payment(ps.confirm(100)) if ps.read_hello(es.read_hello(ps.start())) else 0")
    refused(rig.mp.exec, f"payer.PayerSession(pw, T, base45.encode({qr!r}))")
    assert rig.state()["payer"][1] == 1


def test_replayed_session_gets_nothing(rig):
    """A recorded session replayed to the payee (same QR): msg1 is answered, but the recorded payment
    cannot be decrypted in the new session, so nothing is credited twice."""
    qr = rig.qr()
    rig.open(qr)
    m1 = rig.call("ps.start()")
    m2 = rig.call(f"es.read_hello({m1!r})")
    rig.call(f"ps.read_hello({m2!r}) and None")
    m3 = rig.call("ps.confirm(10_000)")
    rig.call(f"es.read_payment({m3!r})")
    before = rig.state()
    assert before["payee"][0] == 10_000
    rig.mp.exec(f"es = payee.PayeeSession(ew, T, {rig.payee.static[0]!r}, {rig.payee.static[1]!r}, {qr!r})")
    rig.call(f"es.read_hello({m1!r})")
    refused(rig.call, f"es.read_payment({m3!r})")
    assert rig.state() == before


def test_rolled_back_payer_is_caught_by_counter_and_chain(rig):
    """A cloned payer replays its state from before a payment: the payee refuses the counter."""
    rig.mp.exec("_snap = (pw.balance, pw.counter, pw.prev_hash, pw.offline_spent)")
    rig.pay(1_000)
    rig.mp.exec("pw.balance, pw.counter, pw.prev_hash, pw.offline_spent = _snap")
    rig.open(rig.qr())
    rig.call("ps.read_hello(es.read_hello(ps.start())) and None")
    m4 = rig.call("es.read_payment(ps.confirm(1_000))")
    assert rig.call("es.reason") == reasons.COUNTER
    refused(rig.call, f"ps.read_receipt({m4!r})")
    # Chain: right counter, wrong previous hash.
    rig.mp.exec("pw.counter = 1\npw.prev_hash = bytes(32)")
    rig.open(rig.qr())
    rig.call("ps.read_hello(es.read_hello(ps.start())) and None")
    rig.call("es.read_payment(ps.confirm(1_000))")
    assert rig.call("es.reason") == reasons.CHAIN
    assert rig.state()["payee"][0] == 1_000


# ---- flipping bytes of every message ----


FLIP_SCRIPT = """
def _flip(m, i):
    b = bytearray(m)
    b[i] ^= 0x01
    return bytes(b)

def flip_run(stage, stride, offset):
    # Runs one session per flipped byte of message `stage`; returns (positions tried, positions accepted).
    tried = accepted = 0
    i = offset
    while True:
        ps = payer.PayerSession(pw, T, base45.encode(QR))
        es = payee.PayeeSession(ew, T, XPRIV, XPUB, QR, None)
        m = ps.start()
        msgs = [m]
        if stage > 1:
            m = es.read_hello(m); msgs.append(m); ps.read_hello(m)
        if stage > 2:
            m = ps.confirm(100); msgs.append(m)
        if stage > 3:
            m = es.read_payment(m); msgs.append(m)
        if i >= len(msgs[-1]):
            return tried, accepted
        bad = _flip(msgs[-1], i)
        tried += 1
        try:
            if stage == 1:
                es.read_hello(bad)
            elif stage == 2:
                ps.read_hello(bad)
            elif stage == 3:
                es.read_payment(bad)
            else:
                ps.read_receipt(bad)
            accepted += 1
        except reasons.Refused:
            pass
        i += stride
"""


@pytest.mark.parametrize("stage", [1, 2, 3, 4])
def test_flipping_any_byte_of_any_message_is_rejected(rig, stage):
    qr = rig.qr()
    rig.mp.exec(FLIP_SCRIPT + f"QR = {qr!r}\nXPRIV = {rig.payee.static[0]!r}\nXPUB = {rig.payee.static[1]!r}\n")
    # The payer's nonce memory would refuse the fixed QR after the first confirm: keep it empty.
    rig.mp.exec("pw.nonce_used = lambda nonce: False")
    before = rig.state()
    tried, accepted = rig.call(f"flip_run({stage}, 1, 0)")
    assert tried > 20 and accepted == 0
    after = rig.state()
    if stage <= 2:
        assert after == before  # refused before anything was signed
        return
    # The payer debited before its signed payment left, so each such payment is kept as sent-unconfirmed
    # for the backend to resolve, never silently dropped.
    sent = after["payer"][1]
    assert sent >= tried and after["payer"][3] == ["sent"] * sent
    if stage == 3:
        assert after["payee"] == before["payee"]  # the altered payment was never credited
    else:
        # The payee credited each payment before its receipt was altered in flight: both ledgers agree
        # on the amounts, and the payee's upload settles what the payer holds as unconfirmed.
        assert after["payee"][0] == 100 * sent and after["payee"][2] == ["received"] * sent
