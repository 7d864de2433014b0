"""The payer card and the payee terminal (paytoken.app) on MicroPython: both apps in one process and one asyncio
loop (tests/harness/app_rig.py), each device with its own LittleFS flash image provisioned by
paytoken_host.simdevice, its simulated display, buttons and scanner, and a fake radio on Loopback links
(tests/harness/fake_air.py). A payment end to end, then every fault: link drops at each step, a second payer,
a stale QR, a wrong device answering, too little money, the decline button, every timeout."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import zxingcpp
from PIL import Image

from paytoken import base45, reasons, wire
from paytoken_host import protocol
from paytoken_host.simdevice import Authority, provision_source
from tests.harness.mp import MicroPython, run_script

HARNESS = Path(__file__).parent / "harness"
USD = 840
PAYER, PAYEE = wire.ROLE_PAYER, wire.ROLE_PAYEE
ADDR = bytes.fromhex("c21122334455")
# Short timeouts so a test takes milliseconds; each test may lower one further.
FAST = {
    "card": {"SCAN_TRIGGER_MS": 20, "CONNECT_MS": 500, "ANSWER_MS": 500, "AMOUNT_MS": 2000, "CONFIRM_MS": 2000,
             "RECEIPT_MS": 500, "RESULT_MS": 30},
    "terminal": {"QR_MS": 5000, "HELLO_MS": 500, "DECIDE_MS": 3000, "RESULT_MS": 30, "PAUSE_MS": 50},
}
_mounts = itertools.count()


@pytest.fixture(scope="module")
def mp():
    with MicroPython(heapsize="4M", extra_path=[HARNESS]) as proc:
        proc.exec("import app_rig, fake_air\nfrom paytoken.app import card, terminal\n")
        yield proc


class Apps:
    """pytest's side of the rig: provisions devices into flash images and drives them."""

    def __init__(self, mp: MicroPython, tmp: Path):
        self.mp, self.tmp = mp, tmp
        self.auth = Authority()
        self.keys: dict[str, object] = {}
        for module, values in FAST.items():
            self.set(module, **values)
        mp.exec("rig = app_rig.Rig()")

    def set(self, module: str, **values: int) -> None:
        self.mp.exec("\n".join(f"{module}.{k} = {v!r}" for k, v in values.items()))

    def device(self, name: str, role: int, vouchers: int = 0, amount: int | None = 10_000, keys=None,
               addr: bytes = ADDR, png: bool = False, auth: Authority | None = None) -> None:
        auth = auth or self.auth
        keys = keys or auth.device(role)
        self.keys[name] = keys
        image = str(self.tmp / f"{name}.img")
        mount = f"/dev{next(_mounts)}"
        config = {"name": name}
        if role == PAYEE and amount is not None:
            config["amount"] = amount
        vs = [auth.voucher(keys, 1, vouchers)] if vouchers else []
        self.mp.exec(provision_source(image, mount, auth, keys, vs, config))
        png_path = str(self.tmp / f"{name}.png") if png else None
        self.mp.exec(f"rig.add({image!r}, {mount!r}, {addr!r}, {png_path!r})")

    def payee(self, name: str = "payee", **kw) -> None:
        self.device(name, PAYEE, **kw)

    def payer(self, name: str = "payer", balance: int = 100_000, **kw) -> None:
        self.device(name, PAYER, vouchers=balance, **kw)

    def wait(self, name: str, event: str, timeout_ms: int = 5000) -> dict:
        return self.mp.eval(f"rig.wait({name!r}, {event!r}, {timeout_ms})")

    def screen(self, name: str, screen: str, timeout_ms: int = 5000) -> list:
        return self.mp.eval(f"rig.until_screen({name!r}, {screen!r}, {timeout_ms})")

    def settle(self, ms: int) -> None:
        self.mp.exec(f"rig.settle({ms})")

    def press(self, name: str, button: str, hold: str = "short") -> None:
        self.mp.exec(f"rig.press({name!r}, {button!r}, {hold!r})")

    def scan(self, name: str, text: str) -> None:
        self.mp.exec(f"rig.scan({name!r}, {text!r})")

    def state(self, name: str) -> dict:
        return self.mp.eval(f"rig.state({name!r})")

    def reopened(self, name: str) -> dict:
        return self.mp.eval(f"rig.reopened({name!r})")

    def eval(self, expr: str):
        return self.mp.eval(expr)

    def next_qr(self, payee: str = "payee") -> tuple[str, dict]:
        ev = self.wait(payee, "qr")
        return base45.encode(bytes.fromhex(ev["qr"])), ev

    def offer(self, payer: str = "payer", payee: str = "payee") -> tuple[str, dict]:
        """The payee's next QR scanned by the card, up to the confirm screen."""
        text, ev = self.next_qr(payee)
        self.scan(payer, text)
        self.screen(payer, "payer_confirm")
        return text, ev

    def pay(self, payer: str = "payer", payee: str = "payee") -> tuple[dict, dict]:
        self.offer(payer, payee)
        self.press(payer, "confirm")
        return self.wait(payer, "paid"), self.wait(payee, "paid")

    def close(self) -> None:
        self.mp.exec("rig.close()")


