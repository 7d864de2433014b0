"""Sealed sync rig: a payer and a payee wallet on the real MicroPython unix port (protocol_rig.Rig: they pay each
other offline), each with the firmware's sync client (paytoken.sync_client), a settlement backend on SQLite or
PostgreSQL behind its real HTTP API (FastAPI's TestClient), and a relay in between: CPython code that carries each
message 1 from a device to POST /v1/sync and the message 2 back, and that a test can make hostile."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

from fastapi.testclient import TestClient

from paytoken import wire
from paytoken_host.backend import db, migrate
from paytoken_host.backend.api import create_app
from paytoken_host.backend.config import Config
from paytoken_host.backend.keys import noise_static
from paytoken_host.backend.service import ISSUER_SETTING, Backend
from tests.backend_rig import Clock, Database, init_cli
from tests.harness.mp import MicroPythonError, command, romfs_with
from tests.protocol_rig import NOW, Rig, World
from tests.protocol_rig import Device as PDevice

WHO = {"payer": "pw", "payee": "ew"}  # the rig's wallet names


def make_backend(database: Database, world: World, clock: Clock) -> Backend:
    engine = db.make_engine(database.url)
    migrate.upgrade(engine)
    with db.write_tx(engine) as conn:
        db.set_setting(conn, ISSUER_SETTING, world.issuer.public.hex())
    return Backend(engine, world.backend, clock=clock)


@dataclass
class Served:
    """A payer and a payee registered with a backend on SQLite whose key file and database a `paytoken-backend
    serve` can run on (the operator's CLI made them); the payer's first voucher issued."""

    world: World
    payer: PDevice
    payee: PDevice
    url: str
    key: str
    backend: Backend
    voucher: bytes


def served(tmp: Path, load: int) -> Served:
    world = World()
    payer, payee = world.device(wire.ROLE_PAYER), world.device(wire.ROLE_PAYEE)
    url = f"sqlite:///{tmp}/backend.db"
    key = init_cli(url, SimpleNamespace(backend_key=world.backend, issuer=world.issuer), tmp)
    backend = make_backend(Database("sqlite", url), world, time.time)
    backend.register(payer.cert)
    backend.register(payee.cert)
    voucher = bytes.fromhex(backend.issue_voucher(payer.device_id, load)["voucher"])
    return Served(world, payer, payee, url, key, backend, voucher)


def unconfirmed_payment(rig: Rig, amount: int) -> bytes:
    """A payment the payee credited whose receipt never reached the payer (sent-unconfirmed); its txid."""
    rig.open(rig.qr())
    rig.call(f"ps.read_hello(es.read_hello({rig.call('ps.start()')!r})) and None")
    m3 = rig.call(f"ps.confirm({amount})")
    rig.call(f"es.read_payment({m3!r}) and None")
    return wire.txid(rig.payer.device_id, rig.call("pw.counter"))


def http_client(backend: Backend) -> TestClient:
    return TestClient(create_app(backend, Config(background_interval=0)))


@dataclass
class Outcome:
    rounds: int  # exchanges the device answered
    refused: list[str]  # the device's refusals of damaged answers (SyncError kind messages)


class SyncRig:
    """Sync clients `sp` (payer) and `se` (payee) beside the rig's wallets, in the same MicroPython process."""

    def __init__(self, rig: Rig, backend: Backend, http: TestClient, batch: int = 4):
        self.rig, self.backend, self.http = rig, backend, http
        kx = noise_static(rig.world.backend)[1]
        rig.mp.exec("from paytoken import sync_client\n"
                    f"sp = sync_client.SyncClient(pw, {kx!r}, {batch})\n"
                    f"se = sync_client.SyncClient(ew, {kx!r}, {batch})\n")

    def client(self, who: str) -> str:
        return "sp" if who == "payer" else "se"

    def restart(self, who: str, batch: int = 4) -> None:
        """A new sync session of the device (the status cursor comes back from its flash)."""
        kx = noise_static(self.rig.world.backend)[1]
        self.rig.mp.exec(f"{self.client(who)} = sync_client.SyncClient({WHO[who]}, {kx!r}, {batch})")

    def request(self, who: str) -> bytes | None:
        return self.rig.call(f"{self.client(who)}.request()")

    def answer(self, who: str, msg2: bytes) -> int:
        return self.rig.call(f"{self.client(who)}.answer({msg2!r})")

    def post(self, msg1: bytes) -> bytes:
        r = self.http.post("/v1/sync", content=msg1, headers={"content-type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        return r.content

    def sync(self, who: str, tamper: Callable[[bytes, bytes], bytes | None] | None = None,
             rounds: int = 12) -> Outcome:
        """Relays the device's exchanges until it has nothing more to say; tamper(msg1, msg2) -> what the device
        gets instead of msg2 (None: nothing, the answer is dropped)."""
        refused = []
        for n in range(rounds):
            msg1 = self.request(who)
            if msg1 is None:
                return Outcome(n, refused)
            msg2 = self.post(msg1)
            if tamper is not None:
                msg2 = tamper(msg1, msg2)
                if msg2 is None:
                    continue
            try:
                self.answer(who, msg2)
            except MicroPythonError as e:
                if e.kind != "SyncError":
                    raise
                refused.append(e.msg)
        raise AssertionError(f"{who} still had something to say after {rounds} exchanges")

    def wake_hint(self, who: str) -> tuple[bytes, int]:
        token, cursor = self.rig.call(f"{self.client(who)}.wake_hint()")
        return token, cursor

    def wake(self, hint: tuple[bytes, int], wait: float) -> dict:
        """What a device's relay gets from the wake-up long-poll (GET /v1/wake) with the device's hint (HTTP only:
        a relay waiting in a thread must not talk to the MicroPython process the test drives)."""
        r = self.http.get(f"/v1/wake/{hint[0].hex()}", params={"since": hint[1], "wait": wait})
        assert r.status_code == 200, r.text
        return r.json()

    def statuses(self, who: str) -> list[str]:
        return [s[3] for s in self.rig.call(f"sync_client.statuses({WHO[who]}, 16)")]




def device_dir(rig: Rig, who: str, path: Path) -> Path:
    """A copy of one rig device's keys and ledger as tests/harness/sync_side.py reads them (no status cursor)."""
    dev = rig.payer if who == "payer" else rig.payee
    path.mkdir(parents=True, exist_ok=True)
    files = {"issuer.pub": rig.world.issuer.public, "backend.pub": rig.world.backend_pub, "now": str(NOW).encode(),
             "identity.key": dev.priv, "cert.bin": dev.cert, "backend.kx": noise_static(rig.world.backend)[1]}
    for name, data in files.items():
        (path / name).write_bytes(data)
    shutil.copyfile(f"{rig.dir}/{who}.log", path / "wallet.log")
    return path


def run_side(backend: Backend, source: Path, heapsize: str, batch: int = 4, romfs: bool = False) -> dict | None:
    """One sync of the device in `source` (device_dir) in its own MicroPython process at -X heapsize, from a fresh
    copy of its ledger, relayed straight to backend.sync; {"exchanges", "applied", "seconds"} or None if the device
    failed (out of heap). Uploads repeat safely, so runs at several heap sizes see the same exchanges."""
    with tempfile.TemporaryDirectory(prefix="paytoken-sync-") as tmp:
        d = Path(tmp) / "dev"
        shutil.copytree(source, d)
        argv, env = command(heapsize, module="sync_side", args=(str(d), str(batch)), romfs=romfs,
                            image=romfs_with(("sync_side",)) if romfs else None)
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                text=True, env=env)
        assert proc.stdin and proc.stdout
        done = None
        for line in proc.stdout:
            if line.startswith("M1"):
                (d / "m2").write_bytes(backend.sync((d / "m1").read_bytes()))
                proc.stdin.write("\n")
                proc.stdin.flush()
            elif line.startswith("DONE"):
                _, exchanges, applied = line.split()
                done = {"exchanges": int(exchanges), "applied": int(applied)}
        proc.stdin.close()
        proc.wait()
        if proc.returncode != 0 or done is None:
            return None
        done["seconds"] = time.perf_counter() - t0
        return done
