"""Settlement: applies a verified upload to the database in one transaction, exactly once.

Rules (docs/protocol.md, "Sync upload"; docs/security.md, "Settlement backend"):
- A device's records are applied in ledger order, only those after what the backend already holds; an upload
  that starts past it waits (409, gap), one that repeats it is a duplicate (200), one whose chain differs from
  what the same device signed before is a fork of the device's ledger (its key signed two histories).
- A payment is stored once per transaction id (= payer and counter). The same payment uploaded again, by the
  payer or the payee, in any order or at once, merges into the one row; a different payment with the same id,
  or one that does not chain to its neighbours, is a fork: the payer is revoked, every unsettled payment of it is
  rejected, the evidence kept and an alert raised. A value is never settled twice.
- A payment with a status-0 receipt settles once its predecessor in the payer's chain is known (gaps wait) and
  it passes the certificate's limits, amounts and currency, and the payer's offline balance covers it.
  A payment without a receipt (sent-unconfirmed) waits for the payee's upload until it expires, then it is
  refunded to the payer; the payee's credit for it afterwards is rejected.
- Concurrency: the transaction locks the device rows it touches in device-id order (SELECT ... FOR UPDATE on
  PostgreSQL; SQLite's BEGIN IMMEDIATE takes the whole database), and the payments' primary key is the last line
  of defence. Deadlocks and serialization failures are retried.
"""

from __future__ import annotations

import hashlib
import json
import operator
import random
import struct
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from sqlalchemy import Connection, Engine, insert, select, text, update
from sqlalchemy.exc import DBAPIError, IntegrityError

from paytoken import reasons, wire
from paytoken.ledger import ZERO_HASH
from paytoken_host.backend import db, journal, outbox
from paytoken_host.backend import formats as F
from paytoken_host.backend.verify import PaymentObs, Reject, Verified

DAY = 86_400
FINAL = ("settled", "voided", "refunded", "rejected")
OPEN = db.OPEN
_MUTABLE = ("receipt", "receipt_status", "payer_seq", "payer_result", "state", "reason", "expires_at", "final_at",
            "entry_id", "payer_status", "payer_upd", "payee_status", "payee_upd")
_DEVICE_STATE = ("synced_seq", "synced_hash", "payer_counter", "prev_hash", "offline_spent", "last_sent",
                 "rcvd_count", "acked_upto", "vouchers_seen", "update_seq", "revoked_at", "revoke_reason")
_device_state = operator.itemgetter(*_DEVICE_STATE)  # a device row's state, as a tuple to compare


_SPENT = struct.Struct(">I")  # payment offsets (protocol.md section 4): offline spending at 44, time at 120
_TIME = _SPENT


@lru_cache(maxsize=1 << 16)
def txid(payer_id: bytes, counter: int) -> bytes:
    return wire.txid(payer_id, counter)


def rows_where_any(conn: Connection, table, col: str, values: list, extra: str = "", lock: bool = False,
                   columns: tuple[str, ...] = ()) -> list[dict]:
    """SELECT * (or the columns named) FROM table WHERE col = ANY(values) [extra], as dicts. On PostgreSQL the
    list goes as one binary array parameter (psycopg's text arrays of bytea escape every element: slow for
    hundreds of ids)."""
    if conn.dialect.name != "postgresql":
        q = select(*(table.c[c] for c in columns)) if columns else select(table)
        q = q.where(table.c[col].in_(values))
        if extra:
            q = q.where(text(extra))
        return [dict(r._mapping) for r in conn.execute(q)]
    sql = f"SELECT {', '.join(columns) or '*'} FROM {table.name} WHERE {col} = ANY(%b) " \
          f"{('AND ' + extra) if extra else ''}"
    if lock:
        sql += f" ORDER BY {col} FOR UPDATE"
    return db.pg_rows(conn, sql, [list(values)])


def prev_hash_of(payment_raw: bytes) -> bytes:
    return payment_raw[48:80]


RETRIES = 16  # a deadlocked or serialization-failed upload runs again, this many times at most


def is_retryable(e: Exception) -> bool:
    """A deadlock or serialization failure (PostgreSQL) or a busy SQLite: the transaction can simply run again.
    Raw psycopg errors (COPY, binary arrays) carry sqlstate themselves, SQLAlchemy's wrap it in .orig."""
    code = getattr(e, "sqlstate", None) or getattr(getattr(e, "orig", None), "sqlstate", None)
    return code in ("40001", "40P01") or "database is locked" in str(e)


PG_LOCK_WITH_PAYEES = (f"SELECT * FROM devices WHERE device_id = ANY(array_cat(%b::bytea[], ARRAY(SELECT payee_id "
                       f"FROM payments WHERE payer_id = ANY(%b::bytea[]) AND {OPEN}))) ORDER BY device_id FOR UPDATE")