@pytest.fixture
def apps(mp, tmp_path):
    a = Apps(mp, tmp_path)
    yield a
    a.close()


def balances(apps: Apps) -> tuple[int, int]:
    return apps.state("payer")["balance"], apps.state("payee")["balance"]


# ---- the payment ----


def test_payment_of_100_dollars(apps):
    apps.payee(amount=10_000, png=True)
    apps.payer(balance=150_000, png=True)
    start = apps.wait("payer", "start")
    assert start["balance"] == 150_000 and start["currency"] == USD
    ev = apps.wait("payee", "qr")
    assert ev["amount"] == 10_000 and len(ev["nonce"]) == 16
    # The QR as the payer's scanner would see it: decoded from the payee display's own pixels.
    found = zxingcpp.read_barcodes(Image.open(apps.tmp / "payee.png"))
    text = found[0].text
    assert text == base45.encode(bytes.fromhex(ev["qr"]))
    qr = wire.decode_qr(base45.decode(text))
    assert qr.wallet_short == apps.keys["payee"].device_id[:4] and qr.ble_addr == ADDR and qr.addr_random
    assert qr.x25519_pub == apps.keys["payee"].static[1] and qr.nonce.hex() == ev["nonce"]
    assert qr.amount is None  # the amount travels in the session on a 128x64 display
    assert apps.state("payee")["screen"] == ["payee_qr", text, 10_000, USD]

    apps.scan("payer", text)
    assert apps.wait("payer", "scanned")["nonce"] == ev["nonce"]
    assert apps.wait("payee", "connected")["nonce"] == ev["nonce"]
    assert apps.state("payee")["screen"] == ["payee_waiting", 10_000, USD]
    offer = apps.wait("payer", "offer")
    assert offer["amount"] == 10_000 and offer["payee"] == apps.keys["payee"].device_id.hex()
    confirm = apps.screen("payer", "payer_confirm")
    assert confirm == ["payer_confirm", 10_000, USD, apps.keys["payee"].device_id[:4].hex()]
    assert apps.state("payer")["counter"] == 0  # nothing signed before the person confirms
    apps.press("payer", "confirm")
    paid, credited = apps.wait("payer", "paid"), apps.wait("payee", "paid")
    assert paid["amount"] == 10_000 and paid["balance"] == 140_000 and paid["counter"] == 1
    assert credited["amount"] == 10_000 and credited["balance"] == 10_000 and credited["receipt"] == "sent"
    assert credited["payer"] == apps.keys["payer"].device_id.hex() and credited["seq"] == 1
    payer, payee = apps.state("payer"), apps.state("payee")
    assert payer["screen"] == ["payer_paid", 10_000, USD, 140_000]
    assert payee["screen"] == ["payee_paid", 10_000, USD]
    assert payer["history"] == [[PAYER, 10_000, "done"]] and payee["history"] == [[PAYEE, 10_000, "received"]]
    # What the flash holds: the same after a reboot.
    assert apps.reopened("payer") == {"balance": 140_000, "counter": 1, "seq": 0, "history": payer["history"]}
    assert apps.reopened("payee") == {"balance": 10_000, "counter": 0, "seq": 1, "history": payee["history"]}
    # The nonce was used once: the next QR has a new one.
    assert apps.wait("payee", "qr")["nonce"] != ev["nonce"]
    assert apps.wait("payer", "ready")["balance"] == 140_000


