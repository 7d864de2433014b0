"""The sealed sync end to end: the firmware's sync client (paytoken.sync_client on the MicroPython unix port) and the
backend's POST /v1/sync (Noise NK, noiseprotocol on the host), joined by a relay in pytest (tests/sync_rig.py).

Both of the seed's orders reach "settled" in both devices' own ledgers; both devices at once and the same messages
relayed twice settle once; a sent-unconfirmed payment settles when the payee syncs, or is refunded after the expiry;
a hostile relay changes nothing."""

from __future__ import annotations

import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from sqlalchemy import func, insert, select

from paytoken import reasons, syncwire, wire
from paytoken_host.backend import db
from paytoken_host.backend.settle import DAY
from tests.backend_rig import (
    Clock,
    database_params,
    free_port,
    make_database,
    start_server,
    stop_server,
)
from tests.harness.mp import MicroPython, MicroPythonError
from tests.protocol_rig import NOW, Rig, World
from tests.sync_rig import SyncRig, device_dir, http_client, make_backend, run_side, served, unconfirmed_payment

# The sync client's heap on the unix port (64-bit), eight payments to upload four records a message, with the code
# loaded from .mpy files / run in place from the ROMFS image (what a device does): measured payee 145-150 KB /
# 102-107 KB, payer 131-134 KB / 86-88 KB (make bench prints the smallest sizes). The P-256 signatures, the wallet's
# replay and the message sealed in RAM (about four copies of it) are most of it.
HEAP_SYNC = {False: "168K", True: "120K"}


@pytest.fixture(scope="module")
def proc():
    with MicroPython(heapsize="2M") as mp:
        yield mp


@pytest.fixture(params=["sqlite"])
def database(request, tmp_path):
    d = make_database(request.param, tmp_path)
    yield d
    if d.cleanup:
        d.cleanup()


@pytest.fixture
def world_rig(proc, database):
    """(world, clock, backend, rig, sync rig): a registered payer with 100,000 loaded and a payee."""
    world = World()
    payer, payee = world.device(wire.ROLE_PAYER), world.device(wire.ROLE_PAYEE)
    clock = Clock(NOW)
    backend = make_backend(database, world, clock)
    backend.register(payer.cert)
    backend.register(payee.cert)
    rig = Rig(proc, world, payer, payee, balance=0)
    voucher = bytes.fromhex(backend.issue_voucher(payer.device_id, 100_000)["voucher"])
    assert rig.call(f"pw.apply_update({voucher!r})") is True
    with http_client(backend) as http:
        yield world, clock, backend, rig, SyncRig(rig, backend, http)
    backend.engine.dispose()


def settlements(backend) -> list[dict]:
    with db.read_tx(backend.engine) as conn:
        rows = conn.execute(select(db.outbox.c.body).where(db.outbox.c.kind == "settlement")).scalars().all()
    return [p for body in rows for p in json.loads(body)["payments"]]


def merchant(backend, rig: Rig) -> int:
    return backend.balances()["accounts"].get("merchant:" + rig.payee.device_id.hex(), 0)


@pytest.mark.parametrize("database", database_params(), indirect=True)
@pytest.mark.parametrize("first", ["payer", "payee"])
def test_either_order_settles_on_both_devices(world_rig, first):
    _, _, backend, rig, s = world_rig
    rig.pay(1_000)
    rig.pay(2_500)
    second = "payee" if first == "payer" else "payer"
    assert s.statuses(first) == s.statuses(second) == ["pending", "pending"]

    s.sync(first)
    assert s.statuses(first) == ["settled", "settled"]  # the first device's upload alone settles them
    assert s.statuses(second) == ["pending", "pending"]  # the other one has not synced yet
    assert sorted(p["amount"] for p in settlements(backend)) == [1_000, 2_500]  # the bank is told, once each

    s.sync(second)
    assert s.statuses(second) == ["settled", "settled"]
    assert sorted(p["amount"] for p in settlements(backend)) == [1_000, 2_500]
    assert merchant(backend, rig) == 3_500 and backend.balances()["balanced"]
    # Both ledgers hold the backend's acknowledgement of everything they uploaded (the payer's voucher, two payments
    # and receipts; the payee's two credits) and compacted behind it, all but the payments the screen shows.
    assert rig.call("[pw.acked_seq, pw.ledger.base_seq, ew.acked_seq, ew.ledger.base_seq]") == [5, 1, 2, 0]
    assert rig.call("[pw.balance, pw.offline_spent]") == [96_500, 0]


