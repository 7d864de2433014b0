"""The wallet on its flash ledger, on MicroPython: state derived from records, backend-signed updates
applied exactly once, compaction behind acknowledgements, and a damaged ledger that locks payments."""

from __future__ import annotations

import functools
import os
import random

import pytest

from paytoken import reasons, wire
from paytoken_host import protocol
from tests.harness.mp import MicroPython, MicroPythonError
from tests.protocol_rig import NOW, Rig, World

STATE = "[w.balance, w.counter, w.prev_hash, w.offline_spent, w.seq, w.voucher_counter, w.acked_seq, w.known_time]"


@pytest.fixture(scope="module")
def proc():
    with MicroPython(heapsize="2M") as mp:
        yield mp


@pytest.fixture
def rig(proc) -> Rig:
    world = World()
    return Rig(proc, world, world.device(wire.ROLE_PAYER), world.device(wire.ROLE_PAYEE))


def reopened(rig: Rig, who: str) -> list:
    """The state a wallet has after the device restarts: replayed from its ledger alone."""
    dev = rig.payer if who == "pw" else rig.payee
    rig.mp.exec(
        f"{who}.ledger.close()\n"
        f"{who} = wallet.Wallet({who}.ledger.path, {dev.priv!r}, {dev.cert!r}, T)\n"
    )
    return rig.call(STATE.replace("w.", f"{who}."))


def refused_code(rig: Rig, expr: str) -> int:
    with pytest.raises(MicroPythonError) as exc:
        rig.call(expr)
    assert exc.value.kind == "Refused", exc.value
    return exc.value.msg


def test_state_is_the_replay_of_the_ledger(rig):
    rig.pay(1_000)
    rig.pay(2_500)
    for who in ("pw", "ew"):
        live = rig.call(STATE.replace("w.", f"{who}."))
        assert reopened(rig, who) == live
    assert rig.state() == {"payer": [96_500, 2, 3_500, ["done", "done"]], "payee": [3_500, 2, ["received"] * 2]}


def test_flash_bytes_per_payment_record(rig):
    size0 = (rig.call("pw.ledger.size()"), rig.call("ew.ledger.size()"))
    rig.pay(1_000)
    payer_bytes = rig.call("pw.ledger.size()") - size0[0]
    payee_bytes = rig.call("ew.ledger.size()") - size0[1]
    # 5,000 of them must fit in 1 MB of flash (the bench measures it on LittleFS).
    assert payer_bytes <= 190 and payee_bytes <= 190, (payer_bytes, payee_bytes)


def test_voucher_is_applied_exactly_once_and_in_order(rig):
    w = rig.world
    v2 = w.voucher(rig.payer, 2, 5_000)
    assert rig.call(f"pw.apply_update({v2!r})") is True
    assert rig.call(f"pw.apply_update({v2!r})") is False  # a relay delivering it twice changes nothing
    assert "voucher out of order" in refused_code(rig, f"pw.apply_update({w.voucher(rig.payer, 4, 1)!r})")
    assert "another device" in refused_code(rig, f"pw.apply_update({w.voucher(rig.payee, 3, 1)!r})")
    forged = protocol.sign(protocol.Issuer().key, wire.voucher_body(rig.payer.device_id, 3, 9_999, 840, NOW))
    assert "not signed by the backend" in refused_code(rig, f"pw.apply_update({forged!r})")
    assert "currency" in refused_code(rig, f"pw.apply_update({w.voucher(rig.payer, 3, 1, currency=978)!r})")
    big = w.voucher(rig.payer, 3, 10_000_000)
    assert "holding" in refused_code(rig, f"pw.apply_update({big!r})")
    assert rig.call("[pw.balance, pw.voucher_counter]") == [105_000, 2]
    assert reopened(rig, "pw")[0] == 105_000


def test_garbage_updates_are_refused_cleanly(rig):
    for junk in (b"", b"\x00", b"L\x01" + bytes(10), os.urandom(200), b"K\x02" + bytes(112)):
        refused_code(rig, f"pw.apply_update({junk!r})")
    assert rig.call("pw.balance") == 100_000