def test_payer_enters_the_amount_with_the_buttons(apps):
    apps.payee(amount=None)
    apps.payer()
    text, ev = apps.next_qr()
    assert ev["amount"] == 0
    apps.scan("payer", text)
    assert apps.screen("payer", "payer_amount") == ["payer_amount", "", USD]
    assert apps.state("payee")["screen"] == ["payee_waiting", None, USD]
    # $1.50: DOWN sets the digit to 1, CONFIRM moves on, DOWN x5, CONFIRM, then hold CONFIRM
    for button in ["down", "confirm"] + ["down"] * 5 + ["confirm"]:
        apps.press("payer", button)
    apps.settle(60)
    assert apps.state("payer")["screen"] == ["payer_amount", "150", USD]
    apps.press("payer", "confirm", "long")
    assert apps.screen("payer", "payer_confirm")[1] == 150
    apps.press("payer", "confirm")
    assert apps.wait("payer", "paid")["amount"] == 150
    assert apps.wait("payee", "paid")["amount"] == 150
    assert balances(apps) == (100_000 - 150, 150)


def test_a_button_on_the_ready_screen_shows_the_balance(apps):
    apps.payee()
    apps.payer()
    apps.pay()
    apps.wait("payer", "ready")
    apps.press("payer", "down")
    assert apps.screen("payer", "payer_balance") == ["payer_balance", 90_000, USD, [[PAYER, 10_000, "done"]]]
    apps.screen("payer", "payer_ready")


# ---- link drops at every step ----

# (side, drop_after) -> what each device shows and holds afterwards. Loopback's drop_after n: the link drops
# when that end tries to send its (n+1)-th message; the payer sends messages 1 and 3, the payee 2 and 4.
DROPS = {
    # message 1 never leaves: nothing happened anywhere
    ("payer", 0): {"payer": ("failed", reasons.LINK, "hello"), "payee": ("failed", reasons.LINK, "hello"),
                   "payer_history": [], "payee_history": []},
    # the payment is signed and its debit stored, then it cannot leave: the payer cannot know whether it
    # arrived, so it keeps it as sent-unconfirmed (money reserved; the backend refunds it after the expiry,
    # since the payee never uploads it); the payee has nothing
    ("payer", 1): {"payer": ("unconfirmed", reasons.LINK, "send"), "payee": ("failed", reasons.LINK, "payment"),
                   "payer_history": [[PAYER, 10_000, "sent"]], "payee_history": []},
    # the payer has nothing left to send: no drop
    ("payer", 2): None,
    ("payer", 3): None,
    # message 2 never leaves: nothing stored anywhere
    ("payee", 0): {"payer": ("failed", reasons.LINK, "hello"), "payee": ("failed", reasons.LINK, "hello"),
                   "payer_history": [], "payee_history": []},
    # the credit is stored before the receipt leaves, then the receipt is lost: the payee is paid, the payer
    # keeps the payment as sent-unconfirmed and the backend settles it from the payee's upload
    ("payee", 1): {"payer": ("unconfirmed", reasons.LINK, "receipt"), "payee": ("paid",),
                   "payer_history": [[PAYER, 10_000, "sent"]], "payee_history": [[PAYEE, 10_000, "received"]]},
    ("payee", 2): None,
    ("payee", 3): None,
}


