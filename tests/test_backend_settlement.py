"""Settlement rules on real databases (SQLite always, PostgreSQL when reachable): exactly once from either side,
sent-unconfirmed payments, expiry and refunds, refusals, gaps, forks, limits, tampering and replays. After every
scenario the journal must balance."""

from __future__ import annotations

import json
import os
import struct

import pytest
from sqlalchemy import func, select

from paytoken import reasons, revocation, wire
from paytoken_host import protocol
from paytoken_host.backend import db
from paytoken_host.backend import formats as F
from paytoken_host.backend.verify import Reject
from tests.backend_rig import (
    DAY,
    NOW,
    Clock,
    World,
    database_params,
    make_database,
    make_payment,
    new_backend,
    pay,
    record_rcvd,
    record_result,
    record_sent,
    updates_auth,
)


@pytest.fixture(params=database_params())
def env(request, tmp_path):
    database = make_database(request.param, tmp_path)
    world = World(tmp_path)
    clock = Clock()
    backend = new_backend(database, world, clock)
    yield world, backend, clock
    problems = backend.balances()["problems"]
    backend.engine.dispose()
    if database.cleanup:
        database.cleanup()
    assert problems == [], problems  # the journal balances after every scenario


def setup(world, backend, balance=100_000, payer_limits=None):
    payer = world.device(wire.ROLE_PAYER, payer_limits)
    payee = world.device(wire.ROLE_PAYEE)
    backend.register(payer.cert)
    backend.register(payee.cert)
    if balance:
        payer.apply(bytes.fromhex(backend.issue_voucher(payer.device_id, balance)["voucher"]))
    return payer, payee


def state(backend, txid: bytes) -> str:
    return backend.payment(txid)["state"]


def count(backend, table) -> int:
    with db.read_tx(backend.engine) as conn:
        return conn.execute(select(func.count()).select_from(table)).scalar()


def statuses(backend, dev) -> dict[bytes, int]:
    out = {}
    for raw in backend.updates(updates_auth(dev, t=backend.now()), dev.device_id, 0)["updates"]:
        raw = bytes.fromhex(raw)
        if raw[0] == wire.T_STATUS:
            st = wire.decode_status(raw)
            assert protocol.signed_by(backend.backend_pub, raw) and st.device_id == dev.device_id
            out[st.txid] = st.status
    return out


def balances(backend) -> dict[str, int]:
    return backend.balances()["accounts"]


def test_payment_settles_once_whoever_uploads_first(env):
    world, backend, _ = env
    payer, payee = setup(world, backend)
    t1 = pay(payer, payee, 1_000)
    t2 = pay(payer, payee, 2_500)
    status, res = backend.upload(payer.batch().encode())
    assert status == 200 and res["settled"] == 2 and {p["state"] for p in res["payments"]} == {"settled"}
    status, res = backend.upload(payee.batch().encode())
    assert status == 200 and res["settled"] == 0 and res["new_records"] == 2
    acc = balances(backend)
    assert acc["merchant:" + payee.device_id.hex()] == 3_500
    assert acc["offline:" + payer.device_id.hex()] == 96_500
    assert statuses(backend, payer) == {t1: wire.ST_SETTLED, t2: wire.ST_SETTLED}
    assert statuses(backend, payee) == {t1: wire.ST_SETTLED, t2: wire.ST_SETTLED}
    # the acknowledgement names the device's own chain hash at its head
    ack = wire.decode_ack(bytes.fromhex(res["ack"]))
    assert (ack.upto_seq, ack.chain_hash) == payee.head()


def test_sent_unconfirmed_settles_when_the_payee_uploads(env):
    world, backend, _ = env
    payer, payee = setup(world, backend)
    txid = pay(payer, payee, 4_000, receipt_to_payer=False)
    status, res = backend.upload(payer.batch().encode())
    assert status == 200 and res["payments"][0]["state"] == "pending"
    assert statuses(backend, payer) == {}
    status, res = backend.upload(payee.batch().encode())
    assert res["settled"] == 1 and state(backend, txid) == "settled"
    assert statuses(backend, payer) == {txid: wire.ST_SETTLED}


