# The payer card: scan a payee's QR, connect, show the offer, pay only after the person confirms.
#
#   c = Card(wallet, trust, transport, screen, keys, scanner, log)
#   await c.run(sessions=None)     pays until `sessions` QRs were handled (None: for ever); never raises
#                                  (cancelling the task stops it)
#
# transport (paytoken.ble on a device, a fake in tests) is duck-typed:
#   await transport.connect(addr_type, addr6, nonce, timeout_ms) -> link   (paytoken.link interface), or
#       LinkError: UNREACHABLE (nobody there), BUSY (the payee serves another payer), TIMEOUT
#
# One payment: parse the QR (a nonce this card already paid is refused before connecting), connect, Noise
# message 1, the payee's answer (its certificate and key checked), the amount (the payee's, or entered on
# the buttons), the wallet's checks (balance, limits: refused before anything is signed), the person confirms
# (CONFIRM) or declines (DOWN) within CONFIRM_MS, then the debit is stored, the signed payment sent, and the
# receipt completes it. Every failure shows ('payer_declined', reason) and logs "failed". On the ready screen a
# button shows the balance, and holding CONFIRM enters sync mode over BLE (paytoken.app.syncble).
#
# Link drops: before the person confirmed nothing is stored or signed; if the link is already gone when
# they confirm, nothing is signed either. Once the debit is stored the payment may reach the payee, so
# if sending it or waiting for the receipt fails, the wallet keeps it as sent-unconfirmed (the money stays
# reserved; the backend settles or refunds it) and the screen says so: ('payer_unconfirmed', ...).
import asyncio
from time import ticks_diff, ticks_ms

from paytoken import reasons, wire
from paytoken.app.entry import AmountEntry
from paytoken.app.io import POLL_MS, hexs, link_reason, why
from paytoken.link import LinkError
from paytoken.payer import PayerSession
from paytoken.reasons import Refused

SCAN_TRIGGER_MS = 3_000  # the scanner is triggered again this often while the card waits for a QR
CONNECT_MS = 8_000  # to reach the payee at the QR's address
ANSWER_MS = 10_000  # from our first message to the payee's answer (it checks our certificate)
AMOUNT_MS = 60_000  # to enter an amount, when the payee asks for none
CONFIRM_MS = 30_000  # to confirm or decline
RECEIPT_MS = 10_000  # from our payment to the payee's receipt
RESULT_MS = 5_000  # the outcome stays on the screen this long (or until a button is pressed)
BALANCE_ROWS = 3  # payments listed on the balance screen (a button on the ready screen shows it)
SYNC_KEY = ("confirm", "long")  # on the ready screen: sync mode over BLE (paytoken.app.syncble)