def test_both_at_once_through_two_relays_settles_once(world_rig):
    _, _, backend, rig, s = world_rig
    rig.pay(4_000)
    # Both devices online at once: each one's message 1 is carried by two bridges to the backend; each device takes
    # the answer of the bridge that came back first, the other answer finds no request waiting.
    m_payer, m_payee = s.request("payer"), s.request("payee")
    answers = [s.post(m) for m in (m_payee, m_payer, m_payer, m_payee)]
    assert s.answer("payee", answers[0]) >= 1
    assert s.answer("payer", answers[1]) >= 1
    with pytest.raises(MicroPythonError, match="no request is waiting"):
        s.answer("payer", answers[2])
    s.sync("payer")
    s.sync("payee")
    assert s.statuses("payer") == s.statuses("payee") == ["settled"]
    assert [p["amount"] for p in settlements(backend)] == [4_000]
    assert merchant(backend, rig) == 4_000 and backend.balances()["balanced"]


def test_sent_unconfirmed_settles_when_the_payee_syncs(world_rig):
    _, _, backend, rig, s = world_rig
    unconfirmed_payment(rig, 3_000)
    assert s.statuses("payer") == ["unconfirmed"]
    s.sync("payer")
    assert s.statuses("payer") == ["unconfirmed"]  # the backend waits for the payee
    assert rig.call("pw.balance") == 97_000  # reserved, not spendable, not lost
    s.sync("payee")
    s.restart("payer")  # its next sync
    s.sync("payer")
    assert s.statuses("payer") == s.statuses("payee") == ["settled"]
    assert merchant(backend, rig) == 3_000 and rig.call("pw.balance") == 97_000


def test_sent_unconfirmed_is_refunded_after_the_expiry(world_rig):
    _, clock, backend, rig, s = world_rig
    unconfirmed_payment(rig, 3_000)
    s.sync("payer")
    clock.t = NOW + 31 * DAY
    assert backend.settlement.expire() == 1
    s.restart("payer")
    s.sync("payer")
    assert s.statuses("payer") == ["refunded"]
    assert rig.call("pw.balance") == 100_000  # the money came back, once
    s.restart("payer")
    s.sync("payer")
    assert rig.call("pw.balance") == 100_000 and s.statuses("payer") == ["refunded"]
    # The payee that never synced in time: its credit is rejected, never settled.
    s.sync("payee")
    assert s.statuses("payee") == ["rejected"] and merchant(backend, rig) == 0


def test_small_batches_take_several_exchanges(world_rig):
    _, _, backend, rig, s = world_rig
    for amount in (100, 200, 300, 400, 500):
        rig.pay(amount)
    s.restart("payer", batch=2)
    out = s.sync("payer")
    assert out.rounds >= 5 and out.refused == []  # 11 records, two a message
    assert s.statuses("payer") == ["settled"] * 5
    s.restart("payee", batch=3)
    s.sync("payee")
    assert s.statuses("payee") == ["settled"] * 5
    assert merchant(backend, rig) == 1_500


def flip(data: bytes, i: int) -> bytes:
    return data[:i] + bytes((data[i] ^ 1,)) + data[i + 1:]


