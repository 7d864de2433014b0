"""The host payer (paytoken_host.hostpayer): a CPython payer on bleak pays the real payee terminal app, running on
MicroPython with the real paytoken.ble transport over the simulated radio, exactly as a payer card would.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from paytoken import base45, framing, reasons, wire
from paytoken.link import BUSY, LinkError
from paytoken_host import protocol
from paytoken_host.hostpayer import (
    BleakLink,
    PayerIdentity,
    PayerState,
    PaymentError,
    Radio,
    format_amount,
    main,
    parse_amount,
    parse_qr,
    pay,
)
from paytoken_host.simdevice import Authority, DeviceKeys, provision
from paytoken_host.simradio import BrokerThread
from tests.harness.mp import FIRMWARE_BUILD, ROOT
from tests.harness.pair import Side
from tests.test_ble_link import Side as BleSide
from tests.test_ble_link import wait_advertising

PAYEE_ADDR = "c0:de:00:00:00:10"


def write_payer(folder: Path, auth: Authority, keys: DeviceKeys) -> dict[str, Path]:
    """The payer's files as a device store holds them: identity.key, cert.bin, issuer.pub."""
    files = {"key": folder / "identity.key", "cert": folder / "cert.bin", "issuer": folder / "issuer.pub"}
    files["key"].write_bytes(keys.priv)
    files["cert"].write_bytes(keys.cert)
    files["issuer"].write_bytes(auth.issuer.public)
    return files


@pytest.fixture(scope="module")
def broker() -> Iterator[BrokerThread]:
    with BrokerThread(seed=3) as radio:
        yield radio