def test_ack_resets_offline_spending_and_lets_the_ledger_compact(rig):
    rig.pay(3_000)
    rig.pay(4_000)
    seq, chain = rig.call("list(pw.ledger.head)")
    bad = rig.world.ack(rig.payer, seq, os.urandom(32))
    assert "does not match" in refused_code(rig, f"pw.apply_update({bad!r})")
    beyond = rig.world.ack(rig.payer, seq + 5, chain)
    assert "never wrote" in refused_code(rig, f"pw.apply_update({beyond!r})")
    ack = rig.world.ack(rig.payer, seq, chain, issued_at=NOW + 500)
    assert rig.call(f"pw.apply_update({ack!r})") is True
    assert rig.call("[pw.offline_spent, pw.payments_since_sync, pw.known_time, T.now]") == [0, 0, NOW + 500, NOW + 500]
    before = rig.call(STATE.replace("w.", "pw."))
    size = rig.call("pw.ledger.size()")
    assert rig.call("pw.compact()") is True
    assert rig.call("pw.ledger.size()") < size
    assert reopened(rig, "pw") == before
    # Payments go on from the checkpoint: counter and chain continue.
    rig.pay(500)
    p = wire.decode_payment(rig.call("ps.payment"))
    assert p.counter == 3 and p.prev_hash == before[2]
    assert reopened(rig, "pw")[:2] == [92_500, 3]


def test_sent_unconfirmed_payment_blocks_compaction_and_is_refunded_by_status(rig):
    rig.open(rig.qr())
    rig.call("ps.read_hello(es.read_hello(ps.start())) and None")
    m3 = rig.call("ps.confirm(7_000)")  # the receipt never arrives
    rig.pay(1_000)
    assert rig.state()["payer"][3] == ["sent", "done"]
    seq, chain = rig.call("list(pw.ledger.head)")
    assert rig.call(f"pw.apply_update({rig.world.ack(rig.payer, seq, chain)!r})") is True
    # Reported to the backend: it no longer counts as unreported offline spending, though still unresolved.
    assert rig.call("[pw.offline_spent, pw.balance]") == [0, 92_000]
    rig.call("pw.compact()")
    assert rig.call("pw.ledger.base_seq") < rig.call("pw.history() and pw.ledger.seq")
    assert [e[3] for e in rig.call("pw.history()")][0] == "sent"  # a relay cannot make it forget
    txid = wire.txid(rig.payer.device_id, 1)
    refund = rig.world.status(rig.payer, txid, wire.ST_REFUNDED)
    assert rig.call(f"pw.apply_update({refund!r})") is True
    assert rig.call(f"pw.apply_update({refund!r})") is False
    assert rig.call("[pw.balance, pw.offline_spent]") == [99_000, 0]
    assert reopened(rig, "pw")[0] == 99_000
    assert m3  # the payee never saw it: nothing to undo there
    # A completed payment is never refunded.
    done_txid = wire.txid(rig.payer.device_id, 2)
    assert rig.call(f"pw.apply_update({rig.world.status(rig.payer, done_txid, wire.ST_REFUNDED)!r})") is False
    assert rig.call(f"pw.apply_update({rig.world.status(rig.payer, done_txid, wire.ST_SETTLED)!r})") is True
    assert [e[3] for e in rig.call("pw.history()")][-1] == "settled"


def test_payee_credit_rejected_by_the_backend_is_taken_back(rig):
    rig.pay(2_000)
    txid = wire.txid(rig.payer.device_id, 1)
    assert rig.call(f"ew.apply_update({rig.world.status(rig.payee, txid, wire.ST_REJECTED)!r})") is True
    assert rig.call(f"ew.apply_update({rig.world.status(rig.payee, txid, wire.ST_REJECTED)!r})") is False
    assert rig.call("ew.balance") == 0 and reopened(rig, "ew")[0] == 0
    assert [e[3] for e in rig.call("ew.history()")] == ["rejected"]


def test_damaged_ledger_locks_the_wallet_without_dropping_records(rig):
    for amount in (100, 200, 300):
        rig.pay(amount)
    path = rig.call("pw.ledger.path")
    rig.call("pw.ledger.close()")
    with open(path, "r+b") as f:  # damage the second record in place
        f.seek(120)
        byte = f.read(1)
        f.seek(120)
        f.write(bytes([byte[0] ^ 0x40]))
    reopened(rig, "pw")
    assert rig.call("pw.locked") is True
    assert "corrupt" in rig.call("str(pw.ledger.corrupt)")
    rig.open(rig.qr())
    rig.call("ps.read_hello(es.read_hello(ps.start())) and None")
    assert "locked" in refused_code(rig, "ps.confirm(100)")
    assert rig.call("ps.reason") == reasons.LOCKED
    assert os.path.getsize(path) > 300  # nothing was cut off


