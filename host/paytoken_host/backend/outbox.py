"""Transactional outbox: events for the bank are written in the same transaction as the money they describe,
then delivered by a sender with retries, so a settlement is never lost while the bank is down.

Delivery: POST to the bank's URL with the event as JSON; headers `Idempotency-Key` (the event's key, the same on
every retry, so the bank applies it once), `X-Paytoken-Timestamp` and `X-Paytoken-Signature`
(hex HMAC-SHA256 over `timestamp + "." + body` with the shared secret). A 2xx answer marks the event delivered;
anything else, or no answer, schedules a retry with exponential backoff (1 s doubling up to 10 minutes).
Several senders may run at once (one per worker): each claims due events with a lease (next_attempt_at moved
forward under the row lock, FOR UPDATE SKIP LOCKED on PostgreSQL), so an event is sent by one sender at a time.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import httpx
from sqlalchemy import Connection, Engine, select, update

from paytoken_host.backend import db
from paytoken_host.webhook import signature

LEASE = 30  # seconds a claimed event is reserved for the sender that claimed it
MAX_BACKOFF = 600


def event_body(key: str, kind: str, payload: dict, now: int) -> str:
    """An event as the bank receives it: compact JSON, keys sorted."""
    return json.dumps({"kind": kind, "idempotency_key": key, "created_at": now, **payload}, separators=(",", ":"),
                      sort_keys=True)


_SETTLEMENT = '{"created_at":%d,"idempotency_key":%s,"journal_entry":%d,"kind":"settlement","payments":[%s]}'
_SETTLED = '{"amount":%d,"currency":%d,"payee":"%s","payer":"%s","txid":"%s"}'


def settlement_body(key: str, entry: int, payments: list[dict], now: int) -> str:
    """event_body of a settlement (the payments' txid, payer, payee, amount and currency, and the journal entry),
    written out directly: an upload settles hundreds of payments, and a dict per payment for json.dumps to sort
    was some 6% of the worker's instructions per payment (cachegrind). The same bytes as event_body's
    (tests/test_backend_outbox.py)."""
    items = ",".join([_SETTLED % (r["amount"], r["currency"], r["payee_id"].hex(), r["payer_id"].hex(),
                                  r["txid"].hex()) for r in payments])
    return _SETTLEMENT % (now, json.dumps(key), entry, items)


def enqueue(conn: Connection, key: str, kind: str, payload: dict, now: int) -> None:
    """Queues an event (payload: its fields besides kind, key and time) in the caller's transaction."""
    _insert(conn, key, kind, event_body(key, kind, payload, now), now)


def enqueue_settlement(conn: Connection, key: str, entry: int, payments: list[dict], now: int) -> None:
    """enqueue of a settlement's event: journal entry `entry` and the settled payment rows."""
    _insert(conn, key, "settlement", settlement_body(key, entry, payments, now), now)


def _insert(conn: Connection, key: str, kind: str, body: str, now: int) -> None:
    # the same event queued before: once is enough (ON CONFLICT, not a savepoint: two round trips fewer)
    conn.execute(db.upsert(conn, db.outbox).values(idempotency_key=key, kind=kind, body=body, created_at=now,
                                                   attempts=0, next_attempt_at=now).on_conflict_do_nothing(
        index_elements=[db.outbox.c.idempotency_key]))


def _claim(engine: Engine, now: int, limit: int) -> list[tuple[int, str, str, int]]:
    ob = db.outbox
    q = (select(ob.c.id, ob.c.idempotency_key, ob.c.body, ob.c.attempts)
         .where(ob.c.delivered_at.is_(None) & (ob.c.next_attempt_at <= now)).order_by(ob.c.id).limit(limit))
    with db.write_tx(engine) as conn:
        if not db.is_sqlite(conn):
            q = q.with_for_update(skip_locked=True)
        rows = conn.execute(q).all()
        if rows:
            conn.execute(update(ob).where(ob.c.id.in_([r.id for r in rows])).values(next_attempt_at=now + LEASE))
    return [tuple(r) for r in rows]


def deliver_due(engine: Engine, url: str, secret: bytes, client: httpx.Client | None = None,
                clock: Callable[[], float] = time.time, limit: int = 100) -> tuple[int, int]:
    """Sends the events that are due; (delivered, failed)."""
    now = int(clock())
    rows = _claim(engine, now, limit)
    own = client is None
    client = client or httpx.Client(timeout=10)
    ok = failed = 0
    try:
        for event_id, key, body, attempts in rows:
            raw = body.encode()
            ts = int(clock())
            error = None
            try:
                resp = client.post(url, content=raw, headers={
                    "Content-Type": "application/json", "Idempotency-Key": key, "X-Paytoken-Timestamp": str(ts),
                    "X-Paytoken-Signature": signature(secret, ts, raw)})
                if not 200 <= resp.status_code < 300:
                    error = f"HTTP {resp.status_code}"
            except httpx.HTTPError as e:
                error = f"{type(e).__name__}: {e}"
            ob = db.outbox
            with db.write_tx(engine) as conn:
                if error is None:
                    conn.execute(update(ob).where(ob.c.id == event_id).values(
                        delivered_at=int(clock()), attempts=attempts + 1, last_error=None))
                    ok += 1
                else:
                    backoff = min(MAX_BACKOFF, 2 ** min(attempts, 10))
                    conn.execute(update(ob).where(ob.c.id == event_id).values(
                        attempts=attempts + 1, next_attempt_at=int(clock()) + backoff, last_error=error[:500]))
                    failed += 1
    finally:
        if own:
            client.close()
    return ok, failed


def backlog(conn: Connection) -> int:
    from sqlalchemy import func

    return conn.execute(select(func.count()).select_from(db.outbox).where(db.outbox.c.delivered_at.is_(None))).scalar()
