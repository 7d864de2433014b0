# The firmware's sync client (docs/protocol.md section 10, "Sealed exchange"), independent of the transport.
#
# Each exchange is one whole Noise NK handshake to the backend's static X25519 key (store/backend.kx): message 1
# carries the device's request (a signed updates request and, when it has records to report, a batch of ledger
# records since the backend's last acknowledgement with the signed sync head), message 2 the backend's answer
# (the upload's outcome and the backend-signed updates). A relay carries the two messages and learns their sizes
# and timing; it can drop, replay or damage them, and the device then simply asks again.
#
# Transports call two operations:
#   request() -> bytes or None   the next message 1, or None when the device has nothing more to say
#   answer(msg2)                 the backend's message 2 for the last request
# and sync_over(post) runs the exchanges where the device can POST itself (post(msg1) -> msg2).
#
# Updates are applied through the wallet (wallet_sync.apply_update: backend-signed, for this device, exactly
# once), the status cursor is kept in flash beside the ledger, and the ledger is compacted behind each new
# acknowledgement. Imported only to sync: never in RAM while paying.
import os

from micropython import const

from paytoken import noise, syncwire, wallet_sync
from paytoken.reasons import Refused
from paytoken.wallet import DONE, K_RCVD, K_RESULT, K_SENT, K_VOUCHER, RECEIVED, SENT

BATCH = const(4)  # records per exchange: at most about 2 KB of message 1, which RAM holds about four times over
# while it is sealed (tests/test_sync.py measures the heap; docs/protocol.md section 10)
ROUNDS = const(32)  # exchanges one sync_over runs at most
KEEP = const(8)  # payments compaction leaves in the ledger, for the screen's recent statuses
_UPLOADED = (K_SENT, K_RESULT, K_RCVD, K_VOUCHER)  # records the backend needs (acks and statuses are its own)
_OK = const(200)

# What the screen says of a payment, from the wallet's history state.
_SCREEN = {SENT: "unconfirmed", DONE: "pending", RECEIVED: "pending"}


class SyncError(Exception):
    # final: the backend refused (the client is finished; the reason says why); otherwise the answer was lost
    # or damaged on the way, and the next request() tries again.
    def __init__(self, why, final=False):
        super().__init__(why)
        self.final = final