@pytest.mark.parametrize(("side", "n"), list(DROPS), ids=lambda v: str(v))
def test_link_drop(apps, side, n):
    apps.payee()
    apps.payer()
    apps.mp.exec(f"rig.air.faults.append({{'{side}_drop': {n}}})")
    want = DROPS[(side, n)]
    text, _ = apps.next_qr()
    apps.scan("payer", text)
    if want is None or want["payer"][2] in ("send", "receipt"):
        apps.screen("payer", "payer_confirm")
        apps.press("payer", "confirm")
    if want is None:
        apps.wait("payer", "paid"), apps.wait("payee", "paid")
        assert balances(apps) == (90_000, 10_000)
        return
    kind, *rest = want["payer"]
    ev = apps.wait("payer", kind)
    assert (ev["reason"], ev["step"]) == tuple(rest)
    ev = apps.wait("payee", want["payee"][0])
    if want["payee"][0] == "failed":
        assert (ev["reason"], ev["step"]) == want["payee"][1:]
    else:
        assert ev["receipt"] == "lost" and ev["balance"] == 10_000
    payer, payee = apps.state("payer"), apps.state("payee")
    assert payer["history"] == want["payer_history"] and payee["history"] == want["payee_history"]
    assert payer["screen"] == (["payer_unconfirmed", 10_000, USD] if kind == "unconfirmed"
                               else ["payer_declined", reasons.LINK])
    assert payee["screen"] == (["payee_paid", 10_000, USD] if want["payee"][0] == "paid"
                               else ["payee_error", reasons.LINK])
    # no double debit, no lost credit: the payer's money left once at most, the payee credited it at most once
    spent = 10_000 * len(want["payer_history"])
    assert payer["balance"] == 100_000 - spent and payer["counter"] == len(want["payer_history"])
    assert payee["balance"] == 10_000 * len(want["payee_history"])
    # and the next payment, on a new QR, goes through on top of it (counter and chain continue)
    paid, credited = apps.pay()
    assert paid["counter"] == payer["counter"] + 1 and paid["balance"] == payer["balance"] - 10_000
    assert credited["balance"] == payee["balance"] + 10_000
    assert apps.reopened("payer")["balance"] == paid["balance"]
    assert apps.reopened("payee")["balance"] == credited["balance"]


def test_payee_gone_while_the_person_decides_nothing_is_signed(apps):
    apps.payee()
    apps.payer()
    apps.offer()
    apps.mp.exec("rig.air.links[-1][1].close()")  # the payee side drops while the confirm screen shows
    ev = apps.wait("payer", "failed")
    assert (ev["reason"], ev["step"]) == (reasons.LINK, "confirm")
    apps.press("payer", "confirm")  # too late: the session is over
    apps.settle(50)
    assert apps.state("payer")["counter"] == 0 and apps.state("payer")["balance"] == 100_000
    assert apps.wait("payee", "failed")["reason"] == reasons.LINK


# ---- other payers, other devices, stale codes ----


def test_second_payer_while_one_is_served_gets_busy(apps):
    apps.payee()
    apps.payer("payer")
    apps.payer("other")
    text, ev = apps.offer("payer")
    apps.scan("other", text)  # the same QR, while the first payer is being served
    busy = apps.wait("other", "failed")
    assert (busy["reason"], busy["step"]) == (reasons.BUSY, "connect")
    assert apps.state("other")["screen"] == ["payer_declined", reasons.BUSY]
    apps.press("payer", "confirm")
    apps.wait("payer", "paid")
    assert apps.wait("payee", "paid")["payer"] == apps.keys["payer"].device_id.hex()
    assert apps.state("other")["balance"] == 100_000 and apps.state("other")["counter"] == 0
    assert apps.state("payee")["balance"] == 10_000 and apps.state("payee")["seq"] == 1


def test_paid_qr_is_refused_without_connecting(apps):
    apps.payee()
    apps.payer()
    text, _ = apps.offer()
    apps.press("payer", "confirm")
    apps.wait("payer", "paid")
    apps.wait("payer", "ready")
    connects = apps.eval("len(rig.apps['payer'].transport.connects)")
    apps.scan("payer", text)  # the same QR again (a photo of the terminal, a stale screen)
    ev = apps.wait("payer", "failed")
    assert (ev["reason"], ev["step"]) == (reasons.NONCE, "scan")
    assert apps.eval("len(rig.apps['payer'].transport.connects)") == connects
    assert apps.state("payer")["screen"] == ["payer_declined", reasons.NONCE]
    # garbage and foreign QR codes: refused as not a payment QR, no connection either
    for junk in ("HELLO WORLD", "https://example.com/pay", base45.encode(b"\x20" + bytes(50))):
        apps.wait("payer", "ready")
        apps.scan("payer", junk)
        ev = apps.wait("payer", "failed")
        assert (ev["reason"], ev["step"]) == (reasons.FORMAT, "scan")
    assert apps.eval("len(rig.apps['payer'].transport.connects)") == connects
    assert balances(apps) == (90_000, 10_000)


