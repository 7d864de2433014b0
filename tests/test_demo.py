"""`make demo` from end to end: two main.py devices over the virtual BLE radio, the QR read off the terminal's
screen, $100.00 paid; then build/demo/summary.json checked the way a stranger would, with `cryptography`."""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import zxingcpp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from PIL import Image

from paytoken import base45, wire
from paytoken_host import demo
from tests.harness.mp import FIRMWARE_BUILD


def verify(pub_hex: str, body_hex: str, sig_hex: str) -> None:
    """Raises InvalidSignature unless sig (r || s) is pub's ECDSA P-256 / SHA-256 signature over body."""
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(pub_hex))
    sig = bytes.fromhex(sig_hex)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    pub.verify(der, bytes.fromhex(body_hex), ec.ECDSA(hashes.SHA256()))


def test_demo_pays_100_dollars_and_its_summary_verifies_independently(tmp_path: Path):
    out = io.StringIO()
    summary = demo.run(tmp_path / "demo", 10_000, 100_000, 30, "512K", FIRMWARE_BUILD, out)
    text = out.getvalue()
    # step by step: both devices' events and screens, in order
    for line in ("payee: qr ", "payer: scanned ", "payer: ask what=confirm", "payer: paid amount=10000",
                 "payee: paid amount=10000", "[payee screen]", "[payer screen]"):
        assert line in text, line
    # in the order it happened: the payee credits and countersigns before the payer's payment is complete
    assert text.index("payer: scanned") < text.index("payee: paid") < text.index("payer: paid")

    # the QR screen as saved, read by an independent decoder
    qr = zxingcpp.read_barcodes(Image.open(tmp_path / "demo" / "payee_qr.png"))
    payload = wire.decode_qr(base45.decode(qr[0].text))

    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == summary
    devices = {d["role"]: d for d in summary["devices"]}
    assert devices["payer"]["balance"] == 90_000 and devices["payee"]["balance"] == 10_000
    assert payload.wallet_short.hex() == devices["payee"]["id"][:8]
    [rec] = summary["records"]
    assert (rec["payer"], rec["payee"], rec["amount"], rec["currency"]) == (
        devices["payer"]["id"], devices["payee"]["id"], 10_000, 840)
    verify(devices["payer"]["identity_public_key"], rec["payment"], rec["payer_sig"])
    verify(devices["payee"]["identity_public_key"], rec["receipt"], rec["payee_sig"])
    # the receipt countersigns exactly this payment, and accepts it
    receipt = wire.decode_receipt(bytes.fromhex(rec["receipt"] + rec["payee_sig"]))
    assert receipt.payment_hash == hashlib.sha256(bytes.fromhex(rec["payment"] + rec["payer_sig"])).digest()
    assert receipt.status == 0
    payment = wire.decode_payment(bytes.fromhex(rec["payment"] + rec["payer_sig"]))
    assert payment.qr_nonce == payload.nonce  # paid to the QR that was on the screen
