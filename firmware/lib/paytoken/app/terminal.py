# The payee terminal: one QR, one payer, one PayeeSession at a time, for ever.
#
#   t = Terminal(wallet, trust, static_priv, static_pub, transport, screen, log, amount=None, qr_amount=False)
#   await t.run(sessions=None)     serves payers until `sessions` were served (None: for ever); never raises
#                                  (cancelling the task stops it)
#
# transport (paytoken.ble on a device, a fake in tests) is duck-typed:
#   transport.address() -> (addr_type, addr6)     what the QR tells the payer (addr_type 1: random address)
#   transport.start(nonce)                        advertise for this QR; at most one payer is accepted
#   await transport.accept(timeout_ms) -> link    the payer's link (paytoken.link interface), or
#                                                 LinkError(TIMEOUT); until stop() other payers get BUSY
#   transport.stop()                              stop advertising and drop anyone not yet accepted
#
# Every sale: a fresh 8-byte nonce, the QR (with the amount in it only if qr_amount: a version-4 QR needs a
# large display), accept one payer, read_hello -> send -> read_payment -> send the receipt. The nonce is
# used once: after every session (paid, refused, dropped) and after QR_MS without a payer, a new QR.
#
# Holding CONFIRM while the QR waits enters sync mode over BLE (paytoken.app.syncble); then a new QR.
#
# Link drops: PayeeSession stores the credit (or the signed refusal) before the receipt is sent. If the link
# fails after that, the payment stays credited and the receipt is lost: the payer keeps its payment as
# sent-unconfirmed and the backend settles it from our upload. Before that point nothing was stored.
import asyncio
from time import ticks_add, ticks_diff, ticks_ms

from paytoken import base45, link, reasons, wire
from paytoken.app.io import hexs, link_reason, why
from paytoken.crypto import rand
from paytoken.link import LinkError
from paytoken.payee import PayeeSession
from paytoken.reasons import Refused
from paytoken.session import DONE, FAILED

QR_MS = 120_000  # a QR nobody connected to is replaced by a new one (new nonce) after this long
HELLO_MS = 10_000  # from the connection to the payer's first message
DECIDE_MS = 100_000  # from our answer to the payer's payment: the person enters and confirms the amount
#                      (longer than the card's AMOUNT_MS + CONFIRM_MS, so the card gives up first)
RESULT_MS = 5_000  # the outcome stays on the screen this long before the next QR
PAUSE_MS = 2_000  # after an unexpected error or a failed radio, before trying again
LOCKED_MS = 60_000  # a locked wallet (damaged ledger) looks again this often
KEYS_MS = 250  # the buttons are looked at this often while the QR waits for a payer
SYNC_KEY = ("confirm", "long")  # while the QR waits: sync mode over BLE (paytoken.app.syncble)

