"""Link drops at every step of a payment between real devices: a payer card and two payee terminals, each the
firmware's main.py in its own `micropython` process on the unix_sim board (as `make demo` runs them), joined by the
virtual radio's broker (tests/harness/drops.py). The QR is read off the terminal's display, CONFIRM is pressed when
the card asks. For each step the broker drops the payment's link at one ATT PDU (`drop_at`: right after it arrives,
or instead of delivering it), then both devices' event lines, result screens and, at the end, their flash images
(read by the firmware itself, paytoken_host.demo.export) must show the state docs/architecture.md ("When the link
drops") documents: the payer debited at most once and only when its payment may have arrived (then it keeps it
sent-unconfirmed), the payee credited at most once and only with the payer's own record, and both back at a new
payment. tests/test_apps.py checks the same table on an in-process fake radio.

One set of devices serves every scenario in turn (the terminals take turns, so one shows its result while the
other serves), so each later payment runs on top of the earlier drops; the last ones complete."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from paytoken import reasons, wire
from paytoken_host import demo, simdevice
from paytoken_host.simradio import BrokerThread
from paytoken_host.simradio.att import FIND_TYPE_VALUE_REQ, MTU_REQ, NOTIFY, WRITE_REQ, WRITE_RSP
from tests.harness.drops import PAYEES, Outcome, Rig
from tests.harness.mp import FIRMWARE_BUILD
from tests.harness.pair import Images

AMOUNT, BALANCE, USD = 1_000, 100_000, 840
LOST = "connection_lost"


@dataclass(frozen=True)
class Step:
    """Where the link drops, and the end state the docs give for it."""

    id: str
    rule: dict[str, Any] | None  # drop_at arguments; None: no planned PDU
    payer: tuple[str, str | None]  # the card's end event and its step
    payee: tuple[str, str | None] | None  # the terminal's end event and step (paid: None); None: no session there
    receipts: tuple[str, ...] = ()  # the terminal's receipt= when paid
    at_ask: Callable[[Rig, int], None] | None = None  # what happens while the card asks to confirm (not CONFIRM)
    loss: float = 0.0
    or_payer: tuple[str, str | None] | None = None  # the card's other possible end (a race the docs describe)


# The ATT PDUs of a payment, in order (the broker's trace; each message is one frame at the negotiated MTU 247):
# c2p service, characteristic and descriptor discovery, MTU exchange; WRITE_REQ #1 subscribes (CCCD), #2 is OPEN
# (the terminal answers with NOTIFY #1, READY); WRITE_REQ #3 carries message 1, NOTIFY #2 message 2, WRITE_REQ #4
# message 3 (the payment) and its WRITE_RSP #4 acknowledges it, NOTIFY #3 is message 4 (the receipt).
def c2p(att: int, nth: int = 1, deliver: bool = True) -> dict[str, Any]:
    return dict(dir="c2p", att=att, nth=nth, deliver=deliver)


def p2c(att: int, nth: int = 1, deliver: bool = True) -> dict[str, Any]:
    return dict(dir="p2c", att=att, nth=nth, deliver=deliver)


def drop_then_confirm(rig: Rig, link: int) -> None:
    """The payee goes away while the person decides; CONFIRM once the card has said so: too late, nothing signed."""
    rig.radio.drop(link)
    rig.stations["payer"].seen(("failed",))
    rig.press("confirm")


def confirm_as_it_drops(rig: Rig, link: int) -> None:
    """CONFIRM pressed as the link drops: whether the card heard of the drop first is a race."""
    rig.radio.drop(link)
    rig.press("confirm")


STEPS = [
    Step("discovery", c2p(FIND_TYPE_VALUE_REQ, deliver=False), ("failed", "connect"), None),
    Step("mtu_exchange", c2p(MTU_REQ), ("failed", "connect"), None),
    Step("subscribe", c2p(WRITE_REQ, 1), ("failed", "connect"), None),
    Step("ready_lost", p2c(NOTIFY, 1, deliver=False), ("failed", "connect"), ("failed", "hello")),
    Step("message1_lost", c2p(WRITE_REQ, 3, deliver=False), ("failed", "hello"), ("failed", "hello")),
    Step("message1_arrived", c2p(WRITE_REQ, 3), ("failed", "hello"), ("failed", "hello")),
    Step("message2_lost", p2c(NOTIFY, 2, deliver=False), ("failed", "hello"), ("failed", "payment")),
    Step("message2_arrived", p2c(NOTIFY, 2), ("failed", "confirm"), ("failed", "payment")),
    Step("deciding", None, ("failed", "confirm"), ("failed", "payment"), at_ask=drop_then_confirm),
    # signed and sent only if the press came first: then as "payment_lost", the payment never reached the payee
    Step("confirm_as_it_drops", None, ("failed", "confirm"), ("failed", "payment"), at_ask=confirm_as_it_drops,
         or_payer=("unconfirmed", "send")),
    Step("payment_lost", c2p(WRITE_REQ, 4, deliver=False), ("unconfirmed", "send"), ("failed", "payment")),
    Step("payment_arrived", c2p(WRITE_REQ, 4), ("unconfirmed", "send"), ("paid", None), ("lost",)),
    # "sent" if the terminal's stack took the receipt before the drop reached it: its processing of message 3
    # races one connection interval
    Step("payment_acknowledged", p2c(WRITE_RSP, 4), ("unconfirmed", "receipt"), ("paid", None), ("lost", "sent")),
    Step("receipt_lost", p2c(NOTIFY, 3, deliver=False), ("unconfirmed", "receipt"), ("paid", None), ("sent",)),
    Step("receipt_arrived", p2c(NOTIFY, 3), ("paid", None), ("paid", None), ("sent",)),
    Step("packet_loss", None, ("paid", None), ("paid", None), ("sent",), loss=0.3),
    Step("next_payment", None, ("paid", None), ("paid", None), ("sent",)),
]
BY_ID = {s.id: s for s in STEPS}


@dataclass
class Run:
    rig: Rig
    outcomes: dict[str, Outcome]
    payee_of: dict[str, str]
    ledgers: dict[str, demo.Exported]
    screens: dict[tuple, list[str]]


def expected_screens(states: set[tuple]) -> dict[tuple, list[str]]:
    """Each screen state rendered by the firmware's screens on the simulator's display, as its frames print."""
    source = "from board.simdisplay import SimDisplay\nfrom paytoken.ui import screens\n" + "".join(
        f"d = SimDisplay(128, 64)\nscreens.render(d.fb, 128, 64, {s!r})\nprint('FRAME')\nprint(d.render())\n"
        for s in sorted(states))
    proc = simdevice.run_firmware(source, FIRMWARE_BUILD)
    assert proc.returncode == 0, proc.stderr
    frames = proc.stdout.split("FRAME\n")[1:]
    return {s: shown(frame.split("\n")) for s, frame in zip(sorted(states), frames, strict=True)}


def shown(frame: list[str]) -> list[str]:
    """A frame's rows without the blank ones at its foot (the text rendering leaves them empty)."""
    rows = list(frame)
    while rows and not rows[-1]:
        rows.pop()
    return rows


