"""The backend's operations, independent of HTTP: the API (api.py) and the CLI (cli.py) call these."""

from __future__ import annotations

import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ec
from sqlalchemy import Engine, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from paytoken import revocation, wire
from paytoken_host import protocol
from paytoken_host.backend import db, journal, outbox, sealed
from paytoken_host.backend import formats as F
from paytoken_host.backend.keys import noise_static
from paytoken_host.backend.settle import DAY, Settlement, lock_devices, register_cert, rows_where_any
from paytoken_host.backend.verify import Reject, check_cert, verify_batch

ISSUER_SETTING = "issuer_pub"
STATUS_LEN = len(wire.status_body(bytes(wire.ID_LEN), bytes(wire.TXID_LEN), wire.ST_SETTLED, 0)) + wire.SIG_LEN
VOUCHER_LEN = len(wire.voucher_body(bytes(wire.ID_LEN), 1, 1, 840, 0)) + wire.SIG_LEN
STATUS_PAGE = 1000
# the upload rate's count on PostgreSQL, as one statement (Backend.check_rate)
_PG_COUNT_UPLOAD = ('INSERT INTO rate_limits (key, "window", count) VALUES (%s, %s, 1) ON CONFLICT (key, "window") '
                    'DO UPDATE SET count = rate_limits.count + 1 RETURNING count')


