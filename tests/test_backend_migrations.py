"""The migrations build the schema the code describes (db.metadata), on both databases, and step back down."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect

from paytoken_host.backend import db, migrate
from tests.backend_rig import database_params, make_database

# column types too; partial indexes are compared by name and columns (alembic does not compare WHERE clauses)
OPTIONS = {"compare_type": True}


@pytest.fixture(params=database_params())
def engine(request, tmp_path):
    d = make_database(request.param, tmp_path)
    eng = db.make_engine(d.url)
    yield eng
    eng.dispose()
    if d.cleanup:
        d.cleanup()


def test_migrations_build_the_schema_the_code_describes(engine):
    migrate.upgrade(engine)
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts=OPTIONS), db.metadata)
    assert diff == [], f"migrations and db.metadata differ: {diff}"


def test_open_payments_index_is_partial_and_downgrades(engine):
    migrate.upgrade(engine)
    with engine.connect() as conn:
        ix = {i["name"]: i for i in inspect(conn).get_indexes("payments")}
    assert ix["ix_payments_open"]["column_names"] == ["payer_id"]
    if engine.dialect.name == "postgresql":
        with engine.connect() as conn:
            where = conn.exec_driver_sql(
                "SELECT pg_get_expr(indpred, indrelid) FROM pg_index WHERE indexrelid = 'ix_payments_open'::regclass"
            ).scalar()
        assert "pending" in where and "held" in where
    migrate.downgrade(engine, "0002")
    with engine.connect() as conn:
        assert "ix_payments_open" not in {i["name"] for i in inspect(conn).get_indexes("payments")}
    migrate.upgrade(engine)
    with engine.connect() as conn:
        assert "ix_payments_open" in {i["name"] for i in inspect(conn).get_indexes("payments")}


@pytest.mark.parametrize("engine", database_params()[1:], indirect=True)  # PostgreSQL's (skipped, saying why, without)
def test_open_payments_lookup_uses_the_partial_index(engine):
    """The lookup every upload makes on PostgreSQL (the payees of its payers' open payments, inside the device
    lock) reads the partial index: the payer index would visit every payment those payers ever made."""
    from paytoken_host.backend.settle import PG_LOCK_WITH_PAYEES

    migrate.upgrade(engine)
    payers = [i.to_bytes(8, "big") for i in range(200)]
    rows = [{"txid": (p + n.to_bytes(8, "big")), "payer_id": p, "payee_id": bytes(8), "counter": n, "amount": 1,
             "currency": 840, "payment_hash": bytes(32), "payment": b"p", "state": "settled" if n else "held",
             "created_at": 0} for p in payers for n in range(25)]
    with db.write_tx(engine) as conn:
        db.insert_many(conn, db.payments, rows)
        conn.exec_driver_sql("ANALYZE payments")
        cur = conn.connection.driver_connection.cursor()
        cur.execute("EXPLAIN " + PG_LOCK_WITH_PAYEES, [[bytes(8)], payers[:50]])
        plan = "\n".join(r[0] for r in cur.fetchall())
    assert "ix_payments_open" in plan and "Seq Scan on payments" not in plan, plan