def test_old_qr_of_a_rotated_nonce_fails_at_the_payee(apps):
    # A QR the card never paid, but the terminal has moved on from (a timeout rotated it): the terminal's
    # session is bound to its current QR, so the card's first message does not decrypt there.
    apps.payee()
    apps.payer()
    apps.set("terminal", QR_MS=150)
    old, ev = apps.next_qr()
    assert apps.wait("payee", "expired")["nonce"] == ev["nonce"]
    apps.set("terminal", QR_MS=5000)
    apps.wait("payee", "qr")
    apps.scan("payer", old)
    ev = apps.wait("payee", "failed")
    assert (ev["reason"], ev["step"]) == (reasons.KEY_MISMATCH, "hello")
    ev = apps.wait("payer", "failed")
    assert (ev["reason"], ev["step"]) == (reasons.LINK, "hello")
    assert balances(apps) == (100_000, 0) and apps.state("payer")["counter"] == 0


def test_wrong_terminal_at_the_qr_address_is_refused(apps):
    apps.payee("payee", addr=ADDR)
    apps.payee("wrong", addr=bytes.fromhex("c2aaaaaaaaaa"))
    apps.payer()
    text, _ = apps.next_qr("payee")
    apps.wait("wrong", "qr")
    apps.mp.exec(f"rig.air.payees[{ADDR!r}] = rig.apps['wrong'].transport")  # another terminal answers there
    apps.scan("payer", text)
    ev = apps.wait("wrong", "failed")
    assert (ev["reason"], ev["step"]) == (reasons.KEY_MISMATCH, "hello")  # it cannot read message 1
    ev = apps.wait("payer", "failed")  # the wrong terminal hangs up: no answer to check
    assert (ev["reason"], ev["step"]) == (reasons.LINK, "hello")
    assert apps.state("payer")["counter"] == 0 and apps.state("wrong")["balance"] == 0


def test_impostor_answer_is_refused_as_key_mismatch(apps):
    # A device at the QR's address that answers message 1 without the QR's private key.
    apps.payee()
    apps.payer()
    text, _ = apps.next_qr()
    apps.mp.exec(
        "import asyncio, os\n"
        "imp = fake_air.PayeeRadio(rig.air, rig.apps['payee'].transport.addr)\n"
        "imp.start(b'x' * 8)\n"
        "async def _impostor():\n"
        "    conn = await imp.accept(5000)\n"
        "    imp.got = await conn.recv(5000)\n"
        "    await conn.send(os.urandom(32) + b'\\x12\\x00' + os.urandom(200))\n"
        "    await asyncio.sleep_ms(1000)\n"
        "imp_task = asyncio.create_task(_impostor())\n"
    )
    apps.scan("payer", text)
    ev = apps.wait("payer", "failed")
    assert (ev["reason"], ev["step"]) == (reasons.KEY_MISMATCH, "hello")
    assert apps.state("payer")["screen"] == ["payer_declined", reasons.KEY_MISMATCH]
    assert apps.state("payer")["counter"] == 0
    apps.mp.exec("imp_task.cancel()")


def test_payer_from_another_issuer_is_refused_by_the_payee(apps):
    other = Authority()
    apps.payee()
    apps.payer(auth=other)
    text, _ = apps.next_qr()
    apps.scan("payer", text)
    ev = apps.wait("payer", "failed")
    assert (ev["reason"], ev["step"]) == (reasons.CERT_ISSUER, "hello")
    assert apps.wait("payee", "failed")["reason"] == reasons.CERT_ISSUER


# ---- the person and the wallet say no ----


def test_payee_refuses_a_signed_payment_and_the_money_comes_back(apps):
    # The payee's holding limit is 15,000: the second $100.00 would exceed it. The payer has signed and stored
    # the payment; the payee stores and signs a refusal instead of a credit; the payer's wallet voids it.
    apps.payee(keys=apps.auth.device(PAYEE, protocol.Limits(max_holding=15_000)))
    apps.payer()
    apps.pay()
    apps.offer()
    apps.press("payer", "confirm")
    ev = apps.wait("payer", "failed")
    assert (ev["reason"], ev["step"], ev["balance"]) == (reasons.LIMIT_HOLDING, "receipt", 90_000)
    ev = apps.wait("payee", "failed")
    assert (ev["reason"], ev["step"], ev["refusal"]) == (reasons.LIMIT_HOLDING, "receipt", "sent")
    payer, payee = apps.state("payer"), apps.state("payee")
    assert payer["history"] == [[PAYER, 10_000, "done"], [PAYER, 10_000, "voided"]] and payer["counter"] == 2
    assert payee["history"] == [[PAYEE, 10_000, "received"], [PAYEE, 10_000, "refused"]]
    assert payer["screen"] == ["payer_declined", reasons.LIMIT_HOLDING]
    assert (payer["balance"], payee["balance"]) == (90_000, 10_000)


