"""Simulated devices for the tests and the demo: a local test authority (issuer and backend keys) makes
device keys, certificates and load vouchers on the host, and the firmware's own store code writes them into
a unix_sim flash image (the file `board.storage()` mounts with LittleFS), as provisioning over USB will.

    auth = Authority()
    keys = auth.device(wire.ROLE_PAYER)
    provision(Path("payer.img"), auth, keys, vouchers=[auth.voucher(keys, 1, 100_000)], config={"name": "card"})

or from the shell (for `make demo`): python -m paytoken_host.simdevice build/demo --balance 100000
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519

from paytoken import wire
from paytoken_host import protocol
from paytoken_host.fwbuild import micropython_command

ROOT = Path(__file__).resolve().parents[2]
DAY = 86_400
USD = 840


def raw_x25519(key: x25519.X25519PrivateKey) -> tuple[bytes, bytes]:
    priv = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return priv, pub


def _scalar(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_numbers().private_value.to_bytes(32, "big")


@dataclass
class DeviceKeys:
    """What provisioning puts on one device (the private keys never leave the test host otherwise)."""

    device_id: bytes
    role: int
    identity: ec.EllipticCurvePrivateKey
    cert: bytes
    static: tuple[bytes, bytes] | None = None  # X25519 (priv, pub), payee role

    @property
    def priv(self) -> bytes:
        return _scalar(self.identity)


@dataclass
class Authority:
    """The issuer and the backend of a test deployment, with their private keys (never do this in production)."""

    issuer: protocol.Issuer = field(default_factory=protocol.Issuer)
    backend: ec.EllipticCurvePrivateKey = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    now: int = field(default_factory=lambda: int(time.time()))

    @property
    def backend_pub(self) -> bytes:
        return protocol.sec1(self.backend.public_key())

    @property
    def backend_kx(self) -> bytes:
        from paytoken_host.backend.keys import noise_static

        return noise_static(self.backend)[1]

    def device(
        self,
        role: int,
        limits: protocol.Limits | None = None,
        not_before: int | None = None,
        not_after: int | None = None,
        static: tuple[bytes, bytes] | None = None,
        device_id: bytes | None = None,
    ) -> DeviceKeys:
        identity = ec.generate_private_key(ec.SECP256R1())
        if role & wire.ROLE_PAYEE and static is None:
            static = raw_x25519(x25519.X25519PrivateKey.generate())
        device_id = device_id or os.urandom(wire.ID_LEN)
        cert = self.issuer.issue(
            device_id,
            role,
            protocol.sec1(identity.public_key()),
            static[1] if role & wire.ROLE_PAYEE else None,
            limits or protocol.Limits(),
            self.now - DAY if not_before is None else not_before,
            self.now + 365 * DAY if not_after is None else not_after,
        )
        return DeviceKeys(device_id, role, identity, cert, static if role & wire.ROLE_PAYEE else None)

    def voucher(self, keys: DeviceKeys | bytes, counter: int, amount: int, currency: int = USD) -> bytes:
        """A load voucher for a device (its keys, or just its id)."""
        device_id = keys if isinstance(keys, bytes) else keys.device_id
        return protocol.sign(self.backend, wire.voucher_body(device_id, counter, amount, currency, self.now))

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"issuer": _scalar(self.issuer.key).hex(), "backend": _scalar(self.backend).hex(),
                                    "now": self.now}, indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Authority:
        d = json.loads(path.read_text())

        def key(h: str) -> ec.EllipticCurvePrivateKey:
            return ec.derive_private_key(int(h, 16), ec.SECP256R1())

        return cls(protocol.Issuer(key(d["issuer"])), key(d["backend"]), d["now"])


def provision_source(image: str, mount: str, auth: Authority, keys: DeviceKeys, vouchers: list[bytes] = (),
                     config: dict | None = None) -> str:
    """MicroPython source that provisions the flash image with the firmware's store code, applies the vouchers,
    prints `PROVISIONED <device id hex> <balance>` and unmounts. Run by provision(), or exec'd by a test harness
    in its own MicroPython process."""
    static = keys.static[0] if keys.static else None
    return (
        "import json\nfrom binascii import hexlify\nimport board\nfrom paytoken import store\n"
        "from paytoken.app import start\n"
        f"_root = board.storage({image!r}, {mount!r})\n"
        f"store.provision(_root, {keys.priv!r}, {keys.cert!r}, {auth.issuer.public!r}, {auth.backend_pub!r},"
        f" {static!r}, json.loads({json.dumps(config)!r}), {auth.backend_kx!r})\n"
        "_dev, _trust, _wallet = start.open_device(_root)\n"
        f"for _v in {list(vouchers)!r}:\n"
        "    _wallet.apply_update(_v)\n"
        "print('PROVISIONED', hexlify(_dev.cert.device_id).decode(), _wallet.balance)\n"
        "_wallet.ledger.close()\n"
        f"board.unmount({mount!r})\n"
    )


def run_firmware(source: str, firmware: Path | None = None) -> subprocess.CompletedProcess:
    """MicroPython source run with the built firmware and the unix_sim board on its path (roomy heap): what the
    host does to a simulated device's flash image through the firmware's own code."""
    firmware = Path(firmware or os.environ.get("PAYTOKEN_FW_BUILD") or ROOT / "build" / "firmware").resolve()
    env = dict(os.environ, MICROPYPATH=f".frozen:{firmware / 'lib'}:{firmware}")
    return subprocess.run([micropython_command(), "-X", "heapsize=1M", "-c", source], capture_output=True,
                          text=True, env=env, timeout=60)


def provision(image: Path, auth: Authority, keys: DeviceKeys, vouchers: list[bytes] = (),
              config: dict | None = None, firmware: Path | None = None) -> int:
    """Provision a simulated device's flash image (created if missing); returns its balance."""
    proc = run_firmware(provision_source(str(Path(image).resolve()), "/flash", auth, keys, vouchers, config),
                        firmware)
    out = proc.stdout.split()
    if proc.returncode != 0 or "PROVISIONED" not in out:
        raise RuntimeError(f"provisioning {image} failed: {(proc.stdout + proc.stderr).strip()}")
    return int(out[out.index("PROVISIONED") + 2])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Provision a simulated payer and payee (unix_sim flash images).")
    ap.add_argument("out", type=Path, help="folder for payer.img, payee.img and authority.json")
    ap.add_argument("--balance", type=int, default=100_000, help="the payer's initial load voucher, minor units")
    ap.add_argument("--amount", type=int, default=None, help="the payee's requested amount (default: payer enters)")
    ap.add_argument("--firmware", type=Path, default=None, help="compiled firmware (default build/firmware)")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    auth_path = args.out / "authority.json"
    auth = Authority.load(auth_path) if auth_path.exists() else Authority()
    auth.save(auth_path)
    payer, payee = auth.device(wire.ROLE_PAYER), auth.device(wire.ROLE_PAYEE)
    config = {"name": "payee"} if args.amount is None else {"name": "payee", "amount": args.amount}
    provision(args.out / "payee.img", auth, payee, config=config, firmware=args.firmware)
    balance = provision(args.out / "payer.img", auth, payer, [auth.voucher(payer, 1, args.balance)],
                        {"name": "payer"}, args.firmware)
    print(f"payer {payer.device_id.hex()} balance {balance} -> {args.out / 'payer.img'}")
    print(f"payee {payee.device_id.hex()} -> {args.out / 'payee.img'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
