"""The firmware image boots on MicroPython: power-on self-test passes, and a broken primitive is caught."""

from __future__ import annotations

import os
import subprocess

from tests.harness.mp import FIRMWARE_BUILD, command, micropython_command


def test_main_runs_self_test_from_the_built_image():
    proc = subprocess.run(
        [micropython_command(), "-X", "heapsize=64K", "main.py"],
        cwd=FIRMWARE_BUILD,
        env=dict(os.environ, MICROPYPATH=".frozen:lib"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert "self-test passed" in proc.stdout


def test_boots_in_place_from_the_romfs_image():
    # As an ESP32 with a romfs partition: /rom mounted before boot.py, the code never copied to the heap.
    argv, env = command("64K", source="import boot\nimport main\nimport paytoken\nprint(paytoken.__file__)",
                        romfs=True)
    proc = subprocess.run(argv, cwd=FIRMWARE_BUILD, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "self-test passed" in proc.stdout
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