def test_too_little_balance_is_refused_before_signing(apps):
    apps.payee(amount=10_000)
    apps.payer(balance=5_000)
    text, _ = apps.next_qr()
    apps.scan("payer", text)
    ev = apps.wait("payer", "failed")
    assert (ev["reason"], ev["step"]) == (reasons.FUNDS, "confirm")
    ev = apps.wait("payee", "failed")  # told why, inside the session
    assert (ev["reason"], ev["step"]) == (reasons.FUNDS, "payment")
    payer = apps.state("payer")
    assert payer["screen"] == ["payer_declined", reasons.FUNDS]
    assert payer["counter"] == 0 and payer["balance"] == 5_000 and payer["history"] == []
    assert apps.eval("[e for e in app_rig.EVENTS if e.startswith('EVENT payer confirmed')]") == []


def test_over_the_payment_limit_is_refused_before_signing(apps):
    apps.payee(amount=60_000)  # the default limit is 50,000 per payment
    apps.payer(balance=100_000)
    text, _ = apps.next_qr()
    apps.scan("payer", text)
    assert apps.wait("payer", "failed")["reason"] == reasons.LIMIT_PAYMENT
    assert apps.state("payer")["counter"] == 0


def test_decline_button(apps):
    apps.payee()
    apps.payer()
    apps.offer()
    apps.press("payer", "down")
    ev = apps.wait("payer", "failed")
    assert (ev["reason"], ev["step"]) == (reasons.DECLINED, "confirm")
    ev = apps.wait("payee", "failed")
    assert (ev["reason"], ev["step"]) == (reasons.DECLINED, "payment")
    assert apps.state("payer")["screen"] == ["payer_declined", reasons.DECLINED]
    assert apps.state("payee")["screen"] == ["payee_error", reasons.DECLINED]
    assert balances(apps) == (100_000, 0) and apps.state("payer")["counter"] == 0
    # cancelling an amount entry (holding DOWN) declines as well
    apps.mp.exec("rig.apps['payee'].amount = None")
    text, _ = apps.next_qr()
    apps.scan("payer", text)
    apps.screen("payer", "payer_amount")
    apps.press("payer", "down", "long")
    assert apps.wait("payer", "failed")["reason"] == reasons.DECLINED
    assert apps.wait("payee", "failed")["reason"] == reasons.DECLINED


# ---- timeouts ----


def test_nobody_confirms(apps):
    apps.payee()
    apps.payer()
    apps.set("card", CONFIRM_MS=150)
    apps.offer()
    ev = apps.wait("payer", "failed")
    assert (ev["reason"], ev["step"]) == (reasons.TIMEOUT, "confirm")
    assert apps.wait("payee", "failed")["reason"] == reasons.DECLINED
    assert balances(apps) == (100_000, 0) and apps.state("payer")["counter"] == 0


def test_nobody_enters_an_amount(apps):
    apps.payee(amount=None)
    apps.payer()
    apps.set("card", AMOUNT_MS=150)
    text, _ = apps.next_qr()
    apps.scan("payer", text)
    ev = apps.wait("payer", "failed")
    assert (ev["reason"], ev["step"]) == (reasons.TIMEOUT, "amount")
    assert apps.wait("payee", "failed")["reason"] == reasons.DECLINED


def test_qr_without_a_payer_is_replaced(apps):
    apps.payee()
    apps.set("terminal", QR_MS=100)
    first = apps.wait("payee", "qr")
    assert apps.wait("payee", "expired")["nonce"] == first["nonce"]
    second = apps.wait("payee", "qr")
    assert second["nonce"] != first["nonce"]
    assert apps.eval("rig.apps['payee'].transport.stops") >= 1


