"""`make demo` from end to end: a backend on SQLite and a sample bank, two main.py devices provisioned over USB and
paying over the virtual BLE radio (the QR read off the terminal's screen), each payment synced in one order (payer
first, then payee first); then build/demo/summary.json checked the way a stranger would, with `cryptography`."""

from __future__ import annotations

import hashlib
import io
import json
import struct
from pathlib import Path

import pytest
import zxingcpp
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from PIL import Image

from paytoken import base45, wire
from paytoken_host import demo
from paytoken_host.backend.local import free_port
from tests.harness.mp import FIRMWARE_BUILD


def verify(pub_hex: str, body_hex: str, sig_hex: str) -> None:
    """Raises InvalidSignature unless sig (r || s) is pub's ECDSA P-256 / SHA-256 signature over body."""
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), bytes.fromhex(pub_hex))
    sig = bytes.fromhex(sig_hex)
    der = encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big"))
    pub.verify(der, bytes.fromhex(body_hex), ec.ECDSA(hashes.SHA256()))


def test_demo_pays_settles_both_sync_orders_and_its_summary_verifies_independently(tmp_path: Path):
    out = io.StringIO()
    summary = demo.run(tmp_path / "demo", 10_000, 100_000, 30, "512K", FIRMWARE_BUILD, out)
    text = out.getvalue()
    # step by step: both devices' events and screens, in order
    for line in ("payee: qr ", "payer: scanned ", "payer: ask what=confirm", "payer: paid amount=10000",
                 "payee: paid amount=10000", "[payee screen]", "[payer screen]", "paytoken-backend serve at",
                 "provisioned payer", "provisioned payee", "bank: 1 notification(s) received"):
        assert line in text, line
    # in the order it happened: the payee credits and countersigns before the payer's payment is complete
    assert text.index("payer: scanned") < text.index("payee: paid") < text.index("payer: paid")

    # the QR screen as saved (the last payment's), read by an independent decoder
    qr = zxingcpp.read_barcodes(Image.open(tmp_path / "demo" / "payee_qr.png"))
    payload = wire.decode_qr(base45.decode(qr[0].text))

    assert json.loads((tmp_path / "demo" / "summary.json").read_text()) == summary
    devices = {d["role"]: d for d in summary["devices"]}
    payer_id, payee_id = devices["payer"]["id"], devices["payee"]["id"]
    assert devices["payer"]["balance"] == 80_000 and devices["payee"]["balance"] == 20_000
    assert payload.wallet_short.hex() == payee_id[:8]
    records = summary["records"]
    assert len(records) == 2
    txids = []
    for rec in records:
        assert (rec["payer"], rec["payee"], rec["amount"], rec["currency"]) == (payer_id, payee_id, 10_000, 840)
        verify(devices["payer"]["identity_public_key"], rec["payment"], rec["payer_sig"])
        verify(devices["payee"]["identity_public_key"], rec["receipt"], rec["payee_sig"])
        # the receipt countersigns exactly this payment, and accepts it
        receipt = wire.decode_receipt(bytes.fromhex(rec["receipt"] + rec["payee_sig"]))
        assert receipt.payment_hash == hashlib.sha256(bytes.fromhex(rec["payment"] + rec["payer_sig"])).digest()
        assert receipt.status == 0
        # the transaction id, from the signed bytes (layout: docs/protocol.md), is the payer id and counter's
        txid, payer, _, amount, _, counter = struct.unpack_from(">2x16s8s8sIHI", bytes.fromhex(rec["payment"]))
        assert txid == hashlib.sha256(b"paytoken/txid" + payer + struct.pack(">I", counter)).digest()[:16]
        assert (payer.hex(), amount) == (payer_id, rec["amount"])
        txids.append(txid.hex())
    payment = wire.decode_payment(bytes.fromhex(records[-1]["payment"] + records[-1]["payer_sig"]))
    assert payment.qr_nonce == payload.nonce  # paid to the QR that was on the screen

    # both sync orders, one payment each: every signed payment settled, as each device's own ledger says
    sync = summary["sync"]
    assert [s["order"] for s in sync] == ["payer-first", "payee-first"]
    assert sorted(s["transaction_id"] for s in sync) == sorted(txids)
    by_txid = {r_txid: rec for r_txid, rec in zip(txids, records, strict=True)}
    for s in sync:
        assert s["amount"] == by_txid[s["transaction_id"]]["amount"]
        assert s["statuses"] == {payer_id: "settled", payee_id: "settled"}
    # the device that came online first synced first, and showed it on its screen
    payer_first, payee_first = text.split("== payee-first")
    assert payer_first.index("payer: synced") < payer_first.index("payee: synced")
    assert payee_first.index("payee: synced") < payee_first.index("payer: synced")
    for section in (payer_first, payee_first):
        for name in ("payer", "payee"):
            screen = section.index(f"[{name} screen]", section.index(f"the {name} comes online"))
            assert screen < section.index(f"{name}: synced")
    # the terminal (Wi-Fi) lists each payment's status: 1 after the first payment, 2 after the second; the card
    # (USB serial, host/sync_bridge.py) counts them, and the bridge's own report says the same
    assert text.count("payee: status txid=") == text.count("status=settled") == 3
    assert "payer: synced" in payer_first and "statuses=settled_1" in payer_first.split("payer: synced")[1]
    assert "statuses=settled_2" in payee_first.split("payer: synced")[1]
    assert payer_first.count("sync_bridge: done:") == payee_first.count("sync_bridge: done:") == 1

    # the bank: the card's load and one settlement per payment, signed webhooks; its balances match the payments
    bank = summary["bank"]
    assert bank["notifications"] == 3
    paid = sum(rec["amount"] for rec in records)
    assert bank["balances"] == {"funding": -100_000, f"offline:{payer_id}": 100_000 - paid,
                                f"merchant:{payee_id}": paid}
    assert bank["balances"][f"offline:{payer_id}"] == devices["payer"]["balance"]
    assert bank["balances"][f"merchant:{payee_id}"] == devices["payee"]["balance"]


def test_a_device_that_cannot_reach_the_backend_says_so(tmp_path: Path):
    # The device's own sync over Wi-Fi with nothing listening at the backend's address: it fails, says why (event
    # and screen), and the demo stops with that reason; an unknown transport is refused by name.
    demo.provision_images(tmp_path, FIRMWARE_BUILD, 10_000, 50_000, lambda text: None)
    out = io.StringIO()
    net = demo.Online(f"http://127.0.0.1:{free_port()}", FIRMWARE_BUILD, tmp_path, "512K", demo.printer(out),
                      demo.sayer(out))
    with pytest.raises(demo.DemoError, match="payee: failed .*ECONNREFUSED"):
        demo.sync_device(net, "payee", "wifi")
    assert "[payee screen]" in out.getvalue()
    assert (tmp_path / "payee_screen.png").exists()
    with pytest.raises(demo.DemoError, match="sync transport 'pigeon': one of wifi, usb-bridge"):
        demo.sync_device(net, "payee", "pigeon")
