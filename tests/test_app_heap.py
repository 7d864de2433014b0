"""A payer and a payee as two devices: each in its own MicroPython process started as main.py starts it (self-test,
store, wallet, display, app), the radio through files, the QR read by zxing-cpp from the payee display's PNG and
held in front of the payer's scanner, the confirm press written to its buttons file (tests/harness/pair.py). Each
role must complete a payment within its heap budget (docs/simulator.md, "Heap budgets")."""

from __future__ import annotations

import pytest

from paytoken import base45, wire
from tests.harness.mp import FIRMWARE_BUILD, FROZEN, frozen_launcher, word_bits
from tests.harness.pair import Images, run_pair

# Code loaded from .mpy files lives in the heap on the unix port (64-bit): the role's code is most of this.
HEAP_MPY = "224K"  # measured 180-195K: the payee's peak varies with timing (the radio through files)
# With the firmware frozen into the interpreter, as a production ESP32 image has it: the device budget.
HEAP_FROZEN = "96K"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Images:
    return Images(tmp_path_factory.mktemp("images"))


def test_two_devices_pay_across_processes(images, tmp_path):
    r = run_pair(images, tmp_path / "run", display_png=True)
    assert r["ok"], r["story"]
    ev = r["events"]
    qr = wire.decode_qr(base45.decode(ev["qr_text"]["text"]))  # what zxing read off the payee's screen
    assert qr.nonce.hex() == ev["qr"]["nonce"] and qr.wallet_short == images.payee.device_id[:4]
    assert ev["payer_paid"]["amount"] == "10000" and ev["payer_paid"]["balance"] == "90000"
    assert ev["payee_paid"]["balance"] == "10000" and ev["payee_paid"]["payer"] == images.payer.device_id.hex()
    assert ev["ask"]["what"] == "confirm"
    # each process loaded only its own role's app
    assert "paytoken.app.card" in r["modules"]["payer"] and "paytoken.payee" not in r["modules"]["payer"]
    assert "paytoken.app.terminal" in r["modules"]["payee"] and "paytoken.payer" not in r["modules"]["payee"]
    assert "paytoken.qr" not in r["modules"]["payer"]  # the QR encoder is the payee's alone
    for role in ("payer", "payee"):  # nothing of the USB provisioning service or of sync on the payment path
        assert not {"paytoken.provisioning", "paytoken.usb.service", "paytoken.usb.frames"} & set(r["modules"][role])
        assert not {"paytoken.sync_client", "paytoken.syncwire", "paytoken.sync_http", "paytoken.app.syncble",
                    "paytoken.ble.syncgatt"} & set(r["modules"][role])


SYNC_MODULES = {"paytoken.sync_usb", "paytoken.sync_client", "paytoken.syncwire", "paytoken.usb.service",
                "paytoken.usb.frames", "paytoken.provisioning"}


def test_usb_watched_while_paying_loads_nothing_of_sync(images, tmp_path):
    # Each device's USB serial on a bridge: the app watches it for a sync relay, and pays within its budget with
    # nothing of sync or of the USB service loaded (they load only when a relay talks, and leave again).
    r = run_pair(images, tmp_path / "run", payer_heap=HEAP_MPY, payee_heap=HEAP_MPY, usb=True)
    assert r["ok"], r["story"]
    for role in ("payer", "payee"):
        assert "paytoken.app.usbwatch" in r["modules"][role]  # the watcher ran beside the app
        assert not SYNC_MODULES & set(r["modules"][role])


def test_each_role_pays_within_its_heap_budget(images, tmp_path):
    r = run_pair(images, tmp_path / "run", payer_heap=HEAP_MPY, payee_heap=HEAP_MPY)
    assert r["ok"], r["story"]


@pytest.mark.skipif(not FROZEN, reason="set PAYTOKEN_FROZEN_MICROPYTHON to a unix port with the firmware frozen in")
def test_each_role_pays_in_96k_when_frozen(images, tmp_path):
    r = run_pair(images, tmp_path / "run", payer_heap=HEAP_FROZEN, payee_heap=HEAP_FROZEN, micropython=FROZEN)
    assert r["ok"], r["story"]


@pytest.mark.skipif(not FROZEN, reason="set PAYTOKEN_FROZEN_MICROPYTHON to a unix port with the firmware frozen in")
def test_both_roles_pay_over_ble_in_96k_when_frozen_32bit(tmp_path):
    # The budget, as an ESP32 has it: main.py on both devices at once, each in -X heapsize=96K, over the
    # simulated BLE radio (the simulator's `bluetooth` module, C on an ESP32, in the heap too), with display and
    # ledger, the firmware frozen in and 4-byte pointers. Fresh keys each time: a few payments.
    from paytoken_host.demo import pay

    if word_bits(FROZEN) != 32:
        pytest.skip("the 96 KB budget is an ESP32's: needs the 32-bit frozen build (make frozen-unix FROZEN_BITS=32)")
    for i in range(3):
        result = pay(tmp_path / f"run{i}", FIRMWARE_BUILD, heaps={"payer": HEAP_FROZEN, "payee": HEAP_FROZEN},
                     launch=frozen_launcher, screens=False)
        # pay() returns once both devices said "paid" (both records stored); a device out of heap fails it
        assert result.paid["amount"] == "10000" and result.paid["balance"] == "90000", result.logs