def test_expiry_holds_even_before_the_sweep_runs(env):
    world, backend, clock = env
    payer, payee = setup(world, backend)
    txid = pay(payer, payee, 4_000, receipt_to_payer=False)
    backend.upload(payer.batch().encode())
    clock.t += 31 * DAY  # expired; no sweep yet
    status, res = backend.upload(payee.batch().encode())
    assert res["settled"] == 0 and state(backend, txid) == "refunded"
    assert statuses(backend, payer) == {txid: wire.ST_REFUNDED}
    assert statuses(backend, payee) == {txid: wire.ST_REJECTED}


def test_sent_unconfirmed_is_refunded_after_the_expiry_and_a_late_credit_rejected(env):
    world, backend, clock = env
    payer, payee = setup(world, backend)
    txid = pay(payer, payee, 4_000, receipt_to_payer=False)
    backend.upload(payer.batch().encode())
    clock.t += 29 * DAY
    assert backend.settlement.expire() == 0
    clock.t += 2 * DAY
    assert backend.settlement.expire() == 1
    assert backend.settlement.expire() == 0
    assert state(backend, txid) == "refunded"
    assert statuses(backend, payer) == {txid: wire.ST_REFUNDED}
    # the payee turns up after the expiry: its credit is rejected, no money moves
    status, res = backend.upload(payee.batch().encode())
    assert status == 200 and res["settled"] == 0
    assert statuses(backend, payee) == {txid: wire.ST_REJECTED}
    assert balances(backend)["merchant:" + payee.device_id.hex()] == 0
    assert balances(backend)["offline:" + payer.device_id.hex()] == 100_000


def test_refusal_voids_and_refunds_the_payer(env):
    world, backend, _ = env
    payer, payee = setup(world, backend)
    payment = make_payment(payer, payee, 1_000)
    record_sent(payer, payment)
    record_rcvd(payee, payment, status=reasons.LIMIT_HOLDING)  # the payer never got the refusal
    txid = wire.decode_payment(payment).txid
    backend.upload(payer.batch().encode())
    backend.upload(payee.batch().encode())
    p = backend.payment(txid)
    assert p["state"] == "voided" and "over holding limit" in p["reason"]
    assert statuses(backend, payer) == {txid: wire.ST_REFUNDED}
    assert balances(backend)["merchant:" + payee.device_id.hex()] == 0


def test_gap_waits_for_the_payers_earlier_payment(env):
    world, backend, _ = env
    payer, payee = setup(world, backend)
    other = world.device(wire.ROLE_PAYEE)
    backend.register(other.cert)
    t1 = pay(payer, other, 1_000)  # counter 1 went to a payee that has not synced
    t2 = pay(payer, payee, 2_000)
    status, res = backend.upload(payee.batch().encode())
    assert status == 200 and res["payments"] == [{"txid": t2.hex(), "state": "held", "reason": None}]
    assert statuses(backend, payee) == {}
    backend.upload(payer.batch().encode())  # fills the gap: both settle
    assert state(backend, t1) == "settled" and state(backend, t2) == "settled"
    assert statuses(backend, payee) == {t2: wire.ST_SETTLED}


def test_fork_two_payments_with_one_counter_revokes_and_never_settles_twice(env):
    world, backend, _ = env
    payer, payee = setup(world, backend)
    payee2 = world.device(wire.ROLE_PAYEE)
    backend.register(payee2.cert)
    # A clone: the same card state pays two payees who never meet, with counter 1 each time.
    clone_state = (payer.counter, payer.prev_hash, payer.offline_spent)
    p1 = make_payment(payer, payee, 30_000)
    p2 = make_payment(payer, payee2, 30_000, counter=clone_state[0] + 1, prev_hash=clone_state[1])
    assert wire.decode_payment(p1).txid == wire.decode_payment(p2).txid
    record_rcvd(payee, p1)
    record_rcvd(payee2, p2)
    txid = wire.decode_payment(p1).txid
    assert backend.upload(payee.batch().encode())[0] == 200
    status, res = backend.upload(payee2.batch().encode())
    assert status == 409 and "fork" in res["forks"][0] and res["new_records"] == 1  # the payee's records kept
    assert state(backend, txid) == "settled"  # the first one stands, the value moved once
    assert balances(backend)["merchant:" + payee.device_id.hex()] == 30_000
    assert balances(backend)["merchant:" + payee2.device_id.hex()] == 0
    assert statuses(backend, payee2) == {txid: wire.ST_REJECTED}
    kinds = {a["kind"] for a in backend.alerts()}
    assert "fork" in kinds
    assert count(backend, db.conflicts) == 1
    # revoked: on the signed revocation list, and the device's own uploads are refused
    rl = [bytes.fromhex(u) for u in backend.updates(updates_auth(payee), payee.device_id, 0)["updates"]
          if u.startswith("52")]
    assert revocation.decode_delta(rl[0]).ids == payer.device_id
    with pytest.raises(Reject) as e:
        backend.upload(payer.batch().encode())
    assert e.value.status == 403 and "revoked" in e.value.reason
    # later payments from the revoked card are rejected, not settled
    pay(payer, payee, 1_000)
    backend.upload(payee.batch().encode())
    assert balances(backend)["merchant:" + payee.device_id.hex()] == 30_000