def test_revocation_list_survives_a_restart(rig):
    # The rig's wallets share one Trust, whose list is the file of the wallet made last (ew); a device has one.
    rl = protocol.revocation_delta(rig.world.backend, 0, 4, NOW, [rig.payee.device_id])
    assert rig.call(f"ew.apply_update({rl!r})") is True
    path = rig.call("T.revoked.path")
    with open(path + ".new", "wb") as f:  # what a power cut in a later merge leaves: never read
        f.write(b"\x00\x00\x00\x09" + os.urandom(13))
    rig.mp.exec("T.revoked = None")  # forget it in RAM, as a reboot would
    reopened(rig, "ew")
    assert rig.call(f"[T.revocation_version, T.is_revoked({rig.payee.device_id!r})]") == [4, True]
    assert open(path, "rb").read() == b"\x00\x00\x00\x04" + rig.payee.device_id


def test_a_cut_before_the_rename_keeps_the_old_list(rig):
    delta = functools.partial(protocol.revocation_delta, rig.world.backend)
    assert rig.call(f"ew.apply_update({delta(0, 2, NOW, [rig.payer.device_id])!r})") is True
    rig.mp.exec("from paytoken import revocation as _t\n_os = _t.os\n"  # the power fails as the file is renamed
                "class _Cut:\n    stat = _os.stat\n"
                "    def rename(a, b):\n        raise OSError(5)\n_t.os = _Cut\n")
    try:
        with pytest.raises(MicroPythonError):
            rig.call(f"ew.apply_update({delta(2, 3, NOW, [rig.payee.device_id])!r})")
    finally:
        rig.mp.exec("_t.os = _os")
    assert rig.call("[T.revocation_version, T.revoked.count]") == [2, 1]
    rig.mp.exec("T.revoked = None")
    reopened(rig, "ew")
    assert rig.call(f"[T.revocation_version, T.is_revoked({rig.payer.device_id!r}), "
                    f"T.is_revoked({rig.payee.device_id!r})]") == [2, True, False]
    assert rig.call(f"ew.apply_update({delta(2, 3, NOW, [rig.payee.device_id])!r})") is True
    assert rig.call(f"T.is_revoked({rig.payee.device_id!r})") is True


def test_hundreds_of_revoked_ids_are_looked_up_in_flash_not_held_in_ram(rig):
    rnd = random.Random(7)
    ids = sorted({rnd.randbytes(8) for _ in range(310)})
    first = rnd.sample(ids, 200)
    second = [i for i in ids if i not in first] + first[:10]  # ids listed already merge once
    delta = functools.partial(protocol.revocation_delta, rig.world.backend)
    rig.mp.exec("import gc\ngc.collect()\n_before = gc.mem_alloc()")
    assert rig.call(f"ew.apply_update({delta(0, 200, NOW, first)!r})") is True
    assert rig.call(f"ew.apply_update({delta(200, 420, NOW, second)!r})") is True
    rig.mp.exec("gc.collect()\n_grew = gc.mem_alloc() - _before")
    assert rig.call("_grew") < 2048  # a set of 310 ids alone would take over 10 KB
    path = rig.call("T.revoked.path")
    assert open(path, "rb").read() == (420).to_bytes(4, "big") + b"".join(ids)
    assert rig.call("[T.revocation_version, T.revoked.count]") == [420, len(ids)]
    assert rig.call(f"[T.is_revoked(i) for i in {ids!r}]") == [True] * len(ids)
    others = [bytes(8), b"\xff" * 8] + [rnd.randbytes(8) for _ in range(100)]
    assert rig.call(f"[T.is_revoked(i) for i in {others!r}]") == [False] * len(others)
    # a binary search: about log2(310) reads of 8 bytes a lookup, whatever the list's length
    rig.mp.exec("class _F:\n"
                "    def __init__(self, f):\n        self.f = f\n        self.reads = 0\n"
                "    def __enter__(self):\n        return self\n"
                "    def __exit__(self, *a):\n        self.f.close()\n"
                "    def seek(self, n):\n        return self.f.seek(n)\n"
                "    def read(self, n):\n        self.reads += 1\n        return self.f.read(n)\n"
                "from paytoken import revocation as _t\n_opened = []\n"
                "def _open(p, m):\n    _opened.append(_F(open(p, m)))\n    return _opened[-1]\n"
                "_t.open = _open\n")
    try:
        assert rig.call(f"[T.is_revoked({ids[123]!r}), T.is_revoked({others[5]!r})]") == [True, False]
        reads = rig.call("[f.reads for f in _opened]")
        assert len(reads) == 2 and all(0 < n <= 9 for n in reads)
    finally:
        rig.mp.exec("del _t.open")


