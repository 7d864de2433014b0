"""The device store (paytoken.store) and the simulator's flash storage (board.storage, board.filedev) on MicroPython:
what provisioning writes, what a device checks on boot, a clear error for every missing or damaged file, and a
LittleFS image on a host file that persists, is never reformatted, and keeps the heap small."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric import ec

from paytoken import wire
from paytoken_host import protocol
from paytoken_host.simdevice import Authority, DeviceKeys, provision_source
from tests.harness.mp import MicroPython, MicroPythonError, run_script

PAYER, PAYEE = wire.ROLE_PAYER, wire.ROLE_PAYEE


@pytest.fixture(scope="module")
def mp():
    with MicroPython(heapsize="1M") as proc:
        proc.exec("import os\nimport board\nfrom paytoken import store\nfrom paytoken.app import start\n")
        yield proc


@pytest.fixture(scope="module")
def auth() -> Authority:
    return Authority()


def provision(mp: MicroPython, root: Path, auth: Authority, keys: DeviceKeys, config: dict | None = None,
              static: bytes | None | str = "keys", issuer: bytes | None = None, priv: bytes | None = None,
              cert: bytes | None = None):
    static = (keys.static[0] if keys.static else None) if static == "keys" else static
    issuer = issuer or auth.issuer.public
    return mp.eval(
        f"store.provision({str(root)!r}, {priv or keys.priv!r}, {cert or keys.cert!r}, {issuer!r},"
        f" {auth.backend_pub!r}, {static!r}, {config!r}) and None"
    )


def load(mp: MicroPython, root: Path) -> dict:
    return mp.eval(
        f"(lambda d: {{'role': d.cert.role, 'app': d.app, 'name': d.name, 'id': d.cert.device_id,"
        f" 'ledger': d.ledger_path, 'static_pub': d.static_pub, 'config': d.config}})(store.load({str(root)!r}))"
    )


def store_error(fn, *args, **kw) -> str:
    with pytest.raises(MicroPythonError) as exc:
        fn(*args, **kw)
    assert exc.value.kind == "StoreError", exc.value
    return exc.value.msg


def files(root: Path) -> dict[str, bytes]:
    d = root / "store"
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())} if d.exists() else {}


def test_provision_then_load(mp, auth, tmp_path):
    payee = auth.device(PAYEE)
    provision(mp, tmp_path, auth, payee, {"name": "till-1", "amount": 2500})
    got = load(mp, tmp_path)
    assert got == {"role": PAYEE, "app": "terminal", "name": "till-1", "id": payee.device_id,
                   "ledger": f"{tmp_path}/ledger/wallet.log", "static_pub": payee.static[1],
                   "config": {"name": "till-1", "amount": 2500}}
    # the layout docs/architecture.md gives, byte for byte; nothing half-written left behind
    assert files(tmp_path) == {"backend.pub": auth.backend_pub, "cert.bin": payee.cert,
                               "config.json": json.dumps({"name": "till-1", "amount": 2500}).encode(),
                               "identity.key": payee.priv, "issuer.pub": auth.issuer.public,
                               "static.key": payee.static[0], "final": payee.device_id}
    assert (tmp_path / "ledger").is_dir()
    # a payer: no static key, no config (name and app from the role)
    payer_root = tmp_path / "card"
    payer_root.mkdir()
    provision(mp, payer_root, auth, auth.device(PAYER))
    got = load(mp, payer_root)
    assert (got["app"], got["name"], got["static_pub"], got["config"]) == ("card", "payer", None, {})
    assert "static.key" not in files(payer_root) and "config.json" not in files(payer_root)


def test_the_backend_sync_key_is_kept(mp, auth, tmp_path):
    payer = auth.device(PAYER)
    mp.eval(f"store.provision({str(tmp_path)!r}, {payer.priv!r}, {payer.cert!r}, {auth.issuer.public!r},"
            f" {auth.backend_pub!r}, None, None, {auth.backend_kx!r}) and None")
    assert files(tmp_path)["backend.kx"] == auth.backend_kx
    assert mp.eval(f"store.load({str(tmp_path)!r}).backend_kx") == auth.backend_kx
    provision(mp, tmp_path, auth, payer)  # provisioned again without it: none left behind
    assert "backend.kx" not in files(tmp_path) and mp.eval(f"store.load({str(tmp_path)!r}).backend_kx") is None


def test_dual_role_device_follows_its_config(mp, auth, tmp_path):
    both = auth.device(PAYER | PAYEE)
    provision(mp, tmp_path, auth, both)
    assert load(mp, tmp_path)["app"] == "card"
    provision(mp, tmp_path, auth, both, {"app": "terminal"})
    assert load(mp, tmp_path)["app"] == "terminal"


@pytest.mark.parametrize("name", ["identity.key", "cert.bin", "issuer.pub", "backend.pub", "static.key"])
def test_a_missing_file_is_named(mp, auth, tmp_path, name):
    provision(mp, tmp_path, auth, auth.device(PAYEE))
    (tmp_path / "store" / name).unlink()
    assert store_error(load, mp, tmp_path) == f"store: {name} missing"


def test_a_damaged_file_is_named(mp, auth, tmp_path):
    payee = auth.device(PAYEE)
    other = auth.device(PAYEE)
    cases = {
        "backend.kx": (bytes(31), "store: backend.kx corrupt: not 32 bytes"),
        "identity.key": (payee.priv[:31], "store: identity.key corrupt: not 32 bytes"),
        "cert.bin": (payee.cert[:-1], "store: cert.bin corrupt: certificate: wrong length"),
        "issuer.pub": (b"\x04" + bytes(64), "store: issuer.pub corrupt: not a point on P-256"),
        "backend.pub": (auth.backend_pub[:33], "store: backend.pub corrupt: not a 65-byte uncompressed P-256 key"),
        "static.key": (bytes(31), "store: static.key corrupt: not 32 bytes"),
        "config.json": (b"{name:", "store: config.json corrupt: not JSON"),
    }
    for name, (data, message) in cases.items():
        provision(mp, tmp_path, auth, payee)
        (tmp_path / "store" / name).write_bytes(data)
        assert store_error(load, mp, tmp_path) == message, name
    # keys that are well-formed but not the certificate's
    for name, data in (("identity.key", other.priv), ("static.key", other.static[0])):
        provision(mp, tmp_path, auth, payee)
        (tmp_path / "store" / name).write_bytes(data)
        assert store_error(load, mp, tmp_path) == f"store: {name} mismatch: not the key the certificate names"
    provision(mp, tmp_path, auth, payee)
    (tmp_path / "store" / "issuer.pub").write_bytes(Authority().issuer.public)
    assert store_error(load, mp, tmp_path) == (
        "store: cert.bin mismatch: issued under another issuer key than issuer.pub")


@pytest.mark.parametrize("config", [{"name": "has space"}, {"name": ""}, {"name": "x" * 17}, {"app": "phone"},
                                    {"amount": 0}, {"amount": -5}, {"amount": "10"}, {"amount": True},
                                    {"qr_amount": 1}, [1, 2]])
def test_bad_config_is_refused(mp, auth, tmp_path, config):
    provision(mp, tmp_path, auth, auth.device(PAYEE))
    (tmp_path / "store" / "config.json").write_text(json.dumps(config))
    assert store_error(load, mp, tmp_path).startswith("store: config.json corrupt: ")


def test_certificate_not_signed_by_the_issuer_stops_the_boot(mp, auth, tmp_path):
    keys = auth.device(PAYER)
    forged = keys.cert[:-1] + bytes([keys.cert[-1] ^ 1])
    provision(mp, tmp_path, auth, keys, cert=forged)  # every file well-formed, the keys match
    with pytest.raises(MicroPythonError) as exc:
        mp.eval(f"start.open_device({str(tmp_path)!r}) and None")
    assert exc.value.kind == "StoreError" and exc.value.msg == "store: cert.bin mismatch: certificate invalid"


def test_bad_provisioning_input_writes_nothing(mp, auth, tmp_path):
    payee = auth.device(PAYEE)
    wrong = ec.generate_private_key(ec.SECP256R1()).private_numbers().private_value.to_bytes(32, "big")
    for kw, message in (
        ({"priv": wrong}, "store: identity.key mismatch: not the key the certificate names"),
        ({"static": None}, "store: static.key missing"),
        ({"issuer": Authority().issuer.public}, "store: cert.bin mismatch: issued under another issuer key than"
                                                " issuer.pub"),
        ({"cert": b"C\x01" + bytes(20)}, "store: cert.bin corrupt: certificate: wrong length"),
        ({"config": {"app": "phone"}}, "store: config.json corrupt: app: card or terminal"),
    ):
        assert store_error(provision, mp, tmp_path, auth, payee, **kw) == message
        assert files(tmp_path) == {}


def test_provisioning_keeps_a_ledger_with_its_owner(mp, auth, tmp_path):
    payer = auth.device(PAYER)
    image, mount = str(tmp_path / "card.img"), "/keep"
    mp.exec(provision_source(image, mount, auth, payer, [auth.voucher(payer, 1, 7_000)], {"name": "card"}))
    mp.exec(f"root = board.storage({image!r}, {mount!r})")
    try:
        # another device's identity over this device's ledger: refused, the store stays as it was
        stranger = auth.device(PAYER)
        msg = store_error(mp.eval, f"store.provision(root, {stranger.priv!r}, {stranger.cert!r},"
                                   f" {auth.issuer.public!r}, {auth.backend_pub!r}) and None")
        assert msg == "store: cert.bin mismatch: the ledger on this device belongs to another device id"
        # the same device with a renewed certificate: accepted, and its money is still there
        renewed = auth.issuer.issue(payer.device_id, PAYER, protocol.sec1(payer.identity.public_key()), None,
                                    protocol.Limits(per_payment=20_000), auth.now - 10, auth.now + 1000, serial=2)
        mp.eval(f"store.provision(root, {payer.priv!r}, {renewed!r}, {auth.issuer.public!r}, {auth.backend_pub!r},"
                " None, {'name': 'card'}) and None")
        assert mp.eval("(lambda d: [d[0].cert.serial, d[2].balance])(start.open_device(root))") == [2, 7_000]
        assert not [n for n in mp.eval("os.listdir(root + '/store')") if n.endswith(".tmp")]
    finally:
        mp.exec(f"board.unmount({mount!r})")


# ---- the simulator's flash storage ----


def test_flash_image_persists_and_is_never_reformatted(mp, tmp_path):
    image = tmp_path / "dev.img"
    mp.exec(f"r = board.storage({str(image)!r}, '/fl')\n"
            "with open(r + '/note', 'w') as f:\n    f.write('kept')\n"
            "board.unmount('/fl')\n")
    assert image.stat().st_size == 256 * 4096  # formatted on first use, 1 MB
    assert mp.eval(f"open(board.storage({str(image)!r}, '/fl') + '/note').read()") == "kept"
    assert mp.eval(f"board.storage({str(image)!r}, '/fl')") == "/fl"  # mounted once
    with pytest.raises(MicroPythonError) as exc:
        mp.eval(f"board.storage({str(tmp_path / 'other.img')!r}, '/fl')")
    assert "already holds" in exc.value.msg
    mp.exec("board.unmount('/fl')")
    # an image that is not LittleFS (damaged, or something else): refused, not a byte changed
    junk = tmp_path / "junk.img"
    data = bytes(range(256)) * (4096 * 4 // 256)
    junk.write_bytes(data)
    with pytest.raises(MicroPythonError) as exc:
        mp.eval(f"board.storage({str(junk)!r}, '/fl')")
    assert exc.value.kind == "OSError" and "not reformatting" in exc.value.msg
    assert junk.read_bytes() == data
    (tmp_path / "odd.img").write_bytes(bytes(5000))
    with pytest.raises(MicroPythonError) as exc:
        mp.eval(f"board.storage({str(tmp_path / 'odd.img')!r}, '/fl')")
    assert exc.value.kind == "ValueError" and "whole number" in exc.value.msg


def test_storage_needs_an_image_path(mp):
    mp.exec("os.unsetenv('PAYTOKEN_SIM_FLASH')")
    with pytest.raises(MicroPythonError) as exc:
        mp.eval("board.storage(None, '/nowhere')")
    assert exc.value.kind == "OSError" and "PAYTOKEN_SIM_FLASH" in exc.value.msg


def test_flash_image_keeps_the_heap_small(tmp_path):
    # A ledger of 300 appends on a 1 MB image in a 28 KB heap (the board's and the ledger's code from .mpy
    # included): the image stays in the file, not in RAM.
    image = tmp_path / "small.img"
    proc = run_script(
        "import gc, os\nimport board\nfrom paytoken.ledger import Ledger\n"
        "gc.collect(); before = gc.mem_alloc()\n"
        f"root = board.storage({str(image)!r}, '/fl')\n"
        "gc.collect(); mounted = gc.mem_alloc() - before\n"
        "led = Ledger(root + '/w.log')\n"
        "for i in range(300):\n    led.append(bytes(180))\n"
        "led.close()\nboard.unmount('/fl')\n"
        "root = board.storage(" + repr(str(image)) + ", '/fl')\n"
        "print(Ledger(root + '/w.log').seq, mounted)\n",
        heapsize="28K",
    )
    assert proc.returncode == 0, proc.stderr + proc.stdout
    seq, mounted = map(int, proc.stdout.split())
    assert seq == 300 and mounted < 8 * 1024