def expected_state(device: str, end: tuple[str, dict[str, str]]) -> tuple:
    name, fields = end
    if device == "payer":
        return {"paid": ("payer_paid", AMOUNT, USD, int(fields.get("balance", 0))),
                "unconfirmed": ("payer_unconfirmed", AMOUNT, USD),
                "failed": ("payer_declined", int(fields.get("reason", 0)))}[name]
    return ("payee_paid", AMOUNT, USD) if name == "paid" else ("payee_error", int(fields.get("reason", 0)))


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    folder = tmp_path_factory.mktemp("drops")
    images = Images(folder / "images", amount=AMOUNT, balance=BALANCE)
    with BrokerThread(seed=11) as radio:
        rig = Rig(folder / "devices", images, radio, AMOUNT)
        outcomes, payee_of = {}, {}
        try:
            for i, step in enumerate(STEPS):
                payee_of[step.id] = PAYEES[i % 2]
                if step.loss:
                    radio.config(loss=step.loss)
                outcomes[step.id] = rig.pay(payee_of[step.id], step.rule, step.at_ask)
            rig.settle(list(outcomes.values()))
        finally:
            logs = rig.stop()
    ledgers = {name: demo.export(folder / "devices" / f"{name}.img", FIRMWARE_BUILD) for name in logs}
    states = {expected_state(d, o.end(d)) for o in outcomes.values() for d in o.events if o.end(d)}
    yield Run(rig, outcomes, payee_of, ledgers, expected_screens(states))


@pytest.mark.parametrize("step", [s.id for s in STEPS])
def test_link_drop_ends_in_the_documented_state(run: Run, step: str):
    want, out = BY_ID[step], run.outcomes[step]
    payee = run.payee_of[step]
    story = f"{out.error}\n{out.events}\ntrace: {out.trace[-3:]}"
    assert not out.error, story
    # the link dropped exactly at the planned PDU: the last one delivered is it, or the one before it
    if want.rule is not None:
        planned = [t for t in out.trace if t["dir"] == want.rule["dir"] and t["att"] == want.rule["att"]]
        assert out.link["up"] is False and out.link["reason"] == {"central": 8, "peripheral": 8}, out.link
        if want.rule["deliver"]:
            assert len(planned) == want.rule["nth"] and out.trace[-1] is planned[-1], story
        else:
            assert len(planned) == want.rule["nth"] - 1 and out.link["stats"][want.rule["dir"]]["discarded"] >= 1
    elif not want.loss and not want.at_ask:
        assert out.link["up"] is False and out.link["reason"] != {"central": 8, "peripheral": 8}  # closed by them
    if want.loss:
        assert out.link["stats"]["c2p"]["retransmissions"] + out.link["stats"]["p2c"]["retransmissions"] > 0

    # the card: its end event and step, its balance moved by the amount exactly when it debited
    name, fields = out.end("payer")
    assert (name, fields.get("step")) in (want.payer, want.or_payer), story
    before = int(out.events["payer"][0][1]["balance"]) if out.events["payer"][0][0] == "ready" else None
    debited = name in ("paid", "unconfirmed")
    assert "confirmed" in out.names("payer") or not debited
    if name != "paid":
        assert (fields["reason"], fields["why"]) == (str(reasons.LINK), LOST), story
    if before is not None:
        assert int(fields["balance"]) == before - AMOUNT * debited

    # the terminal: no session if the link dropped before OPEN; otherwise its end event, once
    ends = [e for e in out.events[payee] if e[0] in ("paid", "failed")]
    if want.payee is None:
        assert ends == [] and "connected" not in out.names(payee), story
    else:
        assert len(ends) == 1, story
        (pname, pfields), = ends
        assert (pname, pfields.get("step")) == want.payee, story
        if pname == "paid":
            assert pfields["receipt"] in want.receipts, story
            assert pfields["counter"] == fields["counter"] and pfields["amount"] == str(AMOUNT)
            assert pfields["payer"] == run.rig.keys["payer"].device_id.hex()[:16]
        else:
            assert (pfields["reason"], pfields["why"], "refusal" in pfields) == (str(reasons.LINK), LOST, False)
    # the payee credits only what the payer debited (a credit without the payer's record cannot happen)
    assert not (ends and ends[0][0] == "paid") or debited

    # the screens say what the docs say: the card's result, the terminal's result
    assert shown(out.screen["payer"]) == run.screens[expected_state("payer", out.end("payer"))]
    if want.payee is not None:
        assert shown(out.screen[payee]) == run.screens[expected_state("payee", ends[0])]