class Card:
    def __init__(self, wallet, trust, transport, screen, keys, scanner, log, backend_kx=None, name="payer"):
        self.wallet = wallet
        self.backend_kx = backend_kx  # the backend's sync key (store/backend.kx), for sync mode
        self.name = name
        self.trust = trust
        self.transport = transport
        self.screen = screen
        self.keys = keys
        self.scanner = scanner
        self.log = log
        self.handled = 0
        self.busy = False  # a payment under way: the USB watcher answers a sync relay E_BUSY

    async def run(self, sessions=None):
        w = self.wallet
        self.log("start", "id=%s balance=%d currency=%d" % (hexs(w.device_id), w.balance, w.cert.currency))
        while sessions is None or self.handled < sessions:
            try:
                text = await self.scan()
                self.handled += 1
                self.busy = True
                await self.pay(text)
            except Exception as e:  # nothing escapes the loop: log, show, carry on
                self.log("error", "kind=%s" % type(e).__name__)
                self.screen.show("payer_declined", reasons.ERROR)
            self.busy = False
            self.keys.clear()
            await self.keys.next(RESULT_MS)

    async def scan(self):
        # The next QR text. Non-blocking: the scanner is polled (and re-triggered) between asyncio turns;
        # a button shows the balance for a while.
        w = self.wallet
        self.screen.show("payer_ready")
        self.keys.clear()  # before "ready": a press from then on counts
        self.log("ready", "balance=%d" % w.balance)
        sc = self.scanner
        sc.clear()
        sc.trigger()
        t0 = ticks_ms()
        while True:
            text = sc.read(0)
            if text:
                return text
            k = self.keys.get()
            if k == SYNC_KEY:  # sync mode over BLE (paytoken.app.syncble, loaded only now)
                from paytoken.app import syncble

                await syncble.run(w, self.backend_kx, self.name, self.screen, self.log, self.keys)
                await self.keys.next(RESULT_MS)
                self.screen.show("payer_ready")
                self.log("ready", "balance=%d" % w.balance)
            elif k is not None:
                rows = [(r[0], r[2], r[3]) for r in w.history(BALANCE_ROWS)]
                self.screen.show("payer_balance", w.balance, w.cert.currency, rows)
                await self.keys.next(RESULT_MS)
                self.screen.show("payer_ready")
            if ticks_diff(ticks_ms(), t0) >= SCAN_TRIGGER_MS:
                sc.trigger()
                t0 = ticks_ms()
            await asyncio.sleep_ms(POLL_MS)

    def _failed(self, code, step):
        self.log("failed", "%s step=%s balance=%d" % (why(code), step, self.wallet.balance))
        self.screen.show("payer_declined", code)

    async def pay(self, text):
        try:
            s = PayerSession(self.wallet, self.trust, text)
        except Refused as r:  # not a payment QR, or one this card already paid: no connection at all
            self._failed(r.code, "scan")
            return
        qr = s.qr
        self.log("scanned", "nonce=%s payee=%s" % (hexs(qr.nonce), hexs(qr.wallet_short)))
        self.screen.show("payer_working", "Connecting...")
        try:
            conn = await self.transport.connect(1 if qr.addr_random else 0, qr.ble_addr, qr.nonce, CONNECT_MS)
        except LinkError as e:
            self._failed(link_reason(e), "connect")
            return
        try:
            await self._session(s, conn)
        finally:
            conn.close()

    async def _decline(self, s, conn, code, told, step):
        # The person said no, or the wallet refused: tell the payee (`told`, a protocol reason), sign nothing.
        msg = s.decline(told)
        try:
            await conn.send(msg)
        except LinkError:
            pass  # nothing was signed: the payee's session simply ends
        self._failed(code, step)

    async def _session(self, s, conn):
        w = self.wallet
        step = "hello"
        try:
            await conn.send(s.start())
            offer = s.read_hello(await conn.recv(ANSWER_MS))
            self.log("offer", "amount=%d currency=%d payee=%s" % (offer.amount or 0, offer.currency,
                                                                  hexs(offer.payee_id)))
            amount = offer.amount
            if amount is None:
                step = "amount"
                amount, code = await self._enter_amount(offer.currency, conn)
                if amount is None:
                    await self._decline(s, conn, code, reasons.DECLINED, step)
                    return
            step = "confirm"
            try:
                w.check_spend(amount, offer.currency)
            except Refused as r:  # too little money, over a limit, locked: before anything is signed
                await self._decline(s, conn, r.code, r.code, step)
                return
            self.screen.show("payer_confirm", amount, offer.currency, hexs(offer.payee_id[:4]))
            self.keys.clear()
            self.log("ask", "what=confirm amount=%d" % amount)
            code = await self._decide(conn)
            if code != reasons.OK:
                await self._decline(s, conn, code, reasons.DECLINED, step)
                return
            self.log("confirmed", "amount=%d" % amount)
        except Refused as r:
            self._failed(r.code, step)
            return
        except LinkError as e:
            self._failed(link_reason(e), step)
            return
        try:
            msg = s.confirm(amount)  # debit stored, payment signed
        except Refused as r:  # the wallet's last checks (its state moved since the offer): nothing stored
            self._failed(r.code, "confirm")
            return
        # From here on the payment may reach the payee.
        counter = w.counter
        step = "send"
        try:
            self.screen.show("payer_working", "Sending...")
            await conn.send(msg)
            step = "receipt"
            s.read_receipt(await conn.recv(RECEIPT_MS))
        except LinkError as e:
            self._unconfirmed(amount, offer.currency, counter, link_reason(e), step)
            return
        except Refused as r:
            status = wire.decode_receipt(s.receipt).status if s.receipt else reasons.OK
            if status != reasons.OK and r.code == status:  # refused by the payee, signed: voided, money back
                self._failed(r.code, step)
            else:  # no valid receipt (reasons.RECEIPT), or the wallet could not store it: as good as none
                self._unconfirmed(amount, offer.currency, counter, r.code, step)
            return
        except Exception as e:  # the flash failed storing the receipt, say: the payment stands, unconfirmed
            self.log("error", "kind=%s step=%s" % (type(e).__name__, step))
            self._unconfirmed(amount, offer.currency, counter, reasons.RECEIPT, step)
            return
        self.log("paid", "amount=%d currency=%d payee=%s counter=%d balance=%d" % (
            amount, offer.currency, hexs(offer.payee_id), counter, w.balance))
        self.screen.show("payer_paid", amount, offer.currency, w.balance)

    def _unconfirmed(self, amount, currency, counter, code, step):
        self.log("unconfirmed", "amount=%d counter=%d %s step=%s balance=%d" % (
            amount, counter, why(code), step, self.wallet.balance))
        self.screen.show("payer_unconfirmed", amount, currency)

    async def _decide(self, conn):
        # reasons.OK on CONFIRM; DECLINED on DOWN; TIMEOUT; LINK if the payee went away meanwhile.
        t0 = ticks_ms()
        while True:
            left = CONFIRM_MS - ticks_diff(ticks_ms(), t0)
            name, event = await self.keys.next(max(0, left), conn)
            if name == "confirm":
                return reasons.OK if not conn.closed else reasons.LINK
            if name == "down":
                return reasons.DECLINED
            if event == "timeout":
                return reasons.TIMEOUT
            if event == "closed":
                return reasons.LINK

    async def _enter_amount(self, currency, conn):
        # (amount, None) once entered, or (None, reason): cancelled, timed out, link gone.
        e = AmountEntry()
        self.keys.clear()
        self.log("ask", "what=amount")
        t0 = ticks_ms()
        while True:
            self.screen.show("payer_amount", e.digits, currency)
            left = AMOUNT_MS - ticks_diff(ticks_ms(), t0)
            name, event = await self.keys.next(max(0, left), conn)
            if name is None:
                return None, reasons.TIMEOUT if event == "timeout" else reasons.LINK
            done = e.key(name, event)
            if done == "done":
                return e.amount(), None
            if done == "cancel":
                return None, reasons.DECLINED
