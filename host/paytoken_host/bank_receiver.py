"""A sample bank receiver for the settlement backend's webhook (backend/outbox.py): what a bank puts behind the URL
it gives the backend. It checks every event's HMAC signature and timestamp, applies each idempotency key once
(the backend retries until it gets a 2xx), and keeps account balances in SQLite:

    topup        offline:<card> += amount, funding -= amount   (a load voucher: money moved onto a card)
    settlement   offline:<payer> -= amount, merchant:<payee> += amount, per settled payment
    refund       counted; no money moves (an unconfirmed payment expired: the card got its money back, and
                 the backend never settled it, so it never left offline:<payer>)

    python -m paytoken_host.bank_receiver --port 8099 --db bank.sqlite   (secret in PAYTOKEN_BANK_SECRET)
    GET /balances -> {"notifications": n, "balances": {account: minor units}}

Used by `make demo`; a real bank does the same checks in front of its own ledger.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import sqlite3
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from paytoken_host.webhook import signature

SECRET_ENV = "PAYTOKEN_BANK_SECRET"
MAX_BODY = 1 << 20
MAX_SKEW = 300  # seconds between the event's timestamp and the bank's clock


class Refused(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


def check_signature(secret: bytes, timestamp: str | None, sig: str | None, body: bytes, now: float,
                    max_skew: int | None = MAX_SKEW) -> None:
    """Refused(401) unless sig is the signature of body at timestamp and timestamp is within max_skew of now
    (None: no freshness check)."""
    if not timestamp or not sig:
        raise Refused(401, "missing X-Paytoken-Timestamp or X-Paytoken-Signature")
    if not hmac.compare_digest(signature(secret, timestamp, body), sig):
        raise Refused(401, "bad signature")
    try:
        ts = int(timestamp)
    except ValueError:
        raise Refused(401, "bad timestamp") from None
    if max_skew is not None and abs(now - ts) > max_skew:
        raise Refused(401, f"timestamp more than {max_skew} s from the bank's clock")


def postings(event: dict) -> dict[str, int]:
    """The balance changes an event asks for (Refused(422) for an event this bank cannot read)."""
    try:
        kind = event["kind"]
        if kind == "topup":
            amount = _amount(event["amount"])
            return {f"offline:{_hex(event['device'])}": amount, "funding": -amount}
        if kind == "settlement":
            lines: dict[str, int] = {}
            for p in event["payments"]:
                amount = _amount(p["amount"])
                payer, payee = f"offline:{_hex(p['payer'])}", f"merchant:{_hex(p['payee'])}"
                lines[payer] = lines.get(payer, 0) - amount
                lines[payee] = lines.get(payee, 0) + amount
            return lines
        if kind == "refund":
            for p in event["payments"]:  # checked all the same: a bank reads what it records
                _amount(p["amount"])
                _hex(p["payer"])
            return {}
    except (KeyError, TypeError) as e:
        raise Refused(422, f"malformed event: {e!r}") from None
    raise Refused(422, f"unknown event kind {kind!r}")


def _amount(v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool) or not 0 < v < 1 << 32:
        raise Refused(422, f"amount: {v!r}")
    return v


def _hex(v: object) -> str:
    if not isinstance(v, str) or len(v) != 16 or v.strip("0123456789abcdef"):
        raise Refused(422, f"device id: {v!r}")
    return v


class Ledger:
    """Applied idempotency keys and balances, in one SQLite file (':memory:' for a throwaway bank)."""

    def __init__(self, path: str | Path = ":memory:"):
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._lock = threading.Lock()
        self._db.executescript(
            "CREATE TABLE IF NOT EXISTS events (key TEXT PRIMARY KEY, kind TEXT NOT NULL, body TEXT NOT NULL,"
            " applied_at INTEGER NOT NULL);"
            "CREATE TABLE IF NOT EXISTS balances (account TEXT PRIMARY KEY, amount INTEGER NOT NULL);")

    def apply(self, key: str, event: dict, body: bytes, now: float) -> bool:
        """Applies the event under key once; False when the key was applied before (nothing changes)."""
        lines = postings(event)
        if event.get("idempotency_key", key) != key:
            raise Refused(422, "Idempotency-Key is not the event's idempotency_key")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                if self._db.execute("SELECT 1 FROM events WHERE key = ?", (key,)).fetchone():
                    self._db.execute("ROLLBACK")
                    return False
                self._db.execute("INSERT INTO events VALUES (?, ?, ?, ?)",
                                 (key, event["kind"], body.decode(), int(now)))
                for account, delta in lines.items():
                    self._db.execute("INSERT INTO balances VALUES (?, ?) ON CONFLICT(account) DO UPDATE"
                                     " SET amount = amount + excluded.amount", (account, delta))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return True

    def summary(self) -> dict:
        with self._lock:
            n = self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
            rows = self._db.execute("SELECT account, amount FROM balances ORDER BY account").fetchall()
        return {"notifications": n, "balances": dict(rows)}

    def close(self) -> None:
        self._db.close()


class BankReceiver:
    """The HTTP receiver: POST any path with the webhook's headers; GET /balances. start() serves in a thread."""

    def __init__(self, secret: bytes, ledger: Ledger | None = None, host: str = "127.0.0.1", port: int = 0,
                 max_skew: int | None = MAX_SKEW, clock: Callable[[], float] = time.time):
        self.secret = secret
        self.ledger = ledger or Ledger()
        self.max_skew = max_skew
        self.clock = clock
        self.refused: list[str] = []  # reasons of refused requests, newest last
        self.server = ThreadingHTTPServer((host, port), self._handler())
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}/paytoken"

    def receive(self, headers: dict[str, str | None], body: bytes) -> tuple[int, dict]:
        """One webhook request: (status, answer)."""
        try:
            check_signature(self.secret, headers.get("X-Paytoken-Timestamp"), headers.get("X-Paytoken-Signature"),
                            body, self.clock(), self.max_skew)
            key = headers.get("Idempotency-Key")
            if not key:
                raise Refused(400, "missing Idempotency-Key")
            try:
                event = json.loads(body)
            except ValueError:
                raise Refused(400, "body is not JSON") from None
            if not isinstance(event, dict):
                raise Refused(400, "body is not a JSON object")
            applied = self.ledger.apply(key, event, body, self.clock())
            return 200, {"applied": applied}
        except Refused as r:
            self.refused.append(r.reason)
            return r.status, {"error": r.reason}

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        bank = self

        class Handler(BaseHTTPRequestHandler):
            def _answer(self, status: int, answer: dict) -> None:
                raw = json.dumps(answer).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                length = self.headers.get("Content-Length", "")
                if not length.isdigit() or int(length) > MAX_BODY:
                    self._answer(413 if length.isdigit() else 411, {"error": "body length"})
                    return
                body = self.rfile.read(int(length))
                self._answer(*bank.receive(dict(self.headers.items()), body))

            def do_GET(self) -> None:  # noqa: N802
                if self.path.rstrip("/") == "/balances":
                    self._answer(200, bank.ledger.summary())
                else:
                    self._answer(404, {"error": "not found"})

            def log_message(self, *args: object) -> None:
                pass

        return Handler

    def start(self) -> BankReceiver:
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.ledger.close()

    def __enter__(self) -> BankReceiver:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="A sample bank receiver for the paytoken backend's webhook: checks "
                                 "signatures, applies each event once, keeps balances. Secret in "
                                 f"${SECRET_ENV}. Exit 2 on bad arguments.")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8099)
    ap.add_argument("--db", default="bank.sqlite", help="SQLite file of applied events and balances")
    ap.add_argument("--max-skew", type=int, default=MAX_SKEW, help="seconds an event's timestamp may be off")
    args = ap.parse_args(argv)
    secret = os.environ.get(SECRET_ENV, "")
    if not secret:
        print(f"bank_receiver: set {SECRET_ENV} to the secret shared with the backend", file=sys.stderr)
        return 2
    bank = BankReceiver(secret.encode(), Ledger(args.db), args.host, args.port, args.max_skew)
    print(f"bank receiver on {bank.url} (balances: GET /balances)", flush=True)
    try:
        bank.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        bank.server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