def test_ledgers_hold_each_payment_once_and_only_the_payers_own(run: Run):
    """The flash images after every scenario: the payer's payments each once, sent-unconfirmed (no receipt) where
    the card said unconfirmed; each terminal credited once per `paid`, with the payer's exact signed bytes."""
    payer_balance, payer_records = run.ledgers["payer"][:2]
    by_counter = {wire.decode_payment(p).counter: (p, r) for role, p, r in payer_records if role == wire.ROLE_PAYER}
    assert len(by_counter) == len(payer_records)  # every record is a payment of its own
    ends = {step: run.outcomes[step].end("payer") for step in BY_ID}
    debits = {int(f["counter"]): (step, name) for step, (name, f) in ends.items() if name != "failed"}
    assert sorted(by_counter) == list(range(1, len(debits) + 1)) == sorted(debits)  # no double, no lost debit
    for counter, (step, name) in debits.items():
        _, receipt = by_counter[counter]
        assert (receipt is not None) == (name == "paid"), step  # unconfirmed: kept sent-unconfirmed
    assert payer_balance == BALANCE - AMOUNT * len(debits)
    assert payer_balance == int(ends["next_payment"][1]["balance"])

    credited = 0
    for payee in PAYEES:
        balance, records = run.ledgers[payee][:2]
        paid = [step for step, o in run.outcomes.items() if run.payee_of[step] == payee and o.end(payee)
                and o.end(payee)[0] == "paid"]
        assert len(records) == len(paid) and balance == AMOUNT * len(paid), payee
        for role, payment, receipt in records:
            p = wire.decode_payment(payment)
            assert role == wire.ROLE_PAYEE and receipt is not None
            assert payment == by_counter[p.counter][0]  # exactly the payment the payer stored and signed
            step, name = debits[p.counter]
            assert run.payee_of[step] == payee
            if name == "paid":
                assert receipt == by_counter[p.counter][1]  # the receipt the card stored is this countersignature
        credited += len(records)
    # every sent-unconfirmed payment that reached a terminal is credited there; the rest never arrived
    arrived = {s.id for s in STEPS if s.payee and s.payee[0] == "paid"}
    assert credited == len(arrived)
    assert {debits[c][0] for c in debits} - arrived in ({"payment_lost"}, {"payment_lost", "confirm_as_it_drops"})


def test_both_devices_pay_again_after_the_drops(run: Run):
    """After every drop both devices come back to a new payment: each terminal shows a new QR once its session
    ended, the card its ready screen, and the last payments (on lossy air, then clean) complete on top of them."""
    for step in ("packet_loss", "next_payment"):
        out = run.outcomes[step]
        payer_end, payee_end = out.end("payer"), out.end(run.payee_of[step])
        assert payer_end[0] == "paid" and payee_end[0] == "paid", out.events
    for payee in PAYEES:
        assert run.rig.qr[payee] is not None
    # a terminal whose session began draws a new QR; one the link never reached keeps its QR, paid next time
    for i, step in enumerate(STEPS[:-2]):  # (the terminals take turns: the next step on this one)
        after = next(s for s in STEPS[i + 1:] if run.payee_of[s.id] == run.payee_of[step.id])
        nonces = [dict(run.outcomes[s].events["payer"])["scanned"]["nonce"] for s in (step.id, after.id)]
        assert (nonces[0] == nonces[1]) == (step.payee is None), (step.id, after.id)
    last = run.outcomes["next_payment"].end("payer")[1]
    assert int(last["counter"]) == len([1 for o in run.outcomes.values() if o.end("payer")[0] != "failed"])
