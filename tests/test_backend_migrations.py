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
