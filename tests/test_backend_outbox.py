"""The transactional outbox and the bank webhook: a fake bank on this machine that is down, then answers with
errors, then loses its answers after applying, then works; every event reaches it exactly once by its
idempotency key, signed with the shared HMAC key, in the order of the money it describes."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy import select

from paytoken import wire
from paytoken_host.backend import db, outbox
from paytoken_host.bank_receiver import Refused, check_signature
from tests.backend_rig import (
    Clock,
    World,
    database_params,
    free_port,
    make_database,
    new_backend,
    paid_and_uploaded,
)

SECRET = b"bank-shared-secret"


class FakeBank:
    """mode: 'up' (applies, 200), 'error' (503, applies nothing), 'lost' (applies, then answers 500, as a
    response lost on the way back)."""

    def __init__(self) -> None:
        self.mode = "up"
        self.applied: dict[str, dict] = {}
        self.requests = 0
        self.bad_signatures = 0
        bank = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                bank.requests += 1
                try:  # the sample receiver's check (the clock here is the test's: no freshness check)
                    check_signature(SECRET, self.headers["X-Paytoken-Timestamp"],
                                    self.headers["X-Paytoken-Signature"], body, 0, max_skew=None)
                except Refused:
                    bank.bad_signatures += 1
                    self.send_response(401)
                    self.end_headers()
                    return
                if bank.mode == "error":
                    self.send_response(503)
                    self.end_headers()
                    return
                key = self.headers["Idempotency-Key"]
                bank.applied.setdefault(key, json.loads(body))  # a bank applies one key once
                self.send_response(500 if bank.mode == "lost" else 200)
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server: ThreadingHTTPServer | None = None
        self.handler = Handler
        self.port = free_port()

    def start(self) -> None:
        self.server = ThreadingHTTPServer(("127.0.0.1", self.port), self.handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.server:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/paytoken"


@pytest.fixture(params=database_params())
def env(request, tmp_path):
    database = make_database(request.param, tmp_path)
    world = World(tmp_path)
    clock = Clock()
    backend = new_backend(database, world, clock)
    bank = FakeBank()
    yield world, backend, clock, bank
    bank.stop()
    backend.engine.dispose()
    if database.cleanup:
        database.cleanup()


def pending(backend) -> list:
    with db.read_tx(backend.engine) as conn:
        return conn.execute(select(db.outbox.c.idempotency_key, db.outbox.c.attempts, db.outbox.c.last_error)
                            .where(db.outbox.c.delivered_at.is_(None)).order_by(db.outbox.c.id)).all()


def test_no_settlement_is_lost_while_the_bank_is_down(env):
    world, backend, clock, bank = env
    payer, payee = paid_and_uploaded(world, backend, 50_000, [1_200, 800])
    keys = [k for k, _, _ in pending(backend)]
    assert keys == [f"voucher:{payer.device_id.hex()}:1", f"settle:{payee.device_id.hex()}:2"]

    def deliver():
        return outbox.deliver_due(backend.engine, bank.url, SECRET, clock=clock)

    assert deliver() == (0, 2)  # nobody listening: both kept, retried later
    assert all("ConnectError" in e for _, _, e in pending(backend))
    assert deliver() == (0, 0)  # backing off: not due yet
    bank.start()
    bank.mode = "error"
    clock.t += 2
    assert deliver() == (0, 2)
    assert [a for _, a, _ in pending(backend)] == [2, 2]
    bank.mode = "lost"  # the bank applies them but the answers are lost
    clock.t += 4
    assert deliver() == (0, 2)
    assert len(bank.applied) == 2
    bank.mode = "up"
    clock.t += 8
    assert deliver() == (2, 0)
    assert pending(backend) == [] and deliver() == (0, 0)
    assert set(bank.applied) == set(keys) and bank.bad_signatures == 0  # each applied once, by its key
    settle = bank.applied[keys[1]]
    assert settle["kind"] == "settlement" and sorted(p["amount"] for p in settle["payments"]) == [800, 1_200]
    assert bank.applied[keys[0]]["amount"] == 50_000
    # a wrong secret is refused by the bank and the event stays queued
    backend.issue_voucher(payer.device_id, 1)
    assert outbox.deliver_due(backend.engine, bank.url, b"wrong", clock=clock) == (0, 1)
    assert bank.bad_signatures == 1 and len(pending(backend)) == 1


def test_each_worker_delivers_the_outbox_in_the_background(env):
    from fastapi.testclient import TestClient

    from paytoken_host.backend.api import create_app
    from paytoken_host.backend.config import Config

    world, backend, clock, bank = env
    payer = world.device(wire.ROLE_PAYER)
    backend.register(payer.cert)
    backend.issue_voucher(payer.device_id, 3_000)
    bank.start()
    config = Config(bank_url=bank.url, bank_secret=SECRET.decode(), background_interval=0.05)
    with TestClient(create_app(backend, config)):
        deadline = time.time() + 10
        while not bank.applied and time.time() < deadline:
            time.sleep(0.05)
    assert list(bank.applied) == [f"voucher:{payer.device_id.hex()}:1"] and pending(backend) == []


def test_settlement_body_is_the_generic_event_json() -> None:
    """The settlement event written out directly is byte for byte what event_body makes of the same fields."""
    rows = [{"txid": bytes([i]) * 16, "payer_id": bytes([i, 0xFF]) * 4, "payee_id": bytes(8), "amount": a,
             "currency": 840, "state": "settled"} for i, a in ((1, 1), (2, 4_294_967_295), (0xAB, 0))]
    for key, entry, settled in (("settle:00ff00ff00ff00ff:7", 12, rows), ('odd "key"\\', 0, rows[:1]),
                                ("settle:x:1", 3, [])):
        expected = outbox.event_body(key, "settlement", {
            "payments": [{"txid": r["txid"].hex(), "payer": r["payer_id"].hex(), "payee": r["payee_id"].hex(),
                          "amount": r["amount"], "currency": r["currency"]} for r in settled],
            "journal_entry": entry}, 1_790_000_000)
        assert outbox.settlement_body(key, entry, settled, 1_790_000_000) == expected