def test_a_hostile_relay_changes_nothing(world_rig):
    _, _, backend, rig, s = world_rig
    rig.pay(1_000)
    unconfirmed_payment(rig, 2_000)
    before = rig.call("[pw.balance, pw.ledger.seq, pw.acked_seq]")

    # Altered, truncated or empty message 1: the backend cannot open it and answers nothing sealed.
    m1 = s.request("payer")
    for bad in (flip(m1, 40), flip(m1, len(m1) - 1), m1[:-1], m1[:31], b""):
        r = s.http.post("/v1/sync", content=bad)
        assert r.status_code == 400 and "not a Noise NK handshake" in r.json()["error"]
    assert settlements(backend) == []  # nothing was uploaded

    # Altered, truncated, extended or another device's message 2: the device refuses it, applies nothing.
    m2 = s.post(m1)
    for bad in (flip(m2, 0), flip(m2, 40), flip(m2, len(m2) - 1), m2[:-1], m2 + b"\0"):
        s.restart("payer")
        s.request("payer")
        with pytest.raises(MicroPythonError, match="answer refused"):
            s.answer("payer", bad)
    assert rig.call("[pw.balance, pw.ledger.seq, pw.acked_seq]") == before

    # Replays: message 2 of an earlier exchange does not open in a later one (a new ephemeral key each time);
    # a replayed message 1 gets a fresh answer that only the device's old ephemeral key could read.
    s.restart("payer")
    s.request("payer")
    with pytest.raises(MicroPythonError, match="answer refused"):
        s.answer("payer", m2)
    assert s.post(m1) != m2
    # Reordered: the payee's answer handed to the payer.
    s.restart("payer")
    s.request("payer")
    m_payee = s.request("payee")
    with pytest.raises(MicroPythonError, match="answer refused"):
        s.answer("payer", s.post(m_payee))
    assert rig.call("[pw.balance, pw.ledger.seq, pw.acked_seq]") == before
    # The uploads did reach the backend (the payer's through the replays, the payee's, which completes the second
    # payment, with the reordering): each payment settled once, uploads are idempotent.
    assert sorted(p["amount"] for p in settlements(backend)) == [1_000, 2_000]

    # A relay that drops every answer cannot make the device forget its sent-unconfirmed payment.
    s.restart("payer")
    with pytest.raises(AssertionError, match="still had something to say"):
        s.sync("payer", tamper=lambda _m1, _m2: None, rounds=3)
    assert s.statuses("payer") == ["pending", "unconfirmed"]

    # An honest relay then: everything settles once, the balance moves once.
    s.restart("payer")
    s.sync("payer")
    s.sync("payee")
    s.restart("payer")
    s.sync("payer")
    assert s.statuses("payer") == s.statuses("payee") == ["settled", "settled"]
    assert rig.call("pw.balance") == 97_000 and merchant(backend, rig) == 3_000
    assert sorted(p["amount"] for p in settlements(backend)) == [1_000, 2_000]
    assert backend.balances()["balanced"]


def test_refusals_are_clear(world_rig, proc):
    world, _, backend, rig, s = world_rig
    # A device without the backend's sync key cannot start.
    with pytest.raises(MicroPythonError, match="no backend sync key"):
        proc.eval("sync_client.SyncClient(pw, None)")
    # A device the backend does not know: the sealed answer says so, and the client stops.
    stranger = world.device(wire.ROLE_PAYER)
    other = Rig(proc, world, stranger, rig.payee, balance=0)
    other_sync = SyncRig(other, backend, s.http)
    out = other_sync.sync("payer")
    assert out.refused == ["backend refused (401): device request: unknown device"]
    assert other.call("[sp.finished, sp.error]") == [True, out.refused[0]] and other.call("sp.request()") is None
    # A malformed request inside a genuine handshake: answered, sealed, with the reason.
    from noise.connection import Keypair, NoiseConnection

    from paytoken_host.backend.keys import noise_static

    n = NoiseConnection.from_name(b"Noise_NK_25519_AESGCM_SHA256")
    n.set_as_initiator()
    n.set_prologue(syncwire.PROLOGUE)
    n.set_keypair_from_public_bytes(Keypair.REMOTE_STATIC, noise_static(world.backend)[1])
    n.start_handshake()
    m2 = s.post(bytes(n.write_message(bytes((syncwire.T_REQUEST, 1, 7)) + os.urandom(20))))
    up, _, ust, _, _, error, updates, _ = syncwire.decode_answer(bytes(n.read_message(m2)))
    assert (up, ust, updates) == (400, 400, []) and error == "malformed request: sync request: bad flags"


def test_a_device_whose_acknowledgement_was_lost_catches_up(world_rig):
    _, _, backend, rig, s = world_rig
    for amount in (100, 200, 300):
        rig.pay(amount)
    # The backend stores the payer's records, the relay loses the answer.
    s.restart("payer", batch=8)
    with pytest.raises(AssertionError, match="still had something to say"):
        s.sync("payer", tamper=lambda _m1, _m2: None, rounds=1)
    synced = {d["device_id"]: d["synced_seq"] for d in backend.devices()}
    assert synced[rig.payer.device_id.hex()] == 7 and rig.call("pw.acked_seq") == 0
    # The next sync starts with a smaller batch, inside what the backend holds: the upload is refused as stale, but
    # the answer's acknowledgement moves the device on, and nothing is refused for good.
    s.restart("payer", batch=2)
    out = s.sync("payer")
    assert out.refused == [] and rig.call("[sp.finished, sp.error, pw.acked_seq]") == [True, None, 7]
    assert s.statuses("payer") == ["settled"] * 3 and [p["amount"] for p in settlements(backend)] == [100, 200, 300]