def lock_devices(conn: Connection, ids: set[bytes], payees_of: Sequence[bytes] = ()) -> dict[bytes, dict]:
    """The device rows, locked FOR UPDATE in device-id order (PostgreSQL; SQLite's writer holds the database):
    those of `ids` and of the payees of the open payments of the payers `payees_of` (settled here too, so locked
    in the same ordered round: a later, out-of-order lock could deadlock with another upload)."""
    if payees_of and conn.dialect.name == "postgresql":  # one statement: the payees' lookup inside the lock's
        return {r["device_id"]: r for r in db.pg_rows(conn, PG_LOCK_WITH_PAYEES, [sorted(ids), list(payees_of)])}
    if payees_of:
        ids = ids | {r["payee_id"] for r in rows_where_any(conn, db.payments, "payer_id", payees_of, OPEN,
                                                           columns=("payee_id",))}
    return {r["device_id"]: r for r in rows_where_any(conn, db.devices, "device_id", sorted(ids), lock=True)}


def revoke_device(conn: Connection, dev: dict, reason: str, now: int) -> bool:
    """Marks a locked device row revoked and lists it on the revocation list; False if it already was."""
    if dev["revoked_at"] is not None:
        return False
    dev["revoked_at"], dev["revoke_reason"] = now, reason
    exists = conn.execute(select(db.revocations.c.id).where(db.revocations.c.device_id == dev["device_id"])).first()
    if not exists:
        if conn.dialect.name == "postgresql":
            # Row ids are list versions and devices take revocations in id order, so ids must become visible in
            # that order: one revocation commits at a time (readers are not blocked).
            conn.execute(text("LOCK TABLE revocations IN SHARE ROW EXCLUSIVE MODE"))
        conn.execute(insert(db.revocations).values(device_id=dev["device_id"], revoked_at=now, reason=reason))
    conn.execute(update(db.devices).where(db.devices.c.device_id == dev["device_id"])
                 .values(revoked_at=now, revoke_reason=reason))
    return True


@dataclass
class Ctx:
    conn: Connection
    now: int
    expiry: int
    devs: dict[bytes, dict]
    certs: dict[bytes, wire.Certificate]
    rows: dict[bytes, dict] = field(default_factory=dict)
    new: set[bytes] = field(default_factory=set)
    dirty: set[bytes] = field(default_factory=set)
    deltas: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    settled: list[dict] = field(default_factory=list)
    forks: list[str] = field(default_factory=list)
    alerts: list[dict] = field(default_factory=list)
    conflicts: list[dict] = field(default_factory=list)
    balances: dict[str, int] = field(default_factory=dict)
    orig: dict[bytes, dict] = field(default_factory=dict)  # device rows as locked, to write back only changes
    txids: dict[tuple[bytes, int], bytes] = field(default_factory=dict)  # (payer, counter): the upload's own
    _names: dict[bytes, str] = field(default_factory=dict)

    def txid(self, payer_id: bytes, counter: int) -> bytes:
        """txid(payer_id, counter), known without hashing for the upload's own payments (each verified to carry
        the txid of its payer and counter), which are most of the neighbours the chain checks look up."""
        t = self.txids.get((payer_id, counter))
        return t if t is not None else txid(payer_id, counter)

    def alert(self, kind: str, detail: str, device_id: bytes | None = None, txid: bytes | None = None) -> None:
        self.alerts.append({"kind": kind, "device_id": device_id, "txid": txid, "detail": detail,
                            "created_at": self.now})

    def merchant(self, device_id: bytes) -> str:
        name = self._names.get(device_id)
        if name is None:
            name = self._names[device_id] = journal.merchant(device_id)
        return name

    def touch(self, row: dict) -> None:
        if row["txid"] not in self.new:
            self.dirty.add(row["txid"])

    def tell(self, row: dict, payer_status: int | None, payee_status: int | None) -> None:
        """Queue the backend-signed statuses the payer and payee fetch (signed when they fetch them): each party's
        status changed takes the next number of that device's update sequence."""
        if payer_status is not None and row["payer_status"] != payer_status:
            dev = self.devs[row["payer_id"]]
            dev["update_seq"] = row["payer_upd"] = dev["update_seq"] + 1
            row["payer_status"] = payer_status
        if payee_status is not None and row["payee_status"] != payee_status:
            dev = self.devs[row["payee_id"]]
            dev["update_seq"] = row["payee_upd"] = dev["update_seq"] + 1
            row["payee_status"] = payee_status
        self.touch(row)

    def finish(self, row: dict, state: str, reason: str | None, payer_status: int | None,
               payee_status: int | None) -> None:
        row["state"], row["reason"], row["final_at"] = state, reason, self.now
        self.tell(row, payer_status, payee_status)