class Terminal:
    def __init__(self, wallet, trust, static_priv, static_pub, transport, screen, log, amount=None,
                 qr_amount=False, keys=None, backend_kx=None, name="payee"):
        self.wallet = wallet
        self.keys = keys  # app.io.Keys, or None: no buttons (no sync mode)
        self.backend_kx = backend_kx  # the backend's sync key (store/backend.kx), for sync mode
        self.name = name
        self.trust = trust
        self.static_priv = static_priv
        self.static_pub = static_pub
        self.transport = transport
        self.screen = screen
        self.log = log
        self.amount = amount  # requested per sale in minor units; None: the payer enters it
        self.qr_amount = qr_amount
        self.served = 0
        self.busy = False  # a payer connected: the USB watcher answers a sync relay E_BUSY

    async def run(self, sessions=None):
        self.log("start", "id=%s balance=%d currency=%d" % (hexs(self.wallet.device_id), self.wallet.balance,
                                                            self.wallet.cert.currency))
        while sessions is None or self.served < sessions:
            try:
                await self.sale()
            except Exception as e:  # nothing escapes the loop: log, show, carry on
                self._stop()
                self.log("error", "kind=%s" % type(e).__name__)
                self.screen.show("payee_error", reasons.ERROR)
                await asyncio.sleep_ms(PAUSE_MS)

    def _stop(self):
        try:
            self.transport.stop()
        except Exception as e:
            self.log("error", "kind=%s step=stop" % type(e).__name__)

    async def sale(self):
        w = self.wallet
        if w.locked:
            self.log("failed", why(reasons.LOCKED) + " step=start")
            self.screen.show("payee_error", reasons.LOCKED)
            await asyncio.sleep_ms(LOCKED_MS)
            return
        amount = self.amount
        currency = w.cert.currency
        nonce = rand.random_bytes(wire.NONCE_LEN)
        addr_type, addr = self.transport.address()
        in_qr = amount if self.qr_amount else None
        qr_raw = wire.qr_payload(w.device_id[:wire.WALLET_SHORT_LEN], addr, addr_type == 1, self.static_pub, nonce,
                                 in_qr, currency if in_qr is not None else None)
        text = base45.encode(qr_raw)
        if amount is None:
            self.screen.show("payee_qr", text)
        else:
            self.screen.show("payee_qr", text, amount, currency)
        if self.keys is not None:
            self.keys.clear()  # before "qr": a press from then on counts
        self.log("qr", "nonce=%s amount=%d qr=%s" % (hexs(nonce), amount or 0, hexs(qr_raw)))
        self.transport.start(nonce)
        try:
            conn = await self._accept()
        except LinkError as e:
            self._stop()
            if e.reason == link.TIMEOUT:
                self.log("expired", "nonce=%s" % hexs(nonce))
            else:
                self.log("failed", why(link_reason(e)) + " step=accept")
                self.screen.show("payee_error", link_reason(e))
                await asyncio.sleep_ms(PAUSE_MS)
            return
        self.served += 1
        self.busy = True
        try:
            await self.serve(conn, qr_raw, amount)
        finally:
            self.busy = False
            conn.close()
            self._stop()
        await asyncio.sleep_ms(RESULT_MS)

    async def _accept(self):
        # The payer's link (transport.accept); with buttons, watched in steps of KEYS_MS: holding CONFIRM enters
        # sync mode over BLE (paytoken.app.syncble, loaded only now), then LinkError(TIMEOUT) gives a new QR.
        keys = self.keys
        if keys is None:
            return await self.transport.accept(QR_MS)
        deadline = ticks_add(ticks_ms(), QR_MS)
        while True:
            left = ticks_diff(deadline, ticks_ms())
            try:
                return await self.transport.accept(max(1, min(left, KEYS_MS)))
            except LinkError as e:
                if e.reason != link.TIMEOUT or left <= KEYS_MS:
                    raise
            if keys.get() == SYNC_KEY:
                self._stop()
                from paytoken.app import syncble

                await syncble.run(self.wallet, self.backend_kx, self.name, self.screen, self.log, keys,
                                  self.transport.register)
                await keys.next(RESULT_MS)
                raise LinkError(link.TIMEOUT, "sync mode")

    async def serve(self, conn, qr_raw, amount):
        # One payer on one link; shows and logs the outcome. Refusals and link errors end here.
        w = self.wallet
        currency = w.cert.currency
        s = PayeeSession(w, self.trust, self.static_priv, self.static_pub, qr_raw, amount)
        self.log("connected", "nonce=%s" % hexs(s.qr.nonce))
        self.screen.show("payee_waiting", amount, currency)
        step = "hello"
        receipt = "sent"
        try:
            reply = s.read_hello(await conn.recv(HELLO_MS))
            await conn.send(reply)
            if s.state != FAILED:
                step = "payment"
                reply = s.read_payment(await conn.recv(DECIDE_MS))
                if reply is not None:
                    step = "receipt"
                    try:
                        await conn.send(reply)
                    except LinkError:
                        receipt = "lost"  # stored before it was sent: the credit (or refusal) stands
        except Refused as r:
            s.reason = r.code  # a message that failed its checks: the session ends without an answer
        except LinkError as e:
            if s.receipt is None:
                s.state = FAILED
                s.reason = link_reason(e)
        if s.state == DONE:
            p = wire.decode_payment(s.payment)
            self.log("paid", "amount=%d currency=%d payer=%s counter=%d seq=%d balance=%d receipt=%s" % (
                p.amount, p.currency, hexs(p.payer_id), p.counter, w.seq, w.balance, receipt))
            self.screen.show("payee_paid", p.amount, p.currency)
        else:
            extra = ""
            if s.receipt is not None:
                extra = " refusal=%s" % receipt  # refused with a signed receipt, stored in the ledger
            self.log("failed", "%s step=%s%s" % (why(s.reason), step, extra))
            self.screen.show("payee_error", s.reason)
