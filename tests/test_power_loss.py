"""Power cuts at every block write of a long run of payments, receipts, top-ups and compactions: after each
cut the device remounts, recovers, and holds exactly what it had committed (tests/harness/powercut.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from paytoken import wire
from tests.harness.mp import MicroPython
from tests.protocol_rig import NOW, World

HARNESS = Path(__file__).parent / "harness"


@pytest.fixture(scope="module")
def cutter(request):
    # make test: 16 payments, every write cut (600 points); make test-long: 60 payments, every write.
    payments = 60 if request.config.getoption("--run-slow") else 16
    world = World()
    payer, payee = world.device(wire.ROLE_PAYER), world.device(wire.ROLE_PAYEE)
    backend = world.backend.private_numbers().private_value.to_bytes(32, "big")
    # Two 256 KB flash images are kept per operation for the cut runs to start from.
    with MicroPython(heapsize="160M" if payments > 16 else "48M", extra_path=[HARNESS]) as mp:
        mp.exec(
            "import powercut\n"
            f"world = powercut.World({world.issuer.public!r}, {backend!r}, {NOW}, ({payer.priv!r}, {payer.cert!r}),"
            f" ({payee.priv!r}, {payee.cert!r}, ({payee.static[0]!r}, {payee.static[1]!r})), {payments})\n"
            "runs, states = powercut.reference(world)\n"
        )
        yield mp


def test_reference_run_exercises_every_kind_of_write(cutter):
    names = cutter.eval("[r[0] for r in runs]")
    assert {"voucher", "pay", "ack-a", "ack-b"} <= set(names)
    writes = cutter.eval("[sum(r[2] for r in runs), sum(r[3] for r in runs)]")
    assert min(writes) > 100, writes
    # Both compactions really dropped records.
    assert cutter.eval("[world.a.w.ledger.base_seq > 0, world.b.w.ledger.base_seq > 0]") == [True, True]


def test_power_cut_at_any_write_loses_nothing_committed(cutter):
    cutter.exec("points = powercut.plan(world, runs)")
    cuts, nocut, failures = cutter.eval("powercut.run_all(world, runs, states, points)")
    assert not failures, failures[:5]
    assert nocut == 0 and cuts == cutter.eval("len(points)") >= 500