class Backend:
    def __init__(self, engine: Engine, backend_key: ec.EllipticCurvePrivateKey | None, expiry: int = 30 * DAY,
                 clock: Callable[[], float] = time.time, upload_rate: int = 6000,
                 commit_hook: Callable[[], None] | None = None):
        self.engine = engine
        self.key = backend_key
        self.backend_pub = protocol.sec1(backend_key.public_key()) if backend_key else b""
        self.noise_priv, self.noise_pub = noise_static(backend_key) if backend_key else (b"", b"")
        self.wake_key = sealed.wake_key(self.noise_priv) if backend_key else b""  # GET /v1/wake tokens
        self.clock = clock
        self.upload_rate = upload_rate  # uploads per minute per client address
        self.settlement = Settlement(engine, expiry=expiry, clock=clock, commit_hook=commit_hook)
        self._issuer_pub: bytes | None = None
        self._certs: dict[bytes, wire.Certificate] = {}  # immutable once registered: a cache, not state

    def now(self) -> int:
        return int(self.clock())

    @property
    def issuer_pub(self) -> bytes:
        if self._issuer_pub is None:
            with db.read_tx(self.engine) as conn:
                value = db.get_setting(conn, ISSUER_SETTING)
            if not value:
                raise Reject(503, "backend not initialised: run paytoken-backend init --issuer-pub FILE")
            self._issuer_pub = bytes.fromhex(value)
        return self._issuer_pub

    def prefetch_certs(self, ids: set[bytes]) -> None:
        """Loads the certificates of many devices in one query (an upload names up to hundreds)."""
        missing = sorted(i for i in ids if i not in self._certs)
        if not missing:
            return
        with db.read_tx(self.engine) as conn:
            for i in range(0, len(missing), 900):
                for r in rows_where_any(conn, db.devices, "device_id", missing[i:i + 900],
                                        columns=("device_id", "cert")):
                    self._certs[r["device_id"]] = wire.decode_cert(r["cert"])

    def cert_of(self, device_id: bytes) -> wire.Certificate | None:
        cert = self._certs.get(device_id)
        if cert is None:
            with db.read_tx(self.engine) as conn:
                raw = conn.execute(select(db.devices.c.cert).where(db.devices.c.device_id == device_id)).scalar()
            if raw is None:
                return None
            cert = self._certs[device_id] = wire.decode_cert(raw)
        return cert

    # ---- operators ----
    def register(self, cert_raw: bytes) -> dict:
        cert = check_cert(cert_raw, self.issuer_pub)
        now = self.now()
        if now > cert.not_after:
            raise Reject(422, f"certificate expired at {cert.not_after}")
        with db.write_tx(self.engine) as conn:
            try:
                created = register_cert(conn, cert, now)
            except IntegrityError:
                created = False
        return {"device_id": cert.device_id.hex(), "created": created, "role": cert.role}

    def revoke(self, device_id: bytes, reason: str) -> dict:
        changed = self.settlement.revoke(device_id, reason)
        return {"device_id": device_id.hex(), "revoked": True, "changed": changed}

    def issue_voucher(self, device_id: bytes, amount: int, idempotency_key: str | None = None) -> dict:
        """A top-up: moves `amount` from the bank into the device's offline balance, as a backend-signed voucher
        (counter n+1 for the device). The same idempotency key returns the same voucher."""
        V = db.vouchers
        now = self.now()
        with db.write_tx(self.engine) as conn:
            if idempotency_key:
                row = conn.execute(select(V).where(V.c.idempotency_key == idempotency_key)).first()
                if row is not None:
                    if row.device_id != device_id or row.amount != amount:
                        raise Reject(409, "idempotency key already used for another voucher")
                    return {"voucher": row.raw.hex(), "counter": row.counter, "created": False}
            devs = lock_devices(conn, {device_id})
            dev = devs.get(device_id)
            if dev is None:
                raise Reject(404, "unknown device")
            if dev["revoked_at"] is not None:
                raise Reject(409, "device is revoked")
            cert = wire.decode_cert(dev["cert"])
            if not cert.role & wire.ROLE_PAYER:
                raise Reject(422, "device is not a payer")
            if not 0 < amount < 2**32:
                raise Reject(422, "amount must be positive")
            if journal.balance(conn, journal.offline(device_id)) + amount > cert.max_holding:
                raise Reject(422, f"the device would hold more than its maximum {cert.max_holding}")
            counter = dev["vouchers_issued"] + 1
            raw = protocol.sign(self.key, wire.voucher_body(device_id, counter, amount, cert.currency, now))
            conn.execute(insert(V).values(device_id=device_id, counter=counter, amount=amount, raw=raw, issued_at=now,
                                          idempotency_key=idempotency_key))
            conn.execute(update(db.devices).where(db.devices.c.device_id == device_id)
                         .values(vouchers_issued=counter))
            entry = journal.post(conn, "topup", f"voucher:{device_id.hex()}:{counter}",
                                 {journal.BANK: -amount, journal.offline(device_id): amount}, now)
            outbox.enqueue(conn, f"voucher:{device_id.hex()}:{counter}", "topup", {
                "device": device_id.hex(), "counter": counter, "amount": amount, "currency": cert.currency,
                "journal_entry": entry}, now)
        return {"voucher": raw.hex(), "counter": counter, "created": True}

    # ---- devices and relays ----
    def check_rate(self, client: str) -> None:
        """Counts an upload from this address in the current minute (one upsert, shared by all workers)."""
        now = self.now()
        R = db.rate_limits
        window = now // 60
        pg = self.engine.dialect.name == "postgresql"
        # on PostgreSQL one statement on its own (no transaction to open and close around it); SQLite's writer lock
        with (db.autocommit if pg else db.write_tx)(self.engine) as conn:
            if pg:
                n = db.pg_rows(conn, _PG_COUNT_UPLOAD, [client, window])[0]["count"]
            else:
                n = conn.execute(db.upsert(conn, R).values(key=client, window=window, count=1).on_conflict_do_update(
                    index_elements=[R.c.key, R.c.window], set_={"count": R.c.count + 1}).returning(R.c.count)).scalar()
            if n == 1:
                conn.execute(R.delete().where((R.c.key == client) & (R.c.window < window - 1)))
        if n > self.upload_rate:
            raise Reject(429, f"rate limit: at most {self.upload_rate} uploads a minute from one address")

    def upload(self, body: bytes) -> tuple[int, dict]:
        try:
            batch = F.parse_batch(body)
        except F.BatchError as e:
            raise Reject(400, str(e)) from None
        return self.upload_batch(batch)

    def upload_batch(self, batch: F.Batch) -> tuple[int, dict]:
        self.prefetch_certs({batch.device_id} | F.counterparties(batch))
        v = verify_batch(batch, self.cert_of, self.issuer_pub, self.backend_pub)
        status, result = self.settlement.apply(v)
        synced = result.pop("_synced", None)  # (seq, chain hash) the device's records are held up to
        if synced and synced[0] > 0:
            result["ack"] = self._ack({"device_id": batch.device_id, "synced_seq": synced[0],
                                       "synced_hash": synced[1]}).hex()
        return status, result

    def _ack(self, dev: dict) -> bytes:
        return protocol.sign(self.key, wire.ack_body(dev["device_id"], dev["synced_seq"], dev["synced_hash"],
                                                     self.now()))

    def revocation_delta(self, conn, rl_version: int, budget: int | None = None) -> tuple[bytes | None, bool]:
        """(the signed delta of the revocations after version rl_version, oldest first, or None; more remain): at most
        revocation.MAX_DELTA ids and, with `budget`, at most that many bytes with its 2 bytes of length. A device
        that claims a version ahead of ours (only a tampered one could) finds no rows after it and gets nothing."""
        most = revocation.MAX_DELTA
        if budget is not None:
            most = min(most, (budget - 2 - revocation.delta_length(0)) // wire.ID_LEN)
        R = db.revocations
        rows = conn.execute(select(R.c.id, R.c.device_id).where(R.c.id > rl_version).order_by(R.c.id)
                            .limit(max(most, 0) + 1)).all()
        if most < 1 or not rows:
            return None, bool(rows)
        more = len(rows) > most
        rows = rows[:most]
        return protocol.revocation_delta(self.key, rl_version, rows[-1].id, self.now(),
                                         [r.device_id for r in rows]), more

    def updates(self, authorization: str | None, device_id: bytes, since: int, rl_version: int = 0) -> dict:
        """A device's backend-signed updates: the revocation delta after its list version `rl_version`, the
        acknowledgement, vouchers it has not applied, statuses of its payments after cursor `since`."""
        from paytoken_host.backend import auth

        now = self.now()
        with db.write_tx(self.engine) as conn:
            auth.device_request(conn, authorization, device_id, since, self.cert_of, now, rl_version)
            out, cursor, more = self.device_updates(conn, device_id, since, now, rl_version=rl_version)
        return {"device_id": device_id.hex(), "time": now, "cursor": cursor, "more": more,
                "updates": [u.hex() for u in out]}

    def device_updates(self, conn, device_id: bytes, since: int, now: int, page: int = STATUS_PAGE,
                       vouchers: int | None = None, budget: int | None = None,
                       rl_version: int = 0) -> tuple[list[bytes], int, bool]:
        """(updates in the order to apply them, the new status cursor, more to come): the revocation delta after
        `rl_version`, the acknowledgement, at most `vouchers` vouchers (None: all) and `page` statuses, and with
        `budget` at most that many bytes of updates (2 bytes of length each); `more` when anything was cut short."""
        P, C = db.payments, db.conflicts
        dev = dict(conn.execute(select(db.devices).where(db.devices.c.device_id == device_id)).first()._mapping)
        out = [self._ack(dev)] if dev["synced_seq"] > 0 else []
        # The delta before everything but the acknowledgement: revocations are what a device must not go without.
        rl, more = self.revocation_delta(conn, rl_version,
                                         None if budget is None else budget - sum(len(u) + 2 for u in out))
        if rl:
            out.insert(0, rl)
        if budget is not None:  # what fits the device's largest message: vouchers first, then statuses
            left = budget - sum(len(u) + 2 for u in out)
            vouchers = max(0, min(vouchers if vouchers is not None else left, left // (VOUCHER_LEN + 2)))
            page = max(0, min(page, (left - vouchers * (VOUCHER_LEN + 2)) // (STATUS_LEN + 2)))
        q = select(db.vouchers.c.raw).where(
            (db.vouchers.c.device_id == device_id) & (db.vouchers.c.counter > dev["vouchers_seen"])
        ).order_by(db.vouchers.c.counter)
        raws = [raw for (raw,) in conn.execute(q if vouchers is None else q.limit(vouchers + 1))]
        more = more or (vouchers is not None and len(raws) > vouchers)
        out += raws[:vouchers]
        found = []
        for txid, st, upd in conn.execute(select(P.c.txid, P.c.payer_status, P.c.payer_upd).where(
                (P.c.payer_id == device_id) & (P.c.payer_upd > since)).order_by(P.c.payer_upd).limit(page + 1)):
            found.append((upd, txid, st))
        for txid, st, upd in conn.execute(select(P.c.txid, P.c.payee_status, P.c.payee_upd).where(
                (P.c.payee_id == device_id) & (P.c.payee_upd > since)).order_by(P.c.payee_upd).limit(page + 1)):
            found.append((upd, txid, st))
        for txid, upd in conn.execute(select(C.c.txid, C.c.payee_upd).where(
                (C.c.payee_id == device_id) & (C.c.payee_upd > since)).order_by(C.c.payee_upd).limit(page + 1)):
            found.append((upd, txid, wire.ST_REJECTED))
        found.sort()
        more = more or len(found) > page
        found = found[:page]
        cursor = found[-1][0] if found else since
        for _, txid, st in found:
            out.append(protocol.sign(self.key, wire.status_body(device_id, txid, st, now)))
        return out, cursor, more

    def news_since(self, device_id: bytes, since: int) -> int | None:
        """The device's status cursor if it has news after cursor `since` (a status set, or a voucher it has not yet
        shown in an upload), else None."""
        D = db.devices
        with db.read_tx(self.engine) as conn:
            row = conn.execute(select(D.c.update_seq, D.c.vouchers_issued, D.c.vouchers_seen)
                               .where(D.c.device_id == device_id)).first()
        if row is None or (row.update_seq <= since and row.vouchers_issued <= row.vouchers_seen):
            return None
        return row.update_seq

    def sync(self, msg1: bytes) -> bytes:
        """One sealed sync exchange (docs/protocol.md section 10): message 1 in, message 2 out."""
        return sealed.exchange(self, msg1)

    # ---- reading ----
    def keys(self) -> dict:
        """The public keys a provisioning station installs on a device (hex): the issuer's, the backend's signing
        key and its X25519 key for the sync session."""
        if not self.backend_pub:
            raise Reject(503, "backend has no key")
        return {"issuer": self.issuer_pub.hex(), "backend": self.backend_pub.hex(), "backend_kx": self.noise_pub.hex()}

    def devices(self) -> list[dict]:
        D = db.devices
        with db.read_tx(self.engine) as conn:
            rows = conn.execute(select(D).order_by(D.c.registered_at, D.c.device_id)).all()
            balances = dict(conn.execute(select(db.accounts.c.name, db.accounts.c.balance)).all())
        return [{"device_id": r.device_id.hex(), "role": r.role, "currency": r.currency,
                 "registered_at": r.registered_at, "revoked_at": r.revoked_at, "revoke_reason": r.revoke_reason,
                 "synced_seq": r.synced_seq, "payer_counter": r.payer_counter,
                 "offline_balance": balances.get(journal.offline(r.device_id), 0),
                 "merchant_balance": balances.get(journal.merchant(r.device_id), 0)} for r in rows]

    def balances(self) -> dict:
        with db.read_tx(self.engine) as conn:
            rows = conn.execute(select(db.accounts.c.name, db.accounts.c.balance).order_by(db.accounts.c.name)).all()
            problems = journal.check(conn)
        return {"accounts": {n: b for n, b in rows}, "balanced": not problems, "problems": problems}

    def alerts(self, limit: int = 200) -> list[dict]:
        A = db.alerts
        with db.read_tx(self.engine) as conn:
            rows = conn.execute(select(A).order_by(A.c.id.desc()).limit(limit)).all()
        return [{"id": r.id, "kind": r.kind, "device_id": r.device_id.hex() if r.device_id else None,
                 "txid": r.txid.hex() if r.txid else None, "detail": r.detail, "created_at": r.created_at}
                for r in rows]

    def payment(self, txid: bytes) -> dict:
        with db.read_tx(self.engine) as conn:
            r = conn.execute(select(db.payments).where(db.payments.c.txid == txid)).first()
        if r is None:
            raise Reject(404, "unknown payment")
        return {"txid": r.txid.hex(), "payer": r.payer_id.hex(), "payee": r.payee_id.hex(), "counter": r.counter,
                "amount": r.amount, "currency": r.currency, "state": r.state, "reason": r.reason,
                "receipt_status": r.receipt_status, "expires_at": r.expires_at, "final_at": r.final_at}

    def metrics(self) -> str:
        with db.read_tx(self.engine) as conn:
            states = conn.execute(select(db.payments.c.state, func.count()).group_by(db.payments.c.state)).all()
            n_dev = conn.execute(select(func.count()).select_from(db.devices)).scalar()
            n_rev = conn.execute(select(func.count()).select_from(db.revocations)).scalar()
            n_alert = conn.execute(select(func.count()).select_from(db.alerts)).scalar()
            n_up = conn.execute(select(func.count()).select_from(db.uploads)).scalar()
            backlog = outbox.backlog(conn)
        lines = ["# TYPE paytoken_payments gauge"]
        lines += [f'paytoken_payments{{state="{s}"}} {n}' for s, n in sorted(states)]
        lines += ["# TYPE paytoken_devices gauge", f"paytoken_devices {n_dev}",
                  "# TYPE paytoken_revoked_devices gauge", f"paytoken_revoked_devices {n_rev}",
                  "# TYPE paytoken_alerts gauge", f"paytoken_alerts {n_alert}",
                  "# TYPE paytoken_uploads gauge", f"paytoken_uploads {n_up}",
                  "# TYPE paytoken_outbox_backlog gauge", f"paytoken_outbox_backlog {backlog}"]
        return "\n".join(lines) + "\n"