def test_broken_payer_chain_is_a_fork(env):
    world, backend, _ = env
    payer, payee = setup(world, backend)
    p1 = make_payment(payer, payee, 1_000)
    record_sent(payer, p1)
    bad = make_payment(payer, payee, 1_000, counter=2, prev_hash=bytes(32))  # does not continue payment 1
    record_rcvd(payee, p1)
    record_rcvd(payee, bad)
    status, res = backend.upload(payee.batch().encode())
    assert status == 409 and "does not chain" in res["forks"][0]
    assert backend.payment(wire.decode_payment(p1).txid)["state"] in ("settled", "rejected")
    assert backend.payment(wire.decode_payment(bad).txid)["state"] == "rejected"


def test_limits_currency_and_overspending_are_rejected(env):
    world, backend, _ = env
    payer, payee = setup(world, backend, balance=5_000, payer_limits=protocol.Limits(per_payment=3_000))
    t_big = pay(payer, payee, 3_001)  # a modified payer ignoring its own per-payment limit
    t_ok = pay(payer, payee, 2_000)
    pay(payer, payee, 2_000)
    t_over = pay(payer, payee, 2_000)  # more than the backend ever gave it
    backend.upload(payee.batch().encode())
    assert "per-payment limit" in backend.payment(t_big)["reason"]
    assert state(backend, t_ok) == "settled"
    assert "does not cover" in backend.payment(t_over)["reason"]
    assert {"rejected", "overspend"} <= {a["kind"] for a in backend.alerts()}
    assert balances(backend)["offline:" + payer.device_id.hex()] == 1_000


def test_ack_resets_offline_spending_as_the_wallet_does(env):
    world, backend, _ = env
    payer, payee = setup(world, backend, payer_limits=protocol.Limits(offline=5_000))
    pay(payer, payee, 3_000)
    status, res = backend.upload(payer.batch().encode())
    payer.apply(bytes.fromhex(res["ack"]))
    assert payer.offline_spent == 0
    t = pay(payer, payee, 4_000)  # within the limit only because the ack reset the spending
    status, res = backend.upload(payer.batch().encode())
    assert status == 200 and state(backend, t) == "settled"


def test_lying_about_offline_spending_is_caught(env):
    world, backend, _ = env
    payer, payee = setup(world, backend)
    pay(payer, payee, 3_000)
    p = make_payment(payer, payee, 1_000, offline_spent=0)  # claims nothing was spent before
    record_sent(payer, p)
    with pytest.raises(Reject) as e:
        backend.upload(payer.raw_batch().encode())
    assert e.value.status == 422 and "offline spending" in e.value.reason
    assert any("offline spending" in a["detail"] for a in backend.alerts())


def tamper(batch: str, fn) -> bytes:
    doc = json.loads(batch)
    fn(doc)
    return json.dumps(doc).encode()


def flip(hexstr: str, i: int) -> str:
    raw = bytearray(bytes.fromhex(hexstr))
    raw[i] ^= 1
    return raw.hex()


