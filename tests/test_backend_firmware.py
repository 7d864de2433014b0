"""The backend against the real firmware: payments made by the wallets on MicroPython, their ledger files turned
into upload batches (formats.build_batch, recomputing the payer's deterministic signatures), settled, and the
backend's signed updates applied by the wallets: the acknowledgement matches their chain, statuses resolve their
payments, the ledger compacts, and the next upload continues from the checkpoint."""

from __future__ import annotations

import os

import pytest

from paytoken import wire
from paytoken_host import protocol
from paytoken_host.backend import db, migrate
from paytoken_host.backend import formats as F
from paytoken_host.backend.service import ISSUER_SETTING, Backend
from tests.backend_rig import Clock
from tests.harness.mp import MicroPython
from tests.protocol_rig import NOW, Rig, World


@pytest.fixture(scope="module")
def proc():
    with MicroPython(heapsize="2M") as mp:
        yield mp


def fetch(backend: Backend, dev, since: int = 0) -> dict:
    body = F.updates_request_body(dev.device_id, since, 0, backend.now(), os.urandom(16))
    return backend.updates("PaytokenDevice " + protocol.sign(dev.identity, body).hex(), dev.device_id, since)


def apply_all(rig: Rig, who: str, updates: list[str]) -> list:
    return [rig.call(f"{who}.apply_update({bytes.fromhex(u)!r})") for u in updates]


def test_real_wallets_sync_settle_and_compact(proc, tmp_path):
    world = World()
    payer, payee = world.device(wire.ROLE_PAYER), world.device(wire.ROLE_PAYEE)
    engine = db.make_engine(f"sqlite:///{tmp_path}/b.db")
    migrate.upgrade(engine)
    with db.write_tx(engine) as conn:
        db.set_setting(conn, ISSUER_SETTING, world.issuer.public.hex())
    backend = Backend(engine, world.backend, clock=Clock(NOW))
    backend.register(payer.cert)
    backend.register(payee.cert)
    rig = Rig(proc, world, payer, payee, balance=0)
    voucher = bytes.fromhex(backend.issue_voucher(payer.device_id, 100_000)["voucher"])
    assert rig.call(f"pw.apply_update({voucher!r})") is True

    rig.pay(1_000)
    rig.pay(2_500)
    rig.open(rig.qr())  # a third payment whose receipt never reaches the payer
    rig.call("ps.read_hello(es.read_hello(ps.start())) and None")
    m3 = rig.call("ps.confirm(4_000)")
    rig.call(f"es.read_payment({m3!r}) and None")
    assert rig.state()["payer"][3] == ["done", "done", "sent"]

    def batch(dev, who):
        path = rig.call(f"{who}.ledger.path")
        return F.build_batch(path, dev.cert, lambda body: protocol.sign(dev.identity, body))

    status, res = backend.upload(batch(payer, "pw").encode())
    assert status == 200 and [p["state"] for p in res["payments"]] == ["settled", "settled", "pending"]
    status, res = backend.upload(batch(payee, "ew").encode())
    assert status == 200 and res["settled"] == 1  # the third, completed by the payee's receipt
    assert backend.balances()["balanced"]
    assert backend.balances()["accounts"]["merchant:" + payee.device_id.hex()] == 7_500

    # The wallets take the backend's updates: the acknowledgements match their chains, statuses resolve.
    up = fetch(backend, payer)
    applied = apply_all(rig, "pw", up["updates"])
    assert applied == [True] * len(applied) and len(applied) == 4  # ack + three settled statuses
    assert rig.call("[r[3] for r in pw.history()]") == ["settled"] * 3
    up_e = fetch(backend, payee)
    assert apply_all(rig, "ew", up_e["updates"]) == [True] * 4
    assert rig.call("[pw.offline_spent, pw.balance]") == [0, 92_500]
    assert apply_all(rig, "pw", fetch(backend, payer, up["cursor"])["updates"]) == [False]  # only the ack again

    # Compaction behind the acknowledgement, then the next upload continues from the checkpoint.
    assert rig.call("pw.compact()") is True
    assert rig.call("ew.compact()") is True
    rig.pay(500)
    status, res = backend.upload(batch(payer, "pw").encode())
    assert status == 200 and [p["state"] for p in res["payments"]] == ["settled"]
    status, res = backend.upload(batch(payee, "ew").encode())
    assert status == 200 and res["new_records"] == 5  # the statuses it applied, then the new payment
    for dev, who, cursor in ((payer, "pw", up["cursor"]), (payee, "ew", up_e["cursor"])):
        kinds = [bytes.fromhex(u)[0] for u in fetch(backend, dev, cursor)["updates"]]
        assert kinds == [wire.T_ACK, wire.T_STATUS]  # the new acknowledgement, the fourth payment settled
        assert apply_all(rig, who, fetch(backend, dev, cursor)["updates"]) == [True, True]
        assert rig.call(f"[r[3] for r in {who}.history()][-1]") == "settled"
        assert rig.call(f"{who}.compact()") is True
    assert backend.balances()["accounts"]["offline:" + payer.device_id.hex()] == 92_000
    assert backend.balances()["problems"] == []
