"""The sample bank receiver (paytoken_host.bank_receiver) behind the backend's real outbox: every event checked
(signature, timestamp, idempotency key, body), each applied once however often it is delivered, balances kept
across a restart; anything wrong is refused with a reason and changes nothing."""

from __future__ import annotations

import json

import httpx
import pytest

from paytoken_host.backend import outbox
from paytoken_host.bank_receiver import BankReceiver, Ledger, main
from paytoken_host.webhook import signature
from tests.backend_rig import Clock, World, make_database, new_backend, paid_and_uploaded

SECRET = b"shared-with-the-backend"


def post(bank: BankReceiver, body: bytes, key: str = "k1", ts: int | None = None, secret: bytes = SECRET,
         sig: str | None = None) -> httpx.Response:
    ts = int(bank.clock()) if ts is None else ts
    return httpx.post(bank.url, content=body, headers={
        "Idempotency-Key": key, "X-Paytoken-Timestamp": str(ts),
        "X-Paytoken-Signature": sig or signature(secret, ts, body)})


def balances(bank: BankReceiver) -> dict:
    return httpx.get(bank.url.rsplit("/", 1)[0] + "/balances").json()


def test_the_backends_events_reach_the_bank_once(tmp_path):
    world, clock = World(tmp_path), Clock()
    backend = new_backend(make_database("sqlite", tmp_path), world, clock)
    payer, payee = paid_and_uploaded(world, backend, 50_000, [1_200, 800])
    with BankReceiver(SECRET, Ledger(tmp_path / "bank.sqlite"), clock=clock) as bank:
        assert outbox.deliver_due(backend.engine, bank.url, SECRET, clock=clock) == (2, 0)
        want = {"funding": -50_000, f"offline:{payer.device_id.hex()}": 48_000,
                f"merchant:{payee.device_id.hex()}": 2_000}
        assert balances(bank) == {"notifications": 2, "balances": want}
        # the backend's books say the same
        accounts = backend.balances()["accounts"]
        assert accounts[f"offline:{payer.device_id.hex()}"] == 48_000
        assert accounts[f"merchant:{payee.device_id.hex()}"] == 2_000
        # delivered again (an answer lost on the way back): applied once
        raw = json.dumps({"kind": "topup", "idempotency_key": f"voucher:{payer.device_id.hex()}:1",
                          "device": payer.device_id.hex(), "amount": 50_000}).encode()
        r = post(bank, raw, key=f"voucher:{payer.device_id.hex()}:1")
        assert (r.status_code, r.json()) == (200, {"applied": False})
        assert balances(bank)["balances"] == want
    # a restarted bank remembers what it applied
    with BankReceiver(SECRET, Ledger(tmp_path / "bank.sqlite"), clock=clock) as bank:
        assert balances(bank) == {"notifications": 2, "balances": want}
    backend.engine.dispose()


@pytest.mark.parametrize("case, status, reason", [
    ("wrong secret", 401, "bad signature"),
    ("altered body", 401, "bad signature"),
    ("stale", 401, "timestamp more than 300 s from the bank's clock"),
    ("no key", 400, "missing Idempotency-Key"),
    ("key mismatch", 422, "Idempotency-Key is not the event's idempotency_key"),
    ("not json", 400, "body is not JSON"),
    ("unknown kind", 422, "unknown event kind 'gift'"),
    ("bad amount", 422, "amount: -5"),
    ("bad device", 422, "device id: 'zz'"),
])
def test_a_bad_event_is_refused_and_changes_nothing(case, status, reason):
    good = {"kind": "topup", "idempotency_key": "k1", "device": "00" * 8, "amount": 500}
    body = json.dumps(good).encode()
    with BankReceiver(SECRET) as bank:
        key, ts, secret, sig = "k1", None, SECRET, None
        if case == "wrong secret":
            secret = b"guess"
        elif case == "altered body":
            sig = signature(SECRET, int(bank.clock()), body)
            body = body.replace(b"500", b"900")
        elif case == "stale":
            ts = int(bank.clock()) - 301
        elif case == "no key":
            key = ""
        elif case == "key mismatch":
            key = "k2"
        elif case == "not json":
            body = b"{"
        else:
            field = {"unknown kind": ("kind", "gift"), "bad amount": ("amount", -5), "bad device": ("device", "zz")}
            body = json.dumps(dict(good, **dict([field[case]]))).encode()
        r = post(bank, body, key=key, ts=ts, secret=secret, sig=sig)
        assert (r.status_code, r.json()) == (status, {"error": reason})
        assert balances(bank) == {"notifications": 0, "balances": {}} and bank.refused == [reason]
        r = post(bank, json.dumps(good).encode())  # the good event after it still applies
        assert r.json() == {"applied": True} and balances(bank)["balances"] == {"offline:" + "00" * 8: 500,
                                                                                 "funding": -500}


def test_the_cli_needs_its_secret(monkeypatch, capsys):
    monkeypatch.delenv("PAYTOKEN_BANK_SECRET", raising=False)
    assert main(["--port", "0"]) == 2
    assert "PAYTOKEN_BANK_SECRET" in capsys.readouterr().err