class SyncClient:
    def __init__(self, wallet, backend_kx, batch=BATCH):
        if backend_kx is None:
            raise SyncError("no backend sync key on this device: provision store/backend.kx", True)
        if len(backend_kx) != 32:
            raise SyncError("backend sync key: not 32 bytes", True)
        self.wallet = wallet
        self._kx = bytes(backend_kx)
        self._batch = max(1, min(batch, syncwire.MAX_RECORDS))
        self._path = wallet.ledger.path + ".cursor"
        self.cursor = _read_cursor(self._path)
        self._hs = None  # the handshake of the request waiting for its answer
        self._asked_updates = True  # more updates to fetch (the backend said so, or not asked yet)
        self.finished = False
        self.error = None  # the backend's reason, once it refused
        self.exchanges = 0  # answers taken
        self.applied = 0  # updates that changed the wallet
        self.uploaded = 0  # records the backend took in this client's exchanges (new or already held)
        self._n = 0  # records in the request waiting for its answer
        self.wake = None  # the backend's wake token for this device, once it answered an updates request

    def wake_hint(self):
        # (wake token, status cursor) for a relay that stays connected and waits on GET /v1/wake/{token}?since=
        # for this device's next news (the other device's upload settled its payment), or None before an answer.
        # The relay learns a token that names this device to the backend and nothing else.
        if self.wake is None or self.wake == bytes(16):
            return None
        return self.wake, self.cursor

    def pending(self):
        # (base, upto): the ledger records base+1..upto that the next upload carries, from the backend's last
        # acknowledgement, at most the batch size, but a payment never without the receipt right after it (the
        # backend settles a payment when the receipt arrives with it). base == upto: nothing to upload, the
        # records after the acknowledgement are only the backend's own acknowledgements and statuses.
        w = self.wallet
        base = upto = max(w.acked_seq, w.ledger.base_seq)
        found = False
        prev = 0
        records = w.ledger.records(base + 1)
        try:
            for seq, payload in records:
                kind = payload[0]
                found = found or kind in _UPLOADED
                if upto == seq - 1 and (seq - base <= self._batch or (kind == K_RESULT and prev == K_SENT)):
                    upto = seq
                elif found:
                    break
                prev = kind
        finally:
            records.close()
        return base, upto if found else base

    def request(self):
        if self.finished:
            return None
        w = self.wallet
        if w.locked:
            raise SyncError("ledger damaged: %s" % w.ledger.corrupt, True)
        base, upto = self.pending()
        if upto == base and not self._asked_updates:
            self.finished = True
            return None
        self._hs = None
        hs = noise.HandshakeState("NK", True, syncwire.PROLOGUE, rs=self._kx)
        ureq = w.sign(syncwire.updates_request_body(w.device_id, self.cursor, w.trust.revocation_version,
                                                    w.trust.now or 0, hs.ephemeral_public()[:16]))
        head = None
        records = []
        if upto > base:
            for _, payload, payment, receipt in wallet_sync.signed_records(w, base + 1, upto):
                records.append((bytes(payload), payment, receipt))
            head = w.sign(syncwire.sync_head_body(w.device_id, base, w.ledger.hash_at(base), upto,
                                                  w.ledger.hash_at(upto)))
        plain = b"".join(syncwire.request_parts(ureq, head, records))
        records = None  # the parts go before the message is encrypted: RAM holds the plaintext and its sealing
        msg = hs.write_message(plain)
        self._hs = hs
        self._n = upto - base
        return msg

    def answer(self, msg):
        # Takes the backend's message 2: returns the number of updates that changed the wallet. SyncError if the
        # message is not the answer to the last request (final=False: ask again) or the backend refused (final).
        hs = self._hs
        if hs is None:
            raise SyncError("no request is waiting for an answer")
        self._hs = None  # one try: a damaged or replayed answer costs this exchange, nothing else
        try:
            up, _, ust, cursor, more, error, updates, wake = syncwire.decode_answer(hs.read_message(msg))
        except ValueError as e:  # NoiseError, WireError: not the backend's answer to this request
            raise SyncError("answer refused: %s" % e)
        self.exchanges += 1
        if ust not in (0, _OK):
            self._refused(ust, error)
        if up == _OK:
            self.uploaded += self._n
        w = self.wallet
        acked = w.acked_seq
        applied = 0
        for raw in updates:
            try:
                if w.apply_update(raw):
                    applied += 1
            except Refused as e:
                self.finished = True
                self.error = "update refused: %s" % e
                raise SyncError(self.error, True)
        self.applied += applied
        if cursor != self.cursor:
            _write_cursor(self._path, cursor)
            self.cursor = cursor
        self._asked_updates = more
        self.wake = wake
        if w.acked_seq != acked:
            w.compact(KEEP)
        elif up not in (0, _OK):
            # Refused, and no newer acknowledgement to start from (a 409 stale or gap comes with one: the backend
            # holds more than the device knew, and the next request starts there): the same records would be refused
            # again.
            self._refused(up, error)
        return applied

    def _refused(self, status, error):
        self.finished = True
        self.error = "backend refused (%d): %s" % (status, error)
        raise SyncError(self.error, True)

    def sync_over(self, post, rounds=ROUNDS):
        # Runs exchanges until the device has nothing more to say: post(msg1) -> msg2 is the transport (HTTP
        # from the device itself). A lost or damaged answer is asked again; True when done, False if `rounds`
        # exchanges did not finish it. SyncError (final) if the backend refused.
        for _ in range(rounds):
            msg = self.request()
            if msg is None:
                return True
            try:
                self.answer(post(msg))
            except OSError:
                self._hs = None  # the transport failed: nothing was applied, try again
            except SyncError as e:
                if e.final:
                    raise
        return self.request() is None


def counts(wallet):
    # "pending 1, settled 2": the newest payments (syncwire.SUMMARY_ROWS of them) counted by status, for the
    # screen after a sync over any transport; "no payments" without any
    n = {}
    for _, _, _, status in statuses(wallet, syncwire.SUMMARY_ROWS):
        n[status] = n.get(status, 0) + 1
    return ", ".join("%s %d" % kv for kv in sorted(n.items())) or "no payments"


def summary(wallet, client=None):
    # The status summary a relay reads, over USB or BLE alike (syncwire.status_summary): the client's wake hint,
    # once it has one, and the newest payments' statuses
    hint = client.wake_hint() if client is not None else None
    return syncwire.status_summary(hint, statuses(wallet, syncwire.SUMMARY_ROWS))


def field(text):
    # A screen text as one field of an event line: "pending_1+settled_2"
    return text.replace(", ", "+").replace(" ", "_")


def statuses(wallet, limit=4):
    # The device's newest payments for the screen, oldest first: (role, txid, amount, status), status one of
    # "unconfirmed" (sent, no receipt: the backend resolves it), "pending" (complete, not yet settled),
    # "settled", "refunded", "voided", "refused", "rejected".
    return [(role, txid, amount, _SCREEN.get(state, state)) for role, txid, amount, state in wallet.history(limit)]


def _read_cursor(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError:
        return 0
    return int.from_bytes(raw, "big") if len(raw) == 4 else 0  # damaged: from 0, updates apply only once


def _write_cursor(path, cursor):
    tmp = path + ".new"
    with open(tmp, "wb") as f:
        f.write(cursor.to_bytes(4, "big"))
    os.rename(tmp, path)
