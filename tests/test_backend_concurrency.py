"""Exactly once under concurrency, and nothing lost in a crash: the same records uploaded by payer and payee at
the same moment, many times over, from threads in one process and from clients of a two-worker server (two
processes on one database), on SQLite and PostgreSQL; a server killed in the middle of a batch."""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import func, select

from paytoken import wire
from paytoken_host.backend import db
from tests.backend_rig import (
    World,
    database_params,
    free_port,
    init_cli,
    make_database,
    new_backend,
    pay,
    start_server,
    stop_server,
)

PAYERS, PAYEES, ROUNDS = 4, 3, 3


@pytest.fixture(params=database_params())
def database(request, tmp_path):
    d = make_database(request.param, tmp_path)
    yield d
    if d.cleanup:
        d.cleanup()


def post_retrying(url: str, body: str, client: httpx.Client | None = None) -> httpx.Response:
    """What a relay does: a connection that fails is tried again (uploads are idempotent)."""
    for attempt in range(5):
        try:
            return (client or httpx).post(url, content=body, timeout=60)
        except httpx.TransportError:
            if attempt == 4:
                raise
            time.sleep(0.2)
    raise AssertionError("unreachable")


def scenario(world: World, backend, rounds: int = ROUNDS):
    """Payers paying payees at random; after each round every device's cumulative batch is kept, so the
    uploads overlap: later batches repeat earlier records."""
    payers = [world.device(wire.ROLE_PAYER) for _ in range(PAYERS)]
    payees = [world.device(wire.ROLE_PAYEE) for _ in range(PAYEES)]
    for d in payers + payees:
        backend.register(d.cert)
    for p in payers:
        p.apply(bytes.fromhex(backend.issue_voucher(p.device_id, 500_000)["voucher"]))
    rng = random.Random(7)
    batches, expected = [], {}
    for _ in range(rounds):
        for _ in range(12):
            payer, payee = rng.choice(payers), rng.choice(payees)
            amount = rng.randrange(100, 5_000)
            # some receipts never reach the payer: those settle only through the payee
            txid = pay(payer, payee, amount, receipt_to_payer=rng.random() < 0.7)
            expected[txid] = (payee.device_id, amount)
        batches += [d.batch() for d in payers + payees]
    return payers, payees, batches, expected


def check_settled_once(backend, expected: dict) -> None:
    P = db.payments
    with db.read_tx(backend.engine) as conn:
        rows = {r.txid: r for r in conn.execute(select(P))}
        lines = conn.execute(select(func.count()).select_from(db.journal_lines)
                             .where(db.journal_lines.c.account.like("merchant:%"))).scalar()
        settled_lines = conn.execute(select(func.count(func.distinct(P.c.entry_id))).where(P.c.state == "settled")
                                     ).scalar()
    assert set(rows) == set(expected)
    assert {r.state for r in rows.values()} == {"settled"}
    assert settled_lines <= lines  # every settlement entry has its merchant lines
    per_payee: dict[str, int] = {}
    for payee, amount in expected.values():
        key = "merchant:" + payee.hex()
        per_payee[key] = per_payee.get(key, 0) + amount
    bal = backend.balances()
    assert bal["problems"] == []
    assert {k: v for k, v in bal["accounts"].items() if k.startswith("merchant:") and v} == per_payee


def test_threads_upload_the_same_records_at_once(database, tmp_path):
    world = World(tmp_path)
    backend = new_backend(database, world)
    _, _, batches, expected = scenario(world, backend)
    jobs = [b for b in batches for _ in range(3)]
    random.Random(1).shuffle(jobs)
    barrier = threading.Barrier(8)

    def run(chunk):
        barrier.wait()
        out = []
        for b in chunk:
            try:
                out.append(backend.upload(b.encode())[0])
            except Exception as e:  # Reject(409) for a batch older than what is held is fine
                out.append(getattr(e, "status", repr(e)))
        return out

    with ThreadPoolExecutor(8) as pool:
        codes = [c for chunk in pool.map(run, [jobs[i::8] for i in range(8)]) for c in chunk]
    assert set(codes) <= {200, 409}, codes
    check_settled_once(backend, expected)
    backend.engine.dispose()


def test_two_worker_server_settles_once_and_survives_a_crash_mid_batch(database, tmp_path):
    world = World(tmp_path)
    key = init_cli(database.url, world, tmp_path)
    backend = new_backend(database, world)  # the tests' own view of the same database
    backend.clock = time.time
    backend.settlement.clock = time.time
    payers, payees, batches, expected = scenario(world, backend)
    port = free_port()
    log = str(tmp_path / "server.log")
    server = start_server(database.url, key, port, workers=2, log=log)
    url = f"http://127.0.0.1:{port}/v1/uploads"
    try:
        jobs = [b for b in batches for _ in range(3)]
        random.Random(2).shuffle(jobs)
        with httpx.Client(timeout=60) as client, ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda b: post_retrying(url, b, client).status_code, jobs))
        assert set(codes) <= {200, 409}, (codes, open(log).read()[-3000:])
        check_settled_once(backend, expected)
    finally:
        stop_server(server)

    # A crash in the middle of a batch: the server dies inside the transaction, before its commit.
    new = {}
    for payer in payers:
        payee = payees[0]
        new[pay(payer, payee, 700)] = (payee.device_id, 700)
    batch = payees[0].batch()
    with db.read_tx(backend.engine) as conn:
        before = conn.execute(select(func.count()).select_from(db.journal_lines)).scalar()
    server = start_server(database.url, key, port, workers=1, extra_env={"PAYTOKEN_TEST_COMMIT_DELAY": "5"})
    result = {}

    def upload():
        try:
            result["code"] = httpx.post(url, content=batch, timeout=30).status_code
        except httpx.HTTPError as e:
            result["error"] = type(e).__name__

    t = threading.Thread(target=upload)
    t.start()
    time.sleep(1.5)  # the batch is verified and written, its transaction waits to commit
    stop_server(server, sig=9)
    t.join()
    assert "error" in result  # the relay saw no answer
    with db.read_tx(backend.engine) as conn:
        assert conn.execute(select(func.count()).select_from(db.journal_lines)).scalar() == before
    server = start_server(database.url, key, port, workers=2)
    try:
        r = post_retrying(url, batch)  # the relay retries: nothing was lost, nothing doubled
        assert r.status_code == 200 and r.json()["settled"] == len(new)
        assert httpx.post(url, content=batch, timeout=30).json()["duplicate"] is True
        check_settled_once(backend, {**expected, **new})
    finally:
        stop_server(server)
    backend.engine.dispose()