def test_ack_of_an_earlier_record_keeps_later_spending_counted(rig):
    rig.pay(1_000)
    seq, chain = rig.call("list(pw.ledger.head)")
    rig.pay(2_000)
    rig.pay(3_000)
    assert rig.call(f"pw.apply_update({rig.world.ack(rig.payer, seq, chain)!r})") is True
    assert rig.call("[pw.offline_spent, pw.payments_since_sync]") == [5_000, 2]
    assert reopened(rig, "pw")[3] == 5_000


def test_payer_memory_forgets_the_oldest_and_matches_whole_ids_only(mp):
    # The payee's fixed-size memory of payers' last counters (wallet._PayerMemory), on MicroPython.
    mp.exec(
        "from paytoken import wallet\n"
        "_pm = wallet._PayerMemory(4)\n"
        "for _i in range(5):\n"
        "    _pm.put(bytes([_i]) * 8, _i, 100 + _i)\n"
        "_pm.put(b'\\x02' * 8, 20, 200)\n"  # an update keeps its slot
    )
    assert mp.eval("_pm.get(b'\\x00' * 8)") is None  # the first remembered went when the fifth came
    assert mp.eval("[_pm.get(bytes([i]) * 8) for i in range(1, 5)]") == [[1, 101], [20, 200], [3, 103], [4, 104]]
    # an id that appears across two stored ids' boundary is not a match
    mp.exec("_pm2 = wallet._PayerMemory(2)\n_pm2.put(b'AAAABBBB', 1, 1)\n_pm2.put(b'CCCCDDDD', 2, 2)")
    assert mp.eval("_pm2.get(b'BBBBCCCC')") is None
    assert mp.eval("_pm2.get(memoryview(b'xCCCCDDDD')[1:])") == [2, 2]


def test_signed_payments_rebuild_the_exact_bytes_both_devices_signed(rig):
    # What a sync uploads: the ledger keeps parts, wallet_sync.signed_payments gives back the signed bytes.
    rig.pay(1_000)
    rig.pay(2_500)
    # a third payment whose receipt is lost: sent-unconfirmed on the payer, received on the payee
    rig.open(rig.qr())
    m2 = rig.call(f"es.read_hello({rig.call('ps.start()')!r})")
    rig.call(f"ps.read_hello({m2!r})")
    rig.call(f"es.read_payment({rig.call('ps.confirm(700)')!r}) and None")
    rig.mp.exec("from paytoken import wallet_sync")
    payer_side = rig.call("list(wallet_sync.signed_payments(pw))")
    payee_side = rig.call("list(wallet_sync.signed_payments(ew))")
    payer_cert = protocol.verify_cert(rig.payer.cert, rig.world.issuer.public)
    payee_cert = protocol.verify_cert(rig.payee.cert, rig.world.issuer.public)
    assert [r[0] for r in payer_side] == [wire.ROLE_PAYER] * 3 and [r[0] for r in payee_side] == [wire.ROLE_PAYEE] * 3
    assert payer_side[2][2] is None  # no receipt reached the payer
    for (_, pay, rc), (_, pay2, rc2) in zip(payer_side, payee_side, strict=True):
        assert pay == pay2  # the same payment from both ledgers
        p = protocol.verify_payment(pay, payer_cert)  # signed by the payer's key, independently checked
        assert protocol.verify_receipt(rc2, payee_cert, pay).status == reasons.OK
        if rc is not None:
            assert rc == rc2
        assert p.payer_id == rig.payer.device_id and p.payee_id == rig.payee.device_id
    assert [protocol.verify_payment(r[1], payer_cert).amount for r in payer_side] == [1_000, 2_500, 700]


def test_live_wallet_names_its_payments_right_after_compaction(rig):
    # Compaction moves the checkpoint's counter: the txids of SENT records left must count on from it at once,
    # not only after a reopen, or a status for the next payment would find nothing.
    rig.pay(1_000)
    seq, chain = rig.call("list(pw.ledger.head)")
    assert rig.call(f"pw.apply_update({rig.world.ack(rig.payer, seq, chain)!r})") is True
    assert rig.call("pw.compact()") is True
    rig.pay(2_000)
    txid = wire.txid(rig.payer.device_id, 2)
    assert rig.call("[r[1] for r in pw.history()]") == [txid]
    assert rig.call(f"pw.apply_update({rig.world.status(rig.payer, txid, wire.ST_SETTLED)!r})") is True
    assert rig.call("[r[3] for r in pw.history()]") == ["settled"]