@pytest.mark.parametrize("change, reason", [
    (lambda d: d["records"][1].update(payment=flip(d["records"][1]["payment"], 180)), "payment"),
    (lambda d: d["records"][2].update(receipt=flip(d["records"][2]["receipt"], 100)), "receipt"),
    (lambda d: d["records"][1].update(payload=flip(d["records"][1]["payload"], 10)), "chain hash"),
    (lambda d: d.update(head=flip(d["head"], 90)), "head"),
    (lambda d: d["records"].pop(), "head"),
    (lambda d: d["records"][1].pop("payment"), "missing"),
    (lambda d: d.update(base_seq=1), "head"),
    (lambda d: d["records"][1].update(receipt=d["records"][2]["receipt"]), "no receipt"),
    (lambda d: d["records"][0].update(payment=d["records"][1]["payment"]), "attached to a record"),
    (lambda d: d["records"].insert(0, d["records"][0]), "head"),
], ids=["payment-sig", "receipt-sig", "payload", "head-sig", "truncated", "no-payment", "base-seq",
        "receipt-on-sent", "payment-on-voucher", "duplicated-record"])
def test_tampered_batches_are_refused_and_store_nothing(env, change, reason):
    world, backend, _ = env
    payer, payee = setup(world, backend)
    pay(payer, payee, 1_000)
    before = {t: count(backend, t) for t in (db.payments, db.uploads, db.journal_lines)}
    with pytest.raises(Reject) as e:
        backend.upload(tamper(payer.batch(), change))
    assert e.value.status in (400, 422) and reason in e.value.reason, e.value.reason
    assert {t: count(backend, t) for t in before} == before
    status, res = backend.upload(payer.batch().encode())  # the genuine batch still goes through
    assert status == 200 and res["settled"] == 1


@pytest.mark.parametrize("body, reason", [
    (b"", "not JSON"), (b"{", "not JSON"), (b"\xff\xfe", "not JSON"), (b"[]", "JSON object"),
    (b'{"format": "x"}', "format"), (b'{"format": "paytoken-sync/1", "device_id": "zz"}', "not hex"),
    (b'{"format": "paytoken-sync/1", "device_id": "0011", "base_seq": 0}', "8 bytes"),
    (b'{"format": "paytoken-sync/1", "device_id": "0011223344556677", "base_seq": -1}', "base_seq"),
    (b'{"format": "paytoken-sync/1", "device_id": "0011223344556677", "base_seq": 0, "base_hash": "' + b"00" * 32
     + b'", "records": {}}', "records"),
    (b'{"format": "paytoken-sync/1", "device_id": "0011223344556677", "base_seq": 0, "base_hash": "' + b"00" * 32
     + b'", "records": [], "head": "48"}', "sync head"),
    (b'{"format": "paytoken-sync/1", "extra": 1}', "unknown fields"),
])
def test_malformed_uploads_get_a_clear_400(env, body, reason):
    _, backend, _ = env
    with pytest.raises(Reject) as e:
        backend.upload(body)
    assert e.value.status == 400 and reason in e.value.reason, e.value.reason


def test_replays_and_relabelled_batches(env):
    world, backend, _ = env
    payer, payee = setup(world, backend)
    pay(payer, payee, 1_000)
    batch = payer.batch()
    assert backend.upload(batch.encode())[1]["settled"] == 1
    for _ in range(3):
        status, res = backend.upload(batch.encode())
        assert status == 200 and res["duplicate"] is True
    # another device's id on this batch: the head is not signed by that device
    relabelled = tamper(batch, lambda d: d.update(device_id=payee.device_id.hex()))
    with pytest.raises(Reject) as e:
        backend.upload(relabelled)
    assert "head" in e.value.reason
    # an upload that skips records the backend never got waits for them
    pay(payer, payee, 1_000)
    pay(payer, payee, 1_000)
    with pytest.raises(Reject) as e:
        backend.upload(payer.batch(since=5).encode())
    assert e.value.status == 409 and "gap" in e.value.reason
    assert backend.balances()["accounts"]["merchant:" + payee.device_id.hex()] == 1_000


