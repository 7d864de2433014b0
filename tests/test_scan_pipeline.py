"""Real pixels, a real decoder, then the payer: the payee's simulated display saves its QR screen as a PNG,
zxing-cpp decodes the image, the text is held in front of the payer's simulated GM65 scanner, and the
payer's firmware reads it through the scanner driver and parses it (issue 5's input path)."""

from __future__ import annotations

import os
from pathlib import Path

import zxingcpp
from PIL import Image

from paytoken import base45, wire
from tests.harness.mp import MicroPython


def test_payee_screen_to_payer_scanner(tmp_path: Path):
    payload = wire.qr_payload(os.urandom(4), os.urandom(6), True, os.urandom(32), os.urandom(8))
    text = base45.encode(payload)
    png = tmp_path / "payee.png"
    with MicroPython(heapsize="256K") as payee:
        payee.exec(
            "import board\nfrom paytoken.ui import screens\n"
            f"d = board.display(path={str(png)!r})\n"
            f"screens.render(d.fb, d.width, d.height, ('payee_qr', {text!r}))\nd.show()\n"
        )
        assert payee.eval("[d.width, d.height, d.frames]") == [128, 64, 1]
    image = Image.open(png)
    assert image.size == (128, 64) and image.mode == "1"
    # Around the display a dark bezel, as a scanner sees an OLED: no extra light margin, no rescaling.
    framed = Image.new("L", (128 + 16, 64 + 16), 0)
    framed.paste(image.convert("L"), (8, 8))
    found = zxingcpp.read_barcodes(framed)
    assert [r.text for r in found] == [text]
    with MicroPython(heapsize="256K") as payer:
        payer.exec(
            "import board\nfrom paytoken import payer\n"
            f"sc = board.scanner()\nsc.feed({found[0].text!r})\n"
            "got = sc.scan(500)\nqr = payer.parse_qr(got)\n"
        )
        assert payer.eval("got") == text
        assert payer.eval("[qr.wallet_short, qr.ble_addr, qr.addr_random, qr.x25519_pub, qr.nonce]") == [
            payload[1:5], payload[5:11], True, payload[11:43], payload[43:51]]
        assert payer.eval("sc.uart.triggers") == 1  # one trigger command, one code


def test_a_text_held_to_the_scanner_file_keeps_its_spaces(tmp_path: Path):
    """The simulator's scanner file (PAYTOKEN_SIM_SCANNER, as the demo and the two-device tests feed it): a payee
    whose wallet id encodes to a leading space (base45's character 36) must still be paid. The file reader used
    to strip it, and the card refused every QR of such a payee as malformed."""
    payload = wire.qr_payload(bytes.fromhex("b8f33f9b"), os.urandom(6), True, os.urandom(32), os.urandom(8))
    text = base45.encode(payload)
    assert text.startswith(" ")
    (tmp_path / "scanner").write_text(text + "\n")
    with MicroPython(heapsize="256K") as payer:
        payer.exec(
            "from board import siminput\nfrom paytoken import payer\nfrom paytoken.drivers.scanner import Scanner\n"
            f"sc = Scanner(siminput.SimUART({str(tmp_path / 'scanner')!r}))\n"
            "got = sc.scan(500)\nqr = payer.parse_qr(got)\n"
        )
        assert payer.eval("got") == text
        assert payer.eval("qr.nonce") == payload[-8:]