def test_a_host_payer_built_on_bleak_pays_a_simulated_terminal(broker: BrokerThread, tmp_path: Path):
    auth = Authority()
    payee_keys, payer_keys = auth.device(wire.ROLE_PAYEE), auth.device(wire.ROLE_PAYER)
    provision(tmp_path / "payee.img", auth, payee_keys, config={"name": "payee", "amount": 10_000},
              firmware=FIRMWARE_BUILD)
    files = write_payer(tmp_path, auth, payer_keys)
    env = {"PAYTOKEN_SIM_FLASH": str(tmp_path / "payee.img"), "PAYTOKEN_RADIO": broker.address,
           "PAYTOKEN_RADIO_NAME": "payee", "PAYTOKEN_RADIO_ADDR": PAYEE_ADDR}
    payee = Side("payee", "2M", env, "ble", sessions=2)  # the terminal app as main.py starts it, on paytoken.ble
    try:
        qr = payee.event("qr", timeout=30)
        assert qr is not None, payee.lines
        text = base45.encode(bytes.fromhex(qr["qr"]))
        assert wire.decode_qr(base45.decode(text)).ble_addr == bytes.fromhex(PAYEE_ADDR.replace(":", ""))

        # 1: the command line pays $100.00 and prints the receipt
        proc = subprocess.run(
            [sys.executable, "-m", "paytoken_host.hostpayer", f"--qr={text}", "--key", str(files["key"]),
             "--cert", str(files["cert"]), "--issuer", str(files["issuer"]), "--amount", "100.00",
             "--backend", "sim", "--radio", broker.address, "--json"],
            capture_output=True, text=True, timeout=60, cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert proc.returncode == 0, proc.stdout + proc.stderr
        host = json.loads(proc.stdout)
        paid = payee.event("paid", timeout=15)
        assert paid is not None, payee.lines

        # the payee's ledger event: credited once, from this payer, its first payment, receipt sent
        assert paid == {"amount": "10000", "currency": "840", "payer": payer_keys.device_id.hex(), "counter": "1",
                        "seq": paid["seq"], "balance": "10000", "receipt": "sent"}
        # the host's receipt: the payee's countersignature over exactly the payment the host signed
        payer_cert, payee_cert = wire.decode_cert(payer_keys.cert), wire.decode_cert(payee_keys.cert)
        payment = protocol.verify_payment(bytes.fromhex(host["payment"]), payer_cert)
        receipt = protocol.verify_receipt(bytes.fromhex(host["receipt"]), payee_cert, payment.raw)
        assert receipt.status == reasons.OK and receipt.payee_seq == int(paid["seq"])
        assert (payment.amount, payment.currency, payment.counter) == (10_000, 840, 1)
        assert payment.payee_id == payee_keys.device_id and payment.qr_nonce == bytes.fromhex(qr["nonce"])
        assert payment.prev_hash == bytes(32) and payment.offline_spent == 0
        assert host["ok"] is True and host["payee"] == payee_keys.device_id.hex() and host["counter"] == 1
        saved = json.loads((tmp_path / "identity.key.state.json").read_text())
        assert saved["counter"] == 1 and saved["payments"][0]["status"] == "paid"
        assert saved["prev_hash"] == protocol.payment_hash(payment.raw).hex()

        # 2: the next QR; the host payer is told to pay $50.00: it declines (nothing signed) and the payee hears why
        qr2 = payee.event("qr", timeout=15)
        assert qr2 is not None and qr2["nonce"] != qr["nonce"]
        identity = PayerIdentity.load(files["key"], files["cert"], files["issuer"])
        state = PayerState.load(tmp_path / "identity.key.state.json", payer_cert.device_id)
        radio = Radio("sim", broker.address)
        with pytest.raises(PaymentError) as declined:
            asyncio.run(pay(base45.encode(bytes.fromhex(qr2["qr"])), identity, state, 5_000, radio))
        assert declined.value.code == reasons.AMOUNT and declined.value.step == "confirm"
        assert "the payee asks for 100.00 USD" in str(declined.value) and not declined.value.unconfirmed
        failed = payee.event("failed", timeout=15)
        assert failed is not None and failed["why"] == "amount" and failed["step"] == "payment", payee.lines
        assert state.counter == 1 and len(state.payments) == 1  # nothing was signed
        # the first QR again: refused before any connection
        with pytest.raises(PaymentError) as again:
            asyncio.run(pay(text, identity, state, 10_000, radio))
        assert again.value.code == reasons.NONCE
        assert payee.finish(timeout=15) is not None, payee.lines  # two sessions served, the app ended cleanly
        assert "paytoken.ble.peripheral" in payee.modules  # the real BLE transport, not a test double
    finally:
        payee.kill()


def ble_side_pattern(n: int, k: int) -> bytes:
    """tests/harness/ble_side.py's message k of n bytes."""
    return bytes((i * 7 + n + k * 13) & 0xFF for i in range(n))


def test_bleak_link_frames_both_ways_finds_by_nonce_tag_and_gets_busy(broker: BrokerThread):
    # The host payer's link against the payee's real BLE transport (paytoken.ble.peripheral): the same frames,
    # control frames and rules as the firmware's own payer.
    nonce = bytes(range(1, 9))
    addr = "c0:de:00:00:00:20"
    payee = BleSide(broker, "link-payee", {"role": "payee", "nonce": nonce.hex(), "accept_ms": 10_000,
                                           "ops": [["recv", 1000, 5000], ["send", 700], ["sleep", 1500]]}, addr)
    try:
        wait_advertising(broker, "link-payee")
        key = bytes(32)
        at_address = wire.decode_qr(wire.qr_payload(bytes(4), bytes.fromhex(addr.replace(":", "")), False, key, nonce))
        elsewhere = wire.decode_qr(wire.qr_payload(bytes(4), bytes(6), False, key, nonce))  # the tag finds it

        async def scenario() -> dict:
            radio = Radio("sim", broker.address)
            link = await BleakLink.connect(at_address, radio, 5)
            with pytest.raises(LinkError) as busy:
                await BleakLink.connect(elsewhere, radio, 2)
            await link.send(ble_side_pattern(1000, 0))
            got = await link.recv(5)
            await link.close()
            return {"frame_size": link.frame_size, "busy": busy.value.reason, "got": got}

        r = asyncio.run(scenario())
        p = payee.result()
    finally:
        payee.kill()
    assert r["busy"] == BUSY  # a second payer, found by the nonce tag at another address, is refused
    assert r["frame_size"] == 244 and r["got"] == ble_side_pattern(700, 0)
    assert p["accept"] == ["ok"] and p["ops"] == ["ok", "ok", "ok"]
    assert p["stats"]["frames_in"] == framing.frame_count(1000, 244) == 5 and p["stats"]["frame_size"] == 244


def test_unreachable_payee_and_malformed_input(broker: BrokerThread, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]):
    auth = Authority()
    payee_keys, payer_keys = auth.device(wire.ROLE_PAYEE), auth.device(wire.ROLE_PAYER)
    files = write_payer(tmp_path, auth, payer_keys)
    assert payee_keys.static is not None
    qr = base45.encode(wire.qr_payload(payee_keys.device_id[:4], bytes(6), False, payee_keys.static[1], bytes(8)))
    identity = PayerIdentity.load(files["key"], files["cert"], files["issuer"])
    state = PayerState.load(tmp_path / "state.json", payer_keys.device_id)
    with pytest.raises(PaymentError) as nobody:  # nobody at that address, nobody advertising that nonce
        asyncio.run(pay(qr, identity, state, 100, Radio("sim", broker.address), connect_s=0.6))
    assert nobody.value.code == reasons.UNREACHABLE and nobody.value.step == "connect"
    assert not (tmp_path / "state.json").exists()  # nothing stored

    (tmp_path / "other.key").write_bytes(Authority().device(wire.ROLE_PAYER).priv)
    (tmp_path / "payee.cert").write_bytes(payee_keys.cert)
    (tmp_path / "bad.json").write_text("{")
    # --qr=TEXT: a base45 QR text may start with "-", which argparse would take for an option after "--qr"
    base = [f"--qr={qr}", "--key", str(files["key"]), "--cert", str(files["cert"]), "--issuer", str(files["issuer"]),
            "--amount", "1.00", "--backend", "sim", "--radio", broker.address]

    def error(*changes: str, extra: tuple[str, ...] = ()) -> str:
        argv = list(base) + list(extra)
        for i in range(0, len(changes), 2):
            name, value = changes[i], changes[i + 1]
            if name == "--qr":
                argv[0] = f"--qr={value}"
            else:
                argv[argv.index(name) + 1] = value
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2
        return capsys.readouterr().err.strip().splitlines()[-1]

    assert "not a paytoken QR" in error("--qr", "HELLO")
    assert "more than 2 decimals" in error("--amount", "1.234")
    assert "not an amount" in error("--amount", "ten")
    assert "must be positive" in error("--amount", "-1")
    assert "expected a 32-byte P-256 private scalar" in error("--key", str(files["cert"]))
    assert "not the one" in error("--key", str(tmp_path / "other.key"))
    assert "65-byte" in error("--issuer", str(files["cert"]))
    assert "payer role" in error("--cert", str(tmp_path / "payee.cert"))
    assert "host:port" in error("--radio", "nowhere")
    assert "not a host payer state file" in error(extra=("--state", str(tmp_path / "bad.json")))
    assert "--radio goes with --backend sim" in error("--backend", "native")
    # an unreachable payee through the command line: exit 1 and the reason
    assert main(base[:-4] + ["--backend", "sim", "--radio", broker.address, "--timeout", "0.5", "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["ok"] is False and out["why"] == "payee not found" and out["step"] == "connect"

    # space is a base45 character: a QR text may begin with one (wallet id 0x23...), and it is kept
    spaced = base45.encode(wire.qr_payload(b"\x23abc", bytes(6), False, bytes(32), bytes(8)))
    assert spaced[0] == " " and parse_qr(spaced + "\r\n").wallet_short == b"\x23abc"
    assert parse_amount("100") == 10_000 and parse_amount("0.5") == 50 and parse_amount("7", 0) == 7
    assert format_amount(10_000, 840) == "100.00 USD" and format_amount(500, 392) == "500 JPY"