def test_a_device_that_signs_two_ledger_histories_is_revoked(env):
    world, backend, _ = env
    payer, payee = setup(world, backend)
    voucher = bytes.fromhex(backend.issue_voucher(payer.device_id, 1_000)["voucher"])
    payer.apply(voucher)
    pay(payer, payee, 1_000)
    backend.upload(payer.batch().encode())
    # Restored from an old backup (or cloned before): the same key presents another ledger for the same seqs.
    os.remove(payer.path)
    payer.counter, payer.prev_hash, payer.offline_spent, payer.sent_log = 0, bytes(32), 0, []
    payer.apply(world.voucher(payer, 1, 100_000))
    payer.apply(voucher)
    pay(payer, payee, 500)
    status, res = backend.upload(payer.batch().encode())
    assert status == 409 and "differs from the one it uploaded" in res["forks"][0]
    assert [d["revoked_at"] is not None for d in backend.devices() if d["device_id"] == payer.device_id.hex()] == [True]


def test_certificates_expired_foreign_or_revoked(env):
    world, backend, clock = env
    expired = world.device(wire.ROLE_PAYER, not_before=NOW - 400 * DAY, not_after=NOW - DAY)
    with pytest.raises(Reject) as e:
        backend.register(expired.cert)
    assert e.value.status == 422 and "expired" in e.value.reason
    foreign = world.device(wire.ROLE_PAYER, issuer=protocol.Issuer())
    with pytest.raises(Reject) as e:
        backend.register(foreign.cert)
    assert "another issuer" in e.value.reason
    # a payment made after the payer's certificate ran out is rejected at settlement
    payer = world.device(wire.ROLE_PAYER, not_after=NOW + 10)
    payee = world.device(wire.ROLE_PAYEE)
    backend.register(payer.cert)
    backend.register(payee.cert)
    payer.apply(bytes.fromhex(backend.issue_voucher(payer.device_id, 5_000)["voucher"]))
    p = make_payment(payer, payee, 1_000, t=NOW + 20)
    record_sent(payer, p)
    record_result(payer, record_rcvd(payee, p))
    backend.upload(payer.batch().encode())
    assert "not valid at the payment's time" in backend.payment(wire.decode_payment(p).txid)["reason"]
    # long after expiry (past the grace) the device's uploads are refused
    clock.t = NOW + 40 * DAY
    with pytest.raises(Reject) as e:
        backend.upload(payer.batch().encode())
    assert e.value.status == 403 and "expired" in e.value.reason
    # an operator revocation: the device's uploads are refused, its unsettled payments rejected
    clock.t = NOW
    backend.revoke(payee.device_id, "lost")
    with pytest.raises(Reject) as e:
        backend.upload(payee.batch().encode())
    assert e.value.status == 403
    payer2 = world.device(wire.ROLE_PAYER)
    backend.register(payer2.cert)
    payer2.apply(bytes.fromhex(backend.issue_voucher(payer2.device_id, 5_000)["voucher"]))
    other = world.device(wire.ROLE_PAYEE)
    backend.register(other.cert)
    t_open = pay(payer2, other, 700, receipt_to_payer=False, payee_keeps=False)  # sent-unconfirmed
    backend.upload(payer2.batch().encode())
    assert state(backend, t_open) == "pending"
    assert backend.revoke(payer2.device_id, "reported stolen")["changed"] is True
    assert backend.revoke(payer2.device_id, "again")["changed"] is False
    assert backend.payment(t_open)["reason"] == "payer revoked: reported stolen"
    assert statuses(backend, other) == {t_open: wire.ST_REJECTED}
    with pytest.raises(Reject) as e:
        backend.issue_voucher(payer.device_id, 2**32)
    assert e.value.status == 422


def test_unknown_counterparty_needs_its_certificate(env):
    world, backend, _ = env
    payer = world.device(wire.ROLE_PAYER)
    payee = world.device(wire.ROLE_PAYEE)
    backend.register(payee.cert)
    pay(payer, payee, 1_000)
    with pytest.raises(Reject) as e:
        backend.upload(payee.batch().encode())
    assert e.value.status == 422 and "unknown device" in e.value.reason
    # with the payer's certificate in the batch it verifies; the payer has no balance at the backend yet
    status, res = backend.upload(payee.batch(certs=(payer.cert,)).encode())
    assert status == 200 and res["payments"][0]["state"] == "rejected"