def test_payer_that_connects_and_says_nothing(apps):
    apps.payee()
    apps.set("terminal", HELLO_MS=100)
    first = apps.wait("payee", "qr")
    apps.mp.exec(
        "import asyncio\n"
        "silent = fake_air.PayerRadio(rig.air)\n"
        f"conn = asyncio.run(silent.connect(1, {ADDR!r}, bytes(8), 100))\n"
    )
    ev = apps.wait("payee", "failed")
    assert (ev["reason"], ev["step"]) == (reasons.TIMEOUT, "hello")
    assert apps.wait("payee", "qr")["nonce"] != first["nonce"]


def test_payee_that_never_answers(apps):
    apps.payee()
    apps.payer()
    apps.set("card", ANSWER_MS=100)
    apps.set("terminal", DECIDE_MS=300)
    apps.mp.exec("rig.air.faults.append({'payee_stall': 0})")  # message 2 vanishes, the link stays up
    text, _ = apps.next_qr()
    apps.scan("payer", text)
    ev = apps.wait("payer", "failed")
    assert (ev["reason"], ev["step"]) == (reasons.TIMEOUT, "hello")
    ev = apps.wait("payee", "failed")  # the card hung up after its timeout
    assert (ev["reason"], ev["step"]) == (reasons.LINK, "payment")
    assert balances(apps) == (100_000, 0)


def test_receipt_that_never_comes(apps):
    apps.payee()
    apps.payer()
    apps.set("card", RECEIPT_MS=100)
    apps.mp.exec("rig.air.faults.append({'payee_stall': 1})")  # the receipt vanishes, the link stays up
    apps.offer()
    apps.press("payer", "confirm")
    ev = apps.wait("payer", "unconfirmed")
    assert (ev["reason"], ev["step"], ev["balance"]) == (reasons.TIMEOUT, "receipt", 90_000)
    assert apps.wait("payee", "paid")["balance"] == 10_000  # credited before the receipt left
    assert apps.state("payer")["screen"] == ["payer_unconfirmed", 10_000, USD]
    assert apps.state("payer")["history"] == [[PAYER, 10_000, "sent"]]


def test_card_gives_up_before_the_terminal():
    # As shipped: the terminal waits for the payment longer than the card gives the person to enter and confirm
    # it, so a slow person ends the session on the card (which tells the terminal), not by a silent timeout.
    proc = run_script("from paytoken.app import card, terminal\n"
                      "print(card.AMOUNT_MS, card.CONFIRM_MS, terminal.DECIDE_MS, card.ANSWER_MS, terminal.HELLO_MS)")
    amount, confirm, decide, answer, hello = map(int, proc.stdout.split())
    assert decide > amount + confirm and answer >= hello


def test_an_unexpected_failure_is_shown_and_the_apps_go_on(apps):
    # A fault inside the terminal (here: its radio's address() raising once) is logged and shown; the loop goes on.
    apps.payee()
    apps.payer()
    apps.wait("payee", "qr")
    apps.mp.exec(
        "_t = rig.apps['payee'].transport\n"
        "_orig = _t.address\n"
        "def _broken():\n"
        "    _t.address = _orig\n"
        "    raise OSError(5)\n"
        "_t.address = _broken\n"
        "rig.apps['payee'].transport.stop()\n"
    )
    apps.set("terminal", QR_MS=50)
    assert apps.wait("payee", "error")["kind"] == "OSError"
    assert apps.screen("payee", "payee_error") == ["payee_error", reasons.ERROR]
    apps.set("terminal", QR_MS=5000)
    paid, credited = apps.pay()  # and the next sale works
    assert (paid["balance"], credited["balance"]) == (90_000, 10_000)


def test_limits_are_rechecked_by_the_wallet(apps):
    # Over the payer's cumulative offline limit (200,000 by default): refused before signing, reason 13.
    limits = protocol.Limits(per_payment=50_000, offline=15_000)
    keys = apps.auth.device(PAYER, limits)
    apps.payee(amount=10_000)
    apps.payer(balance=100_000, keys=keys)
    apps.pay()
    text, _ = apps.next_qr()
    apps.scan("payer", text)
    assert apps.wait("payer", "failed")["reason"] == reasons.LIMIT_OFFLINE
    assert balances(apps) == (90_000, 10_000)
