"""The backend's storage: SQLAlchemy Core tables and engines for SQLite (WAL) and PostgreSQL (psycopg 3).

All state lives here; the service processes keep none (docs/deployment.md). Writes go through `write_tx`, which
on SQLite takes the database's write lock at BEGIN (BEGIN IMMEDIATE, so two writers never deadlock on a lock
upgrade) and on PostgreSQL relies on row locks (`lock_devices`, SELECT ... FOR UPDATE in device-id order).
"""

from __future__ import annotations

import fcntl
import operator
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import cache

from sqlalchemy import (
    BigInteger,
    Column,
    Connection,
    Engine,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    bindparam,
    create_engine,
    event,
    insert,
    text,
    update,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.pool import NullPool

metadata = MetaData()

settings = Table(
    "settings", metadata,
    Column("key", String(64), primary_key=True),
    Column("value", Text, nullable=False),
)

devices = Table(
    "devices", metadata,
    Column("device_id", LargeBinary(8), primary_key=True),
    Column("role", Integer, nullable=False),
    Column("cert", LargeBinary, nullable=False),
    Column("currency", Integer, nullable=False),
    Column("registered_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger),
    Column("revoke_reason", Text),
    # ledger sync: the device's records the backend holds and has verified
    Column("synced_seq", BigInteger, nullable=False, default=0),
    Column("synced_hash", LargeBinary(32), nullable=False),
    # the device's replay state after synced_seq (wallet.py's rules)
    Column("payer_counter", BigInteger, nullable=False, default=0),
    Column("prev_hash", LargeBinary(32), nullable=False),
    Column("offline_spent", BigInteger, nullable=False, default=0),
    Column("last_sent", LargeBinary(16)),  # txid of the newest SENT awaiting its RESULT
    Column("rcvd_count", BigInteger, nullable=False, default=0),
    Column("acked_upto", BigInteger, nullable=False, default=0),
    Column("vouchers_issued", BigInteger, nullable=False, default=0),
    Column("vouchers_seen", BigInteger, nullable=False, default=0),
    Column("update_seq", BigInteger, nullable=False, default=0),  # cursor of the statuses told to this device
)

accounts = Table(
    "accounts", metadata,
    Column("name", String(64), primary_key=True),
    Column("balance", BigInteger, nullable=False, default=0),
)

journal_entries = Table(
    "journal_entries", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),
    Column("ref", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

journal_lines = Table(
    "journal_lines", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("entry_id", BigInteger, ForeignKey("journal_entries.id"), nullable=False, index=True),
    Column("account", String(64), nullable=False),
    Column("amount", BigInteger, nullable=False),  # debit > 0, credit < 0; each entry sums to 0
)

OPEN = "state IN ('pending', 'held')"  # payments not yet final (a WHERE clause; ix_payments_open's)

payments = Table(
    "payments", metadata,
    Column("txid", LargeBinary(16), primary_key=True),  # unique per (payer, counter): a counter settles once
    Column("payer_id", LargeBinary(8), nullable=False),
    Column("payee_id", LargeBinary(8), nullable=False),
    Column("counter", BigInteger, nullable=False),
    Column("amount", BigInteger, nullable=False),
    Column("currency", Integer, nullable=False),
    Column("payment_hash", LargeBinary(32), nullable=False),
    Column("payment", LargeBinary, nullable=False),
    Column("receipt", LargeBinary),
    Column("receipt_status", Integer),
    Column("payer_seq", BigInteger),  # ledger seq of the payer's SENT record, once the payer uploaded it
    Column("payer_result", Integer),  # receipt status the payer's own ledger recorded (RESULT), if any
    Column("state", String(16), nullable=False),  # pending held settled voided refunded rejected
    Column("reason", Text),
    Column("created_at", BigInteger, nullable=False),
    Column("expires_at", BigInteger),
    Column("final_at", BigInteger),
    Column("entry_id", BigInteger),
    Column("payer_status", Integer),
    Column("payer_upd", BigInteger),
    Column("payee_status", Integer),
    Column("payee_upd", BigInteger),
    Index("ix_payments_payer", "payer_id", "payer_upd"),
    Index("ix_payments_payee", "payee_id", "payee_upd"),
    # only the few payments waiting for a receipt are indexed for the expiry sweep
    Index("ix_payments_pending", "expires_at", sqlite_where=text("state = 'pending'"),
          postgresql_where=text("state = 'pending'")),
    # the open (pending or held) payments of a payer, which every upload naming it looks up (migration 0003)
    Index("ix_payments_open", "payer_id", sqlite_where=text(OPEN), postgresql_where=text(OPEN)),
)

conflicts = Table(
    "conflicts", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("txid", LargeBinary(16), nullable=False, index=True),
    Column("payment", LargeBinary, nullable=False),
    Column("receipt", LargeBinary),
    Column("reason", Text, nullable=False),
    Column("detected_at", BigInteger, nullable=False),
    Column("payee_id", LargeBinary(8)),  # the payee told that its copy is rejected
    Column("payee_upd", BigInteger),
)

uploads = Table(
    "uploads", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("device_id", LargeBinary(8), nullable=False),
    Column("base_seq", BigInteger, nullable=False),
    Column("upto_seq", BigInteger, nullable=False),
    Column("chain_hash", LargeBinary(32), nullable=False),
    Column("head", LargeBinary, nullable=False),
    # the new records other than payment records (those are in payments): each seq u32, length u16, payload
    Column("records", LargeBinary, nullable=False),
    Column("received_at", BigInteger, nullable=False),
    UniqueConstraint("device_id", "upto_seq", name="uq_uploads_device_upto"),
)

vouchers = Table(
    "vouchers", metadata,
    Column("device_id", LargeBinary(8), primary_key=True),
    Column("counter", BigInteger, primary_key=True),
    Column("amount", BigInteger, nullable=False),
    Column("raw", LargeBinary, nullable=False),
    Column("issued_at", BigInteger, nullable=False),
    Column("idempotency_key", String(128), unique=True),
)

revocations = Table(
    "revocations", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("device_id", LargeBinary(8), nullable=False, unique=True),
    Column("revoked_at", BigInteger, nullable=False),
    Column("reason", Text, nullable=False),
)

alerts = Table(
    "alerts", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("kind", String(32), nullable=False),
    Column("device_id", LargeBinary(8)),
    Column("txid", LargeBinary(16)),
    Column("detail", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)

outbox = Table(
    "outbox", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("idempotency_key", String(128), nullable=False, unique=True),
    Column("kind", String(32), nullable=False),
    Column("body", Text, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("attempts", Integer, nullable=False, default=0),
    Column("next_attempt_at", BigInteger, nullable=False),
    Column("delivered_at", BigInteger),
    Column("last_error", Text),
    Index("ix_outbox_due", "delivered_at", "next_attempt_at"),
)

api_tokens = Table(
    "api_tokens", metadata,
    Column("id", BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True),
    Column("name", String(128), nullable=False),
    Column("role", String(32), nullable=False),
    Column("token_hash", LargeBinary(32), nullable=False, unique=True),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger),
)

nonces = Table(
    "nonces", metadata,
    Column("device_id", LargeBinary(8), primary_key=True),
    Column("nonce", LargeBinary(16), primary_key=True),
    Column("expires_at", BigInteger, nullable=False),
)

rate_limits = Table(
    "rate_limits", metadata,
    Column("key", String(128), primary_key=True),
    Column("window", BigInteger, primary_key=True),
    Column("count", Integer, nullable=False),
)


def is_sqlite(engine: Engine | Connection) -> bool:
    return engine.dialect.name == "sqlite"


def make_engine(url: str, pool_size: int = 8) -> Engine:
    """An engine for a SQLite file (WAL, busy timeout, BEGIN IMMEDIATE for writers) or a PostgreSQL URL
    (postgresql+psycopg://...; plain postgresql:// is taken to mean psycopg 3)."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        engine = create_engine(url, poolclass=NullPool, connect_args={"timeout": 60, "check_same_thread": False})

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn, _record) -> None:
            dbapi_conn.isolation_level = None  # SQLAlchemy emits BEGIN itself (below)
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA busy_timeout=60000")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @event.listens_for(engine, "begin")
        def _begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE" if conn.get_execution_options().get("write") else "BEGIN")

        return engine
    # no pre-ping (a round trip per checkout on the hot path): connections are recycled instead, and a request
    # that meets a dropped connection fails and is retried by its caller like any other.
    return create_engine(url, pool_size=pool_size, max_overflow=pool_size, pool_recycle=600)


def _writer_lock_path(engine: Engine) -> str | None:
    db_file = engine.url.database if engine.dialect.name == "sqlite" else None
    return db_file + "-writer" if db_file and db_file != ":memory:" else None


@contextmanager
def write_tx(engine: Engine) -> Iterator[Connection]:
    """One write transaction: committed when the block ends, rolled back if it raises.

    On a SQLite file, writers of all processes first queue on an flock beside the database: SQLite's own busy
    handler polls with sleeps of up to 100 ms, a blocked flock wakes the moment the lock is free."""
    lock_path = _writer_lock_path(engine)
    fd = None
    if lock_path:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(write=True)
            with conn.begin():
                yield conn
    finally:
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


@contextmanager
def autocommit(engine: Engine) -> Iterator[Connection]:
    """A connection whose statements each commit on their own: for a lone statement, whose transaction would
    cost two more round trips (BEGIN, COMMIT) and as many of SQLAlchemy's steps."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        yield conn


@contextmanager
def read_tx(engine: Engine) -> Iterator[Connection]:
    with engine.connect() as conn:
        with conn.begin():
            yield conn


def upsert(conn: Connection, table: Table):
    """INSERT with the dialect's ON CONFLICT clauses (.on_conflict_do_nothing / .on_conflict_do_update)."""
    from sqlalchemy.dialects.postgresql import insert as pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return (pg_insert if conn.dialect.name == "postgresql" else sqlite_insert)(table)


def get_setting(conn: Connection, key: str) -> str | None:
    from sqlalchemy import select

    return conn.execute(select(settings.c.value).where(settings.c.key == key)).scalar()


def set_setting(conn: Connection, key: str, value: str) -> None:
    from sqlalchemy import delete, insert

    conn.execute(delete(settings).where(settings.c.key == key))
    conn.execute(insert(settings).values(key=key, value=value))


COPY_MIN_ROWS = 20  # below this, a plain multi-row INSERT costs less than setting up a COPY


@cache
def _pg_type(col: Column) -> str:
    """A column's PostgreSQL type name without its length (what binary COPY and array casts name)."""
    return col.type.compile(dialect=postgresql.dialect()).split("(")[0].lower()


def _raw_cursor(conn: Connection):
    return conn.connection.driver_connection.cursor()  # psycopg's own, in the connection's transaction


def pg_rows(conn: Connection, sql: str, params: list) -> list[dict]:
    """The rows of one raw statement on PostgreSQL, as dicts: for what an upload can say in one statement and
    SQLAlchemy Core cannot (each statement costs the database some 0.2 ms of CPU besides its work)."""
    cur = _raw_cursor(conn)
    cur.execute(sql, params)
    names = [d.name for d in cur.description]
    return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]


def insert_many(conn: Connection, table: Table, rows: list[dict]) -> None:
    """Inserts rows (dicts with the same columns; the others take their defaults): on PostgreSQL, many of them
    with a binary COPY, one round trip in the transaction (binary: bytea goes as it is, not hex-escaped)."""
    if not rows:
        return
    if conn.dialect.name != "postgresql" or len(rows) < COPY_MIN_ROWS:
        conn.execute(insert(table), rows)
        return
    cols = [c for c in table.columns if c.name in rows[0]]
    names = [c.name for c in cols]
    from psycopg.types.string import BytesBinaryDumper

    cur = _raw_cursor(conn)
    # bytea by oid would get psycopg's DB-API Binary dumper (Python code per value): bytes' own is C
    cur.adapters.register_dumper(bytes, BytesBinaryDumper)
    values = operator.itemgetter(*names) if len(names) > 1 else lambda r: (r[names[0]],)  # a row's, as a tuple
    with cur.copy(f"COPY {table.name} ({', '.join(names)}) FROM STDIN (FORMAT BINARY)") as copy:
        copy.set_types([_pg_type(c) for c in cols])
        for r in rows:
            copy.write_row(values(r))


def update_many(conn: Connection, table: Table, key: str, cols: Sequence[str], rows: list[dict],
                add: bool = False) -> None:
    """For each row (a dict with key and cols; keys unique): UPDATE table SET col = row[col] (col + row[col]
    with add) WHERE key = row[key]. On PostgreSQL one statement over binary arrays, whatever the number of rows
    (not a statement execution per row). Rows are not locked in a set order: the caller holds the locks that
    order its writers (the device rows, FOR UPDATE)."""
    if not rows:
        return
    if conn.dialect.name != "postgresql":
        stmt = update(table).where(table.c[key] == bindparam("b_" + key)).values(
            **{c: (table.c[c] + bindparam("b_" + c)) if add else bindparam("b_" + c) for c in cols})
        conn.execute(stmt, [{"b_" + k: r[k] for k in (key, *cols)} for r in rows])
        return
    _raw_cursor(conn).execute(update_many_sql(table, key, cols, add), update_many_params(key, cols, rows))


def update_many_sql(table: Table, key: str, cols: Sequence[str], add: bool = False) -> str:
    """update_many's statement on PostgreSQL (also a part of a larger one), its parameters update_many_params'."""
    names = (key, *cols)
    args = ", ".join(f"%b::{_pg_type(table.c[n])}[]" for n in names)
    sets = ", ".join(f"{c} = {table.name}.{c} + v.{c}" if add else f"{c} = v.{c}" for c in cols)
    return f"UPDATE {table.name} SET {sets} FROM unnest({args}) AS v({', '.join(names)}) " \
           f"WHERE {table.name}.{key} = v.{key}"


def update_many_params(key: str, cols: Sequence[str], rows: list[dict]) -> list[list]:
    return [[r[n] for r in rows] for n in (key, *cols)]
