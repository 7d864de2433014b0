"""Sealed sync rig: a payer and a payee wallet on the real MicroPython unix port (protocol_rig.Rig: they pay each
other offline), each with the firmware's sync client (paytoken.sync_client), a settlement backend on SQLite or
PostgreSQL behind its real HTTP API (FastAPI's TestClient), and a relay in between: CPython code that carries each
message 1 from a device to POST /v1/sync and the message 2 back, and that a test can make hostile."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastapi.testclient import TestClient

from paytoken_host.backend import db, migrate
from paytoken_host.backend.api import create_app
from paytoken_host.backend.config import Config
from paytoken_host.backend.keys import noise_static
from paytoken_host.backend.service import ISSUER_SETTING, Backend
from tests.backend_rig import Clock, Database
from tests.harness.mp import MicroPythonError
from tests.protocol_rig import NOW, Rig, World

WHO = {"payer": "pw", "payee": "ew"}  # the rig's wallet names


def make_backend(database: Database, world: World, clock: Clock) -> Backend:
    engine = db.make_engine(database.url)
    migrate.upgrade(engine)
    with db.write_tx(engine) as conn:
        db.set_setting(conn, ISSUER_SETTING, world.issuer.public.hex())
    return Backend(engine, world.backend, clock=clock)


def http_client(backend: Backend) -> TestClient:
    return TestClient(create_app(backend, Config(background_interval=0)))


@dataclass
class Outcome:
    rounds: int  # exchanges the device answered
    refused: list[str]  # the device's refusals of damaged answers (SyncError kind messages)


class SyncRig:
    """Sync clients `sp` (payer) and `se` (payee) beside the rig's wallets, in the same MicroPython process."""

    def __init__(self, rig: Rig, backend: Backend, http: TestClient, batch: int = 8):
        self.rig, self.backend, self.http = rig, backend, http
        kx = noise_static(rig.world.backend)[1]
        rig.mp.exec("from paytoken import sync_client\n"
                    f"sp = sync_client.SyncClient(pw, {kx!r}, {batch})\n"
                    f"se = sync_client.SyncClient(ew, {kx!r}, {batch})\n")

    def client(self, who: str) -> str:
        return "sp" if who == "payer" else "se"

    def restart(self, who: str, batch: int = 8) -> None:
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

    def statuses(self, who: str) -> list[str]:
        return [s[3] for s in self.rig.call(f"sync_client.statuses({WHO[who]}, 16)")]


__all__ = ["NOW", "SyncRig", "make_backend", "http_client", "World", "Rig"]
