"""The firmware image boots on MicroPython: power-on self-test passes, and a broken primitive is caught; then main.py
opens the device store and starts the app, or says why it cannot."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from paytoken import wire
from paytoken_host.simdevice import Authority, provision
from tests.harness.mp import FIRMWARE_BUILD, command, micropython_command

# main.py with the code loaded from .mpy into the heap (docs/simulator.md, "Heap budgets").
MAIN_HEAP = "192K"


def run_main(**env: str) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAYTOKEN_SIM_")}
    return subprocess.run(
        [micropython_command(), "-X", f"heapsize={MAIN_HEAP}", "main.py"],
        cwd=FIRMWARE_BUILD,
        env=dict(clean, MICROPYPATH=".frozen:lib", **env),
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_main_runs_self_test_then_reports_an_unprovisioned_device(tmp_path: Path):
    proc = run_main()  # no flash image for the simulator: no store at all
    assert proc.returncode == 0, proc.stderr
    assert "self-test passed" in proc.stdout
    assert "EVENT device halted why=storage" in proc.stdout
    proc = run_main(PAYTOKEN_SIM_FLASH=str(tmp_path / "blank.img"))  # formatted, empty
    assert proc.returncode == 0, proc.stderr
    assert "EVENT device halted why=unprovisioned file=identity.key kind=missing" in proc.stdout
    assert "repl=locked" not in proc.stdout  # an unprovisioned device leaves the REPL to deploy and provisioning


def test_a_finalised_device_that_stops_never_reaches_the_repl(tmp_path: Path):
    # provisioned and finalised, but no radio here (no broker): the app cannot start, and main.py hands the
    # board to halt() instead of returning to the REPL (on an ESP32: Ctrl-C off, asleep until the power goes)
    auth = Authority()
    image = tmp_path / "card.img"
    provision(image, auth, auth.device(wire.ROLE_PAYER), config={"name": "card-1"}, firmware=FIRMWARE_BUILD)
    proc = run_main(PAYTOKEN_SIM_FLASH=str(image))
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.startswith("EVENT")]
    assert lines[-2:] == ["EVENT card-1 halted why=transport", "EVENT device halted repl=locked"], proc.stdout


def test_main_opens_a_provisioned_store_and_starts_its_app(tmp_path: Path):
    auth = Authority()
    image = tmp_path / "payee.img"
    provision(image, auth, auth.device(wire.ROLE_PAYEE), config={"name": "till-1"}, firmware=FIRMWARE_BUILD)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PAYTOKEN_SIM_")}
    proc = subprocess.Popen(
        [micropython_command(), "-X", f"heapsize={MAIN_HEAP}", "main.py"],
        cwd=FIRMWARE_BUILD,
        env=dict(clean, MICROPYPATH=".frozen:lib", PAYTOKEN_SIM_FLASH=str(image)),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    seen = []
    try:
        assert proc.stdout
        for line in proc.stdout:
            seen.append(line.strip())
            # store, certificate and wallet opened (the name comes from the store's config); then either the
            # terminal shows its first QR, or a build without paytoken.ble says it has no radio
            if line.startswith(("EVENT till-1 qr ", "EVENT till-1 halted why=transport")):
                break
    finally:
        proc.kill()
        proc.wait()
    assert "self-test passed" in seen[0], seen
    assert seen[-1].startswith(("EVENT till-1 qr ", "EVENT till-1 halted why=transport")), seen


def test_boots_in_place_from_the_romfs_image():
    # As an ESP32 with a romfs partition: /rom mounted before boot.py, the code never copied to the heap.
    # Inside the 96 KB a device has left once BLE runs; no flash image here, so the device halts.
    argv, env = command("96K", source="import boot\nimport main\nimport paytoken\nprint(paytoken.__file__)",
                        romfs=True)
    env = {k: v for k, v in env.items() if not k.startswith("PAYTOKEN_SIM_")}
    proc = subprocess.run(argv, cwd=FIRMWARE_BUILD, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "self-test passed" in proc.stdout
    assert "EVENT device halted why=storage" in proc.stdout
    assert proc.stdout.split()[-1] == "/rom/lib/paytoken/__init__.mpy"


def test_self_test_passes(mp):
    assert mp.call("paytoken.crypto.selftest.run") == []


def test_self_test_names_a_broken_primitive(mp):
    mp.exec(
        "from paytoken.crypto import kdf, p256\n"
        "_saved = (kdf.hmac_sha256, p256.verify)\n"
        "kdf.hmac_sha256 = lambda k, m: bytes(32)\n"
        "p256.verify = lambda pub, msg, sig: True\n"
    )
    try:
        failures = mp.call("paytoken.crypto.selftest.run")
    finally:
        mp.exec("kdf.hmac_sha256, p256.verify = _saved")
    assert "hmac_sha256" in failures and "p256_verify" in failures
    assert mp.call("paytoken.crypto.selftest.run") == []
