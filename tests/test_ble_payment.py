"""A whole payment over BLE: two devices started as main.py starts them (self-test, store, wallet, app, and the
radio from paytoken.ble: payee_transport() / payer_transport()), joined by the simulated radio's broker. The
QR goes from the payee's QR event to the payer's scanner file, the confirm press to its buttons file
(tests/harness/pair.py provisions the flash images)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from paytoken import base45
from paytoken_host.simradio import BrokerThread
from tests.harness.mp import FIRMWARE_BUILD, micropython_command
from tests.harness.pair import Images, Side


class Device(Side):
    """main.py on the simulator board, with the radio broker's address: the firmware as a device runs it."""

    def __init__(self, role: str, radio: BrokerThread, env: dict[str, str], heap: str = "1M"):
        import queue
        import threading

        self.role = role
        clean = {k: v for k, v in os.environ.items() if not k.startswith("PAYTOKEN_")}
        env = dict(clean, MICROPYPATH=".frozen:lib", PAYTOKEN_RADIO=radio.address, PAYTOKEN_RADIO_NAME=role, **env)
        self.proc = subprocess.Popen([micropython_command(), "-X", f"heapsize={heap}", "main.py"],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     cwd=FIRMWARE_BUILD, env=env)
        self.lines = []
        self._q = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Images:
    return Images(tmp_path_factory.mktemp("images"))


@pytest.fixture
def radio() -> Iterator[BrokerThread]:
    with BrokerThread(seed=5) as r:
        yield r


def test_payment_between_two_devices_over_ble(images: Images, radio: BrokerThread, tmp_path: Path):
    for name in ("payer", "payee"):
        (tmp_path / f"{name}.img").write_bytes((images.folder / f"{name}.img").read_bytes())
    (tmp_path / "scanner").write_text("")
    (tmp_path / "buttons").write_text("")
    payee = Device("payee", radio, {"PAYTOKEN_SIM_FLASH": str(tmp_path / "payee.img")})
    payer = Device("payer", radio, {"PAYTOKEN_SIM_FLASH": str(tmp_path / "payer.img"),
                                    "PAYTOKEN_SIM_SCANNER": str(tmp_path / "scanner"),
                                    "PAYTOKEN_SIM_BUTTONS": str(tmp_path / "buttons")})
    try:
        qr = payee.event("qr", timeout=30)
        assert qr is not None, payee.lines
        # the card drops scans from before its ready screen (stale): show it the QR once it is ready
        assert payer.event("ready", timeout=30) is not None, payer.lines
        with open(tmp_path / "scanner", "a") as f:
            f.write(base45.encode(bytes.fromhex(qr["qr"])) + "\n")
        ask = payer.event("ask", timeout=30)
        assert ask is not None, (payer.lines, payee.lines)
        with open(tmp_path / "buttons", "a") as f:
            f.write("confirm\n")
        paid = payer.event("paid", timeout=30)
        got = payee.event("paid", timeout=30)
    finally:
        payer.kill()
        payee.kill()
    assert paid is not None and got is not None, (payer.lines, payee.lines)
    assert paid["amount"] == str(images.amount) and paid["balance"] == str(images.balance - images.amount)
    assert got["payer"] == images.payer.device_id.hex()
    link = radio.links(all=True)[0]
    # the four messages crossed at the negotiated MTU (247: one or two frames each)
    assert link["mtu"] == 247, link
    assert not any("Traceback" in ln for ln in payer.lines + payee.lines), (payer.lines, payee.lines)