@pytest.mark.parametrize("database", database_params(), indirect=True)
def test_hundreds_of_revocations_reach_a_device_in_deltas_that_fit_message_2(world_rig):
    _, _, backend, rig, s = world_rig
    for amount in (100, 200, 300):
        rig.pay(amount)
    # 299 revoked devices the backend knows only by their rows (as settle.revoke_device writes them), then the payer
    with db.write_tx(backend.engine) as conn:
        conn.execute(insert(db.revocations), [{"device_id": os.urandom(8), "revoked_at": NOW, "reason": "lost"}
                                              for _ in range(299)])
    backend.revoke(rig.payer.device_id, "reported stolen")
    with db.read_tx(backend.engine) as conn:
        version = conn.execute(select(func.max(db.revocations.c.id))).scalar()
    sizes = []

    def measured(_msg1: bytes, msg2: bytes) -> bytes:
        sizes.append(len(msg2))
        return msg2

    # The rig's wallets share one Trust, whose list is the payee's file (the wallet made last).
    out = s.sync("payee", measured)
    assert out.refused == [] and out.rounds >= 2 and max(sizes) < 4096  # more than one delta fits
    assert rig.call("[T.revocation_version, T.revoked.count]") == [version, 300]
    assert s.statuses("payee") == ["rejected"] * 3  # and the rest of the updates came too
    s.restart("payee")
    assert s.sync("payee").rounds == 1  # nothing new: an answer without a delta
    assert rig.call("T.revocation_version") == version
    # offline, the payee now refuses the revoked payer
    rig.open(rig.qr())
    m2 = rig.call("es.read_hello(ps.start())")
    assert rig.call("es.reason") == reasons.REVOKED
    with pytest.raises(MicroPythonError):
        rig.call(f"ps.read_hello({m2!r})")
    assert merchant(backend, rig) == 0


def test_the_sync_client_fits_its_heap_budget(world_rig, tmp_path):
    _, _, backend, rig, _ = world_rig
    for amount in range(100, 900, 100):
        rig.pay(amount)
    for who in ("payee", "payer"):  # the payee's records are the larger: it carries payments and receipts
        d = device_dir(rig, who, tmp_path / who)
        for romfs, heap in HEAP_SYNC.items():
            done = run_side(backend, d, heap, romfs=romfs)
            assert done is not None, f"{who} did not sync in {heap} (romfs={romfs})"
            assert done["applied"] >= 9  # an acknowledgement and the eight statuses at least


def test_a_waiting_relay_is_woken_when_the_other_device_settles_its_payment(world_rig):
    _, _, backend, rig, s = world_rig
    unconfirmed_payment(rig, 2_500)
    s.sync("payer")
    assert s.statuses("payer") == ["unconfirmed"]
    hint = s.wake_hint("payer")
    assert s.wake(hint, wait=0) == {"wake": False, "cursor": rig.call("sp.cursor")}  # nothing new yet
    # The payer's relay stays and waits; the payee comes online and uploads the payment with its receipt.
    with ThreadPoolExecutor(1) as pool:
        woken = pool.submit(s.wake, hint, 30)
        s.sync("payee")
        assert woken.result(timeout=60)["wake"] is True
    s.restart("payer")  # the woken relay runs a sealed exchange at once
    s.sync("payer")
    assert s.statuses("payer") == s.statuses("payee") == ["settled"]
    assert s.wake(s.wake_hint("payer"), wait=0)["wake"] is False
    # Only the backend makes tokens: another string, or a token with a changed bit, names no device.
    token, _ = rig.call("sp.wake_hint()")
    for bad in (os.urandom(16), flip(token, 3)):
        r = s.http.get(f"/v1/wake/{bad.hex()}")
        assert r.status_code == 404 and r.json() == {"error": "not a wake token of this backend"}
    assert token != rig.call("se.wake_hint()")[0]  # one token per device