class Settlement:
    def __init__(self, engine: Engine, expiry: int = 30 * DAY, cert_grace: int | None = None,
                 clock: Callable[[], float] = time.time, commit_hook: Callable[[], None] | None = None):
        self.engine = engine
        self.expiry = expiry
        self.cert_grace = expiry if cert_grace is None else cert_grace
        self.clock = clock
        self.commit_hook = commit_hook  # tests: runs inside the transaction just before it commits

    # ---- uploads ----
    def apply(self, v: Verified) -> tuple[int, dict]:
        """Applies a verified batch; (HTTP status, result). Raises Reject (nothing stored) for a batch refused."""
        for attempt in range(RETRIES):
            now = int(self.clock())
            try:
                with db.write_tx(self.engine) as conn:
                    status, result = self._apply(conn, v, now)
                    if self.commit_hook:
                        self.commit_hook()
                return status, result
            except Reject as r:
                if r.status == 422 and getattr(r, "alert", None):
                    self.record_alert("inconsistent", r.reason, v.batch.device_id)
                raise
            except IntegrityError:
                if attempt == RETRIES - 1:
                    raise
            except Exception as e:
                if not (isinstance(e, DBAPIError) or hasattr(e, "sqlstate")) or not is_retryable(e) \
                        or attempt == RETRIES - 1:
                    raise
            # jittered exponential backoff: uploads that deadlocked together do not collide again in step
            time.sleep(random.uniform(0, 0.005 * 2 ** min(attempt, 7)))
        raise RuntimeError("unreachable")

    def record_alert(self, kind: str, detail: str, device_id: bytes | None = None) -> None:
        with db.write_tx(self.engine) as conn:
            conn.execute(insert(db.alerts).values(kind=kind, device_id=device_id, detail=detail,
                                                  created_at=int(self.clock())))

    def _apply(self, conn: Connection, v: Verified, now: int) -> tuple[int, dict]:
        b = v.batch
        dev_id = b.device_id
        for c in v.new_certs.values():
            register_cert(conn, c, now)
        ids = {dev_id}
        for _, kind, data in v.events:
            if kind in (F.K_SENT, F.K_RCVD):
                ids.update((data.payment.payer_id, data.payment.payee_id))
        payers = sorted({d.payment.payer_id for _, k, d in v.events if k in (F.K_SENT, F.K_RCVD)})
        devs = lock_devices(conn, ids, payees_of=payers)
        me = devs[dev_id]
        if me["revoked_at"] is not None:
            raise Reject(403, f"device {dev_id.hex()} is revoked: {me['revoke_reason']}")
        if now > v.cert.not_after + self.cert_grace:
            raise Reject(403, f"device {dev_id.hex()}: certificate expired at {v.cert.not_after}")
        synced = me["synced_seq"]
        result = {"device_id": dev_id.hex(), "duplicate": False, "new_records": 0, "payments": []}
        if b.upto_seq <= synced:
            prior = conn.execute(select(db.uploads.c.chain_hash).where(
                (db.uploads.c.device_id == dev_id) & (db.uploads.c.upto_seq == b.upto_seq))).scalar()
            same = prior == b.head.chain_hash or (b.upto_seq == synced and me["synced_hash"] == b.head.chain_hash)
            if same:
                result.update(duplicate=True, synced_seq=synced, _synced=(synced, me["synced_hash"]))
                return 200, result
            if prior is not None:
                return self._ledger_fork(conn, me, b, now, result)
            raise Reject(409, f"stale: the backend holds this device's records up to seq {synced}")
        if b.base_seq > synced:
            raise Reject(409, f"gap: the backend holds this device's records up to seq {synced}; upload from there")
        at_synced = b.base_hash if synced == b.base_seq else v.chain[synced - b.base_seq - 1]
        if at_synced != me["synced_hash"]:
            return self._ledger_fork(conn, me, b, now, result)

        events = [e for e in v.events if e[0] > synced]
        ctx = Ctx(conn, now, self.expiry, devs, {})
        ctx.orig = {k: dict(d) for k, d in devs.items()}
        obs = [d for _, k, d in events if k in (F.K_SENT, F.K_RCVD)]
        self._preload(ctx, obs, me)
        self._replay_device(ctx, v, me, events, synced)
        by_payer: dict[bytes, list[dict]] = defaultdict(list)
        for r in ctx.rows.values():
            if r["state"] in ("pending", "held"):
                by_payer[r["payer_id"]].append(r)
        # the payers of this upload's payments, and of any payment it completed with a receipt record alone
        payers = {o.payment.payer_id for o in obs} | {r["payer_id"] for r in ctx.rows.values() if r["state"] == "held"}
        for payer in sorted(payers):
            self._evaluate(ctx, payer, by_payer.get(payer, []))
        self._write(ctx, v, me, events, synced)
        new_records = b.upto_seq - synced
        result.update(new_records=new_records, synced_seq=b.upto_seq, _synced=(b.upto_seq, b.head.chain_hash))
        seen = list(dict.fromkeys(o.payment.txid for o in obs))  # in ledger order
        result["payments"] = [{"txid": t.hex(), "state": ctx.rows[t]["state"], "reason": ctx.rows[t]["reason"]}
                              for t in seen]
        result["settled"] = len(ctx.settled)
        if ctx.forks:
            result["forks"] = ctx.forks
            return 409, result
        return 200, result

    def _ledger_fork(self, conn: Connection, me: dict, b: F.Batch, now: int, result: dict) -> tuple[int, dict]:
        reason = (f"fork: device {me['device_id'].hex()} signed a ledger that differs from the one it uploaded "
                  f"before (cloned or rolled back)")
        ctx = Ctx(conn, now, self.expiry, {me["device_id"]: me}, {})
        P = db.payments
        for r in conn.execute(select(P).where((P.c.payer_id == me["device_id"]) & P.c.state.in_(("pending", "held")))):
            ctx.rows[r.txid] = dict(r._mapping)
        others = {r["payee_id"] for r in ctx.rows.values()} - {me["device_id"]}
        if others:
            ctx.devs.update(lock_devices(conn, others))
        self._fork(ctx, me["device_id"], reason, None)
        self._write_rows(ctx)
        for dev in ctx.devs.values():
            conn.execute(update(db.devices).where(db.devices.c.device_id == dev["device_id"])
                         .values(update_seq=dev["update_seq"]))
        self._write_side(ctx)
        result["forks"] = [reason]
        return 409, result

    def _preload(self, ctx: Ctx, obs: list[PaymentObs], me: dict) -> None:
        conn = ctx.conn
        want = set()
        ctx.txids = {(o.payment.payer_id, o.payment.counter): o.payment.txid for o in obs}
        for o in obs:
            p = o.payment
            want.add(p.txid)
            want.add(ctx.txid(p.payer_id, p.counter + 1))
            if p.counter > 1:
                want.add(ctx.txid(p.payer_id, p.counter - 1))
        if me["last_sent"] is not None:
            want.add(me["last_sent"])
        P = db.payments
        want_l = sorted(want)
        payers = sorted({o.payment.payer_id for o in obs})
        if conn.dialect.name == "postgresql":  # both lookups in one statement (a payment may come twice: same row)
            for r in db.pg_rows(conn, f"SELECT * FROM payments WHERE txid = ANY(%b) UNION ALL SELECT * FROM payments "
                                      f"WHERE payer_id = ANY(%b) AND {OPEN}", [want_l, payers]):
                ctx.rows.setdefault(r["txid"], r)
        else:
            for i in range(0, len(want_l), 900):  # SQLite's limit on a statement's parameters
                for r in rows_where_any(conn, P, "txid", want_l[i:i + 900]):
                    ctx.rows[r["txid"]] = r
            if payers:
                for r in rows_where_any(conn, P, "payer_id", payers, OPEN):
                    ctx.rows.setdefault(r["txid"], r)
        extra = {r["payee_id"] for r in ctx.rows.values()} | {r["payer_id"] for r in ctx.rows.values()}
        extra -= set(ctx.devs)
        if extra:
            more = lock_devices(conn, extra)
            ctx.devs.update(more)
            ctx.orig.update({k: dict(d) for k, d in more.items()})
        # certificates of everyone involved, for the limits
        for dev in ctx.devs.values():
            ctx.certs[dev["device_id"]] = wire.decode_cert(dev["cert"])

    # ---- the uploading device's own records, in ledger order ----
    def _replay_device(self, ctx: Ctx, v: Verified, me: dict, events: list, synced: int) -> None:
        dev_id = me["device_id"]
        cert = v.cert
        batch_sent: list[list] = []  # [seq, amount, voided, txid]

        def bad(reason: str) -> Reject:
            r = Reject(422, reason)
            r.alert = True
            return r

        for seq, kind, data in events:
            if kind == F.K_SENT:
                p = data.payment
                if p.counter != me["payer_counter"] + 1 or p.prev_hash != me["prev_hash"]:
                    raise bad(f"record {seq}: payment counter {p.counter} does not continue the device's chain")
                if p.offline_spent != me["offline_spent"]:
                    raise bad(f"record {seq}: payment states offline spending {p.offline_spent}, the device's "
                              f"ledger gives {me['offline_spent']}")
                if p.currency != cert.currency:
                    raise bad(f"record {seq}: payment currency differs from the device's certificate")
                me["payer_counter"], me["prev_hash"] = p.counter, data.payment_hash
                me["offline_spent"] += p.amount
                me["last_sent"] = p.txid
                batch_sent.append([seq, p.amount, False, p.txid])
                self._observe(ctx, data, payer_seq=seq)
            elif kind == F.K_RESULT:
                txid = me["last_sent"]
                row = ctx.rows.get(txid) if txid else None
                if row is None:
                    raise bad(f"record {seq}: receipt without a payment awaiting one")
                rc = data
                if rc.payment_hash != row["payment_hash"]:
                    raise bad(f"record {seq}: receipt is not for the device's last payment")
                if not any(s[3] == txid for s in batch_sent):  # its SENT came earlier: verify the receipt now
                    from paytoken_host.backend.verify import signed_by

                    payee = ctx.certs.get(row["payee_id"])
                    if payee is None or not signed_by(payee.identity_pub, rc.raw):
                        raise Reject(422, f"record {seq}: receipt not signed by the payee")
                row["payer_result"] = rc.status
                ctx.touch(row)
                if rc.status != reasons.OK:
                    me["offline_spent"] -= row["amount"]
                    for s in batch_sent:
                        if s[3] == txid:
                            s[2] = True
                p = wire.decode_payment(row["payment"])
                self._observe(ctx, PaymentObs(seq, F.K_SENT, p, row["payment_hash"], rc))
                me["last_sent"] = None
            elif kind == F.K_RCVD:
                me["rcvd_count"] += 1
                if data.receipt.payee_seq != me["rcvd_count"]:
                    raise bad(f"record {seq}: receipt sequence {data.receipt.payee_seq} does not follow the "
                              f"device's {me['rcvd_count'] - 1}")
                self._observe(ctx, data)
            elif kind == F.K_VOUCHER:
                have = ctx.conn.execute(select(db.vouchers.c.raw).where(
                    (db.vouchers.c.device_id == dev_id) & (db.vouchers.c.counter == data.counter))).scalar()
                if have != data.raw:
                    raise bad(f"record {seq}: voucher {data.counter} is not one this backend issued")
                me["vouchers_seen"] = max(me["vouchers_seen"], data.counter)
            elif kind == F.K_ACK:
                if data.upto_seq >= seq:
                    raise bad(f"record {seq}: acknowledgement of records after it")
                me["acked_upto"] = data.upto_seq
                me["offline_spent"] = self._spent_between(ctx, me, data.upto_seq, seq, synced, batch_sent)
            elif kind == F.K_STATUS:
                if data.txid == me["last_sent"]:
                    me["last_sent"] = None

    def _spent_between(self, ctx: Ctx, me: dict, after: int, before: int, synced: int, batch_sent: list) -> int:
        P = db.payments
        total = 0
        q = select(P.c.txid, P.c.amount, P.c.payer_result).where(
            (P.c.payer_id == me["device_id"]) & (P.c.payer_seq > after) & (P.c.payer_seq < before)
            & (P.c.payer_seq <= synced))
        for txid, amount, result in ctx.conn.execute(q):
            row = ctx.rows.get(txid)
            if row is not None:
                result = row["payer_result"]
            if result is None or result == reasons.OK:
                total += amount
        total += sum(s[1] for s in batch_sent if after < s[0] < before and not s[2])
        return total

    # ---- payments ----
    def _observe(self, ctx: Ctx, o: PaymentObs, payer_seq: int | None = None) -> None:
        p = o.payment
        txid = p.txid
        row = ctx.rows.get(txid)
        rc = o.receipt
        if row is None:
            row = {
                "txid": txid, "payer_id": p.payer_id, "payee_id": p.payee_id, "counter": p.counter,
                "amount": p.amount, "currency": p.currency, "payment_hash": o.payment_hash, "payment": p.raw,
                "receipt": None, "receipt_status": None, "payer_seq": payer_seq, "payer_result": None,
                "state": "pending", "reason": None, "created_at": ctx.now, "expires_at": ctx.now + ctx.expiry,
                "final_at": None, "entry_id": None, "payer_status": None, "payer_upd": None, "payee_status": None,
                "payee_upd": None,
            }
            ctx.rows[txid] = row
            ctx.new.add(txid)
            self._check_links(ctx, row, p)
        elif row["payment_hash"] != o.payment_hash:
            ctx.conflicts.append({"txid": txid, "payment": p.raw, "receipt": rc.raw if rc else None,
                                  "reason": "same payer counter, different payment", "detected_at": ctx.now,
                                  "payee_id": p.payee_id})
            self._fork(ctx, p.payer_id, f"fork: payer {p.payer_id.hex()} signed two different payments with "
                       f"counter {p.counter}", txid)
            return
        elif payer_seq is not None:
            row["payer_seq"] = payer_seq
            ctx.touch(row)
        if rc is None:
            return
        if row["receipt"] is None:
            if row["state"] == "pending" and row["expires_at"] is not None and row["expires_at"] < ctx.now:
                # expired before this upload, even if the sweep has not run yet: refunded, never settled
                ctx.finish(row, "refunded", "no receipt from the payee before the expiry", wire.ST_REFUNDED, None)
            row["receipt"], row["receipt_status"] = rc.raw, rc.status
            ctx.touch(row)
            if row["state"] == "pending":
                row["expires_at"] = None
                if rc.status == reasons.OK:
                    row["state"] = "held"
                else:
                    ctx.finish(row, "voided", f"refused by the payee: {reasons.name(rc.status)}",
                               wire.ST_REFUNDED, None)
            elif row["state"] == "refunded" and rc.status == reasons.OK:
                ctx.tell(row, None, wire.ST_REJECTED)  # the payee credited it after it was refunded
            elif row["state"] == "rejected":
                ctx.tell(row, None, wire.ST_REJECTED)
        elif row["receipt"] != rc.raw:
            ctx.alert("receipt", f"payee {p.payee_id.hex()} signed two different receipts for payment {txid.hex()}",
                      p.payee_id, txid)

    def _check_links(self, ctx: Ctx, row: dict, p: wire.Payment) -> None:
        if p.counter == 0 or (p.counter == 1 and p.prev_hash != ZERO_HASH):
            self._fork(ctx, p.payer_id, f"fork: payer {p.payer_id.hex()} counter {p.counter} starts a broken chain",
                       p.txid)
            return
        before = ctx.rows.get(ctx.txid(p.payer_id, p.counter - 1)) if p.counter > 1 else None
        after = ctx.rows.get(ctx.txid(p.payer_id, p.counter + 1))
        if before is not None and before["payment_hash"] != p.prev_hash:
            self._fork(ctx, p.payer_id, f"fork: payer {p.payer_id.hex()} payment {p.counter} does not chain to "
                       f"payment {p.counter - 1}", p.txid)
        elif after is not None and prev_hash_of(after["payment"]) != row["payment_hash"]:
            self._fork(ctx, p.payer_id, f"fork: payer {p.payer_id.hex()} payment {p.counter + 1} does not chain "
                       f"to payment {p.counter}", p.txid)

    def _fork(self, ctx: Ctx, payer_id: bytes, reason: str, txid: bytes | None) -> None:
        dev = ctx.devs[payer_id]
        if revoke_device(ctx.conn, dev, reason, ctx.now):
            ctx.alert("fork", reason + "; device revoked", payer_id, txid)
        else:
            ctx.alert("fork", reason, payer_id, txid)
        ctx.forks.append(reason)
        for row in ctx.rows.values():
            if row["payer_id"] == payer_id and row["state"] in ("pending", "held"):
                ctx.finish(row, "rejected", "payer revoked after a fork", wire.ST_REJECTED, wire.ST_REJECTED)

    def _evaluate(self, ctx: Ctx, payer_id: bytes, rows: list[dict]) -> None:
        acct = None
        for row in sorted(rows, key=lambda r: r["counter"]):
            if row["state"] not in ("pending", "held"):
                continue
            payer, payee = ctx.devs[row["payer_id"]], ctx.devs[row["payee_id"]]
            if payer["revoked_at"] is not None:
                ctx.finish(row, "rejected", f"payer revoked: {payer['revoke_reason']}", wire.ST_REJECTED,
                           wire.ST_REJECTED)
                continue
            if row["state"] != "held":
                continue
            if payee["revoked_at"] is not None:
                ctx.finish(row, "rejected", f"payee revoked: {payee['revoke_reason']}", wire.ST_REJECTED,
                           wire.ST_REJECTED)
                continue
            if row["counter"] > 1 and not self._known(ctx, ctx.txid(payer_id, row["counter"] - 1)):
                continue  # a gap: waits for the payer's earlier payment
            why = self._limits(ctx, row)
            if why:
                ctx.finish(row, "rejected", why, wire.ST_REJECTED, wire.ST_REJECTED)
                ctx.alert("rejected", f"payment {row['txid'].hex()}: {why}", payer_id, row["txid"])
                continue
            if acct is None:
                acct = journal.offline(payer_id)
            if acct not in ctx.balances:
                self._load_balances(ctx)
            if ctx.balances[acct] + ctx.deltas[acct] < row["amount"]:
                why = "payer's offline balance does not cover it (the device spent money it was never given)"
                ctx.finish(row, "rejected", why, wire.ST_REJECTED, wire.ST_REJECTED)
                ctx.alert("overspend", f"payment {row['txid'].hex()}: {why}", payer_id, row["txid"])
                continue
            ctx.deltas[acct] -= row["amount"]
            ctx.deltas[ctx.merchant(row["payee_id"])] += row["amount"]
            ctx.finish(row, "settled", None, wire.ST_SETTLED, wire.ST_SETTLED)
            ctx.settled.append(row)

    @staticmethod
    def _known(ctx: Ctx, t: bytes) -> bool:
        # The backend holds payment t (in any state). Usually preloaded; not when this upload completed a payment
        # whose own record came earlier (a receipt record after the upload that carried its payment), or when
        # a payment held from before waits on one that settled long ago: then one look in the database.
        if t in ctx.rows:
            return True
        return ctx.conn.execute(select(db.payments.c.txid).where(db.payments.c.txid == t)).first() is not None

    def _load_balances(self, ctx: Ctx) -> None:
        """The offline balances of every payer with a payment waiting, in one query."""
        names = sorted({journal.offline(r["payer_id"]) for r in ctx.rows.values() if r["state"] == "held"})
        for i in range(0, len(names), 900):
            for r in rows_where_any(ctx.conn, db.accounts, "name", names[i:i + 900], columns=("name", "balance")):
                ctx.balances[r["name"]] = r["balance"]
        for name in names:
            ctx.balances.setdefault(name, 0)

    def _limits(self, ctx: Ctx, row: dict) -> str | None:
        raw = row["payment"]
        amount, currency, offline_spent, t = row["amount"], row["currency"], _SPENT.unpack_from(raw, 44)[0], \
            _TIME.unpack_from(raw, 120)[0]
        payer, payee = ctx.certs[row["payer_id"]], ctx.certs[row["payee_id"]]
        if not payer.role & wire.ROLE_PAYER:
            return "payer's certificate lacks the payer role"
        if not payee.role & wire.ROLE_PAYEE:
            return "payee's certificate lacks the payee role"
        if currency != payer.currency or currency != payee.currency:
            return "currency differs from the certificates"
        if amount == 0:
            return "amount is zero"
        if amount > payer.limit_payment:
            return f"amount {amount} over the per-payment limit {payer.limit_payment}"
        if offline_spent + amount > payer.limit_offline:
            return f"offline spending {offline_spent + amount} over the limit {payer.limit_offline}"
        if t:
            for who, c in (("payer", payer), ("payee", payee)):
                if not c.not_before <= t <= c.not_after:
                    return f"{who}'s certificate was not valid at the payment's time"
        return None

    # ---- writing ----
    def _write(self, ctx: Ctx, v: Verified, me: dict, events: list, synced: int) -> None:
        conn = ctx.conn
        b = v.batch
        if ctx.settled:
            entry = journal.post(conn, "settlement", f"upload:{b.device_id.hex()}:{b.upto_seq}",
                                 dict(ctx.deltas), ctx.now)
            for row in ctx.settled:
                row["entry_id"] = entry
            outbox.enqueue_settlement(conn, f"settle:{b.device_id.hex()}:{b.upto_seq}", entry, ctx.settled, ctx.now)
        self._write_rows(ctx)
        me["synced_seq"], me["synced_hash"] = b.upto_seq, b.head.chain_hash
        state = _device_state
        changed = [dev for dev in ctx.devs.values() if state(dev) != state(ctx.orig[dev["device_id"]])]
        db.update_many(conn, db.devices, "device_id", _DEVICE_STATE,
                       sorted(changed, key=lambda d: d["device_id"]))
        # Payment records (SENT, RESULT, RCVD) are rebuilt byte for byte from the payments table (payment and
        # receipt bytes); the others are kept here, each as seq u32, length u16, payload.
        blob = b"".join(struct.pack(">IH", r.seq, len(r.payload)) + r.payload for r in b.records
                        if r.seq > synced and r.payload[0] not in (F.K_SENT, F.K_RESULT, F.K_RCVD))
        conn.execute(insert(db.uploads).values(device_id=b.device_id, base_seq=synced, upto_seq=b.upto_seq,
                                               chain_hash=b.head.chain_hash, head=b.head.raw, records=blob,
                                               received_at=ctx.now))
        self._write_side(ctx)

    def _write_rows(self, ctx: Ctx) -> None:
        conn = ctx.conn
        db.insert_many(conn, db.payments, [ctx.rows[t] for t in sorted(ctx.new)])
        db.update_many(conn, db.payments, "txid", _MUTABLE, [ctx.rows[t] for t in sorted(ctx.dirty)])

    def _write_side(self, ctx: Ctx) -> None:
        conn = ctx.conn
        for c in ctx.conflicts:
            payee = ctx.devs.get(c["payee_id"])
            upd = None
            if payee is not None:
                payee["update_seq"] += 1
                upd = payee["update_seq"]
                conn.execute(update(db.devices).where(db.devices.c.device_id == c["payee_id"])
                             .values(update_seq=upd))
            conn.execute(insert(db.conflicts).values(txid=c["txid"], payment=c["payment"], receipt=c["receipt"],
                                                     reason=c["reason"], detected_at=c["detected_at"],
                                                     payee_id=c["payee_id"], payee_upd=upd))
        if ctx.alerts:
            conn.execute(insert(db.alerts), ctx.alerts)

    # ---- operator revocation ----
    def revoke(self, device_id: bytes, reason: str) -> bool:
        """Revokes a device and rejects its payments not yet settled (as payer); False if it was revoked already."""
        now = int(self.clock())
        P = db.payments
        with db.write_tx(self.engine) as conn:
            devs = lock_devices(conn, {device_id}, payees_of=[device_id])
            if device_id not in devs:
                raise Reject(404, "unknown device")
            ctx = Ctx(conn, now, self.expiry, devs, {})
            changed = revoke_device(conn, devs[device_id], reason, now)
            for r in rows_where_any(conn, P, "payer_id", [device_id], OPEN):
                if r["payee_id"] in devs:
                    ctx.rows[r["txid"]] = r
                    ctx.finish(r, "rejected", f"payer revoked: {reason}", wire.ST_REJECTED, wire.ST_REJECTED)
            self._write_rows(ctx)
            for dev in devs.values():
                conn.execute(update(db.devices).where(db.devices.c.device_id == dev["device_id"])
                             .values(update_seq=dev["update_seq"]))
            if changed:
                conn.execute(insert(db.alerts).values(kind="revoked", device_id=device_id,
                                                      detail=f"revoked by an operator: {reason}", created_at=now))
        return changed

    # ---- expiry of sent-unconfirmed payments ----
    def expire(self, limit: int = 500) -> int:
        """Refunds payments still without a receipt past their expiry; returns how many."""
        now = int(self.clock())
        P = db.payments
        with db.read_tx(self.engine) as conn:
            due = conn.execute(select(P.c.txid, P.c.payer_id, P.c.payee_id).where(
                (P.c.state == "pending") & (P.c.expires_at < now)).limit(limit)).all()
        if not due:
            return 0
        done = 0
        with db.write_tx(self.engine) as conn:
            devs = lock_devices(conn, {r.payer_id for r in due} | {r.payee_id for r in due})
            ctx = Ctx(conn, now, self.expiry, devs, {})
            for r in conn.execute(select(P).where(P.c.txid.in_([r.txid for r in due]))):
                row = dict(r._mapping)
                if row["state"] != "pending" or row["expires_at"] >= now:
                    continue
                ctx.rows[row["txid"]] = row
                ctx.finish(row, "refunded", "no receipt from the payee before the expiry", wire.ST_REFUNDED, None)
                done += 1
            self._write_rows(ctx)
            for dev in devs.values():
                conn.execute(update(db.devices).where(db.devices.c.device_id == dev["device_id"])
                             .values(update_seq=dev["update_seq"]))
            if done:
                outbox.enqueue(conn, f"refund:{now}:{due[0].txid.hex()}", "refund", {
                    "payments": [{"txid": t.hex(), "payer": r["payer_id"].hex(), "amount": r["amount"]}
                                 for t, r in ctx.rows.items()]}, now)
        return done


def register_cert(conn: Connection, cert: wire.Certificate, now: int) -> bool:
    """Stores a device (certificate already verified against the issuer) and opens its accounts; False if it
    was already known."""
    if conn.execute(select(db.devices.c.device_id).where(db.devices.c.device_id == cert.device_id)).first():
        return False
    conn.execute(insert(db.devices).values(
        device_id=cert.device_id, role=cert.role, cert=cert.raw, currency=cert.currency, registered_at=now,
        synced_seq=0, synced_hash=ZERO_HASH, payer_counter=0, prev_hash=ZERO_HASH, offline_spent=0,
        rcvd_count=0, acked_upto=0, vouchers_issued=0, vouchers_seen=0, update_seq=0))
    journal.open_accounts(conn, [journal.offline(cert.device_id), journal.merchant(cert.device_id), journal.BANK])
    return True


def payment_digest(raw: bytes) -> bytes:
    return hashlib.sha256(raw).digest()


def dumps(obj: object) -> str:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True)