def test_status_records_in_the_ledger_are_accepted_and_vouchers_only_ours(env):
    world, backend, _ = env
    payer, payee = setup(world, backend)
    txid = pay(payer, payee, 1_000, receipt_to_payer=False)
    backend.upload(payee.batch().encode())
    for u in backend.updates(updates_auth(payer), payer.device_id, 0)["updates"]:
        payer.apply(bytes.fromhex(u))
    status, res = backend.upload(payer.batch().encode())
    assert status == 200 and state(backend, txid) == "settled"
    forged = protocol.sign(world.backend_key, wire.voucher_body(payer.device_id, 2, 5, 840, NOW))
    payer.append(bytes((F.K_VOUCHER,)) + forged)  # signed by the key, never issued by this backend
    with pytest.raises(Reject) as e:
        backend.upload(payer.batch().encode())
    assert "voucher 2 is not one this backend issued" in e.value.reason


def test_rcvd_status_offset_fits_the_layout():
    # The wallet reads a RCVD record's receipt status at wire.RCVD_STATUS: the byte before the receipt time.
    assert wire.RCVD_STATUS == struct.calcsize(F.RCVD_FMT) - 5


def test_a_receipt_in_a_later_upload_than_its_payment_settles_it(env):
    # A payer's upload may end between a payment and its receipt (the receipt record arrives in the next one);
    # that upload then carries no payment at all, and the payment before this one settled long ago.
    world, backend, clock = env
    payer, payee = setup(world, backend)
    txids = []
    for amount in (1_000, 2_000):
        p = make_payment(payer, payee, amount)
        record_sent(payer, p)
        receipt = record_rcvd(payee, p)
        assert backend.upload(payer.batch().encode())[0] == 200
        txids.append(wire.decode_payment(p).txid)
        assert state(backend, txids[-1]) == "pending"
        record_result(payer, receipt)
        assert backend.upload(payer.batch().encode())[0] == 200
        assert state(backend, txids[-1]) == "settled"
    assert backend.balances()["accounts"][f"merchant:{payee.device_id.hex()}"] == 3_000
    # the payee's own upload later finds both settled, and changes nothing
    assert backend.upload(payee.batch().encode())[0] == 200
    assert [state(backend, t) for t in txids] == ["settled", "settled"]
    assert backend.balances()["accounts"][f"merchant:{payee.device_id.hex()}"] == 3_000


def test_a_sealed_answer_fits_the_devices_largest_message(env):
    # 40 statuses for one device: a sealed answer carries what fits its byte budget (the 4 KB a USB frame or a BLE
    # sync message takes) and says there is more; the next one goes on from its cursor, nothing lost or repeated
    from paytoken_host.backend import sealed

    world, backend, clock = env
    payer, payee = setup(world, backend, balance=1_000_000)
    for _ in range(40):
        pay(payer, payee, 100)
    assert backend.upload(payee.batch().encode())[0] == 200
    seen, since, more = [], 0, True
    while more:
        with db.read_tx(backend.engine) as conn:
            updates, since, more = backend.device_updates(conn, payee.device_id, since, NOW, sealed.STATUSES,
                                                          sealed.VOUCHERS, sealed.UPDATES_BUDGET)
        statuses = [u for u in updates if u[0] == wire.T_STATUS]
        assert sum(len(u) + 2 for u in statuses) <= sealed.UPDATES_BUDGET
        seen += [wire.decode_status(u).txid for u in statuses]
    assert len(seen) == len(set(seen)) == 40


def test_rcvd_record_rebuilds_the_payment_byte_for_byte():
    """formats.rebuild_payment_rcvd slices the payment out of a RCVD record: the same bytes as packing its fields."""
    for _ in range(20):
        payer, payee, prev, nonce, hs, sig = (os.urandom(n) for n in (8, 8, 32, 8, 32, 64))
        amount, counter, spent, t = (int.from_bytes(os.urandom(4), "big") for _ in range(4))
        payload = bytes((F.K_RCVD,)) + struct.pack(F.RCVD_FMT, payer, amount, 840, counter, spent, prev, nonce, hs,
                                                     t, sig, reasons.OK, t)
        expected = wire.payment_body(wire.txid(payer, counter), payer, payee, amount, 840, counter, spent, prev,
                                     nonce, hs, t) + sig
        assert F.rebuild_payment_rcvd(payee, payload) == expected