def test_wifi_the_device_posts_its_exchanges_itself(proc, tmp_path, monkeypatch):
    # The simulator's online switch gives the device the backend's URL; its own HTTP POSTs over the unix port's
    # loopback network reach a real `paytoken-backend serve`, and sync_over runs every exchange.
    with pytest.raises(MicroPythonError, match="offline"):
        proc.eval("__import__('board').network()")
    sv = served(tmp_path, 50_000)
    world, payer, payee, backend, voucher = sv.world, sv.payer, sv.payee, sv.backend, sv.voucher
    port = free_port()
    server = start_server(sv.url, sv.key, port, workers=1)
    try:
        monkeypatch.setenv("PAYTOKEN_SIM_ONLINE", f"http://127.0.0.1:{port}")
        with MicroPython(heapsize="2M") as mp:
            rig = Rig(mp, world, payer, payee, balance=0)
            assert rig.call(f"pw.apply_update({voucher!r})") is True
            rig.pay(1_200)
            rig.pay(800)
            kx = backend.noise_pub
            mp.exec("import board\nfrom paytoken import sync_client, sync_http\n"
                    "post = sync_http.poster(board.network())\n")
            for w in ("ew", "pw"):  # the payee first: it settles both, the payer then learns it
                assert mp.eval(f"sync_client.SyncClient({w}, {kx!r}).sync_over(post)") is True
                assert [st[3] for st in mp.eval(f"sync_client.statuses({w})")] == ["settled", "settled"]
            # A device holding another backend's sync key: its message 1 opens nowhere, and it is told so.
            with pytest.raises(MicroPythonError, match="backend refused message 1 \\(400\\)"):
                mp.eval(f"sync_client.SyncClient(pw, {os.urandom(32)!r}).sync_over(post)")
    finally:
        stop_server(server)
    assert backend.balances()["accounts"]["merchant:" + payee.device_id.hex()] == 2_000


def test_the_sealed_plaintexts_decode_strictly():
    # Both plaintexts, on CPython (the same module the device runs): every byte counts, nothing half-parsed.
    ureq = bytes((syncwire.T_UPDATES_REQUEST, 2)) + os.urandom(syncwire.UPDATES_REQUEST_LEN - 2)
    head = syncwire.sync_head_body(os.urandom(8), 3, os.urandom(32), 5, os.urandom(32)) + os.urandom(64)
    records = [(b"\x01" + os.urandom(88), os.urandom(188), None), (b"\x02" + os.urandom(73), None, os.urandom(107))]
    request = b"".join(syncwire.request_parts(ureq, head, records))
    updates, wake = [os.urandom(94), os.urandom(112)], os.urandom(16)
    answer = syncwire.answer(200, 5, 200, 9, True, "fine", updates, wake)
    assert syncwire.decode_request(request) == (ureq, head, records)
    assert syncwire.decode_answer(answer) == (200, 5, 200, 9, True, "fine", updates, wake)
    for raw, decode in ((request, syncwire.decode_request), (answer, syncwire.decode_answer)):
        for cut in range(len(raw)):
            with pytest.raises(wire.WireError):
                decode(raw[:cut])
        with pytest.raises(wire.WireError, match="trailing bytes"):
            decode(raw + b"\0")


def test_status_summary_is_one_format_for_usb_and_ble(mp):
    # paytoken.syncwire's status summary: the firmware (MicroPython) builds the bytes the host builds; the USB relay
    # (sync_bridge_core.parse_summary) and the BLE relay (syncgatt.decode_status) read the same body back; the
    # newest 8 rows go; anything malformed is each relay's clear error, never a wrong value.
    from paytoken.ble import syncgatt
    from paytoken_host.sync_bridge_core import DeviceError, Payment, Summary, parse_summary

    rows = [(1 + i % 2, bytes([i]) * 16, 100 * i, ("settled", "pending", "unconfirmed")[i % 3]) for i in range(9)]
    hint = (bytes(range(16)), 70_000)
    for h in (hint, None):
        body = syncwire.status_summary(h, rows)
        assert mp.call("paytoken.syncwire.status_summary", h, rows) == body
        assert syncwire.decode_status_summary(body) == (h, rows[-8:])
        assert parse_summary(body) == Summary(h, [Payment(*r) for r in rows[-8:]])
        assert syncgatt.decode_status(syncgatt.status(syncwire.status_summary(h, rows))[1:]) == (h, rows[-8:])
    body = syncwire.status_summary(hint, rows[:1])
    damaged = body.replace(b"settled", b"settl\xffd")
    for bad in (b"", b"\x00", b"\x02\x00", body[:-1], body + b"\x00", body[:21], damaged):
        with pytest.raises(syncwire.WireError):
            syncwire.decode_status_summary(bad)
        with pytest.raises(DeviceError, match="malformed status summary"):
            parse_summary(bad)
        with pytest.raises(syncgatt.SyncGattError):
            syncgatt.decode_status(bad)
