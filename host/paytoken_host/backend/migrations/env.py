"""Alembic environment: runs against the connection the backend hands it (migrate.upgrade)."""

from __future__ import annotations

from alembic import context

from paytoken_host.backend.db import make_engine, metadata

config = context.config


def run() -> None:
    conn = config.attributes.get("connection")
    if conn is None:
        engine = make_engine(config.get_main_option("sqlalchemy.url"))
        with engine.connect() as conn:
            _migrate(conn)
            conn.commit()
        engine.dispose()
    else:
        _migrate(conn)


def _migrate(conn) -> None:
    context.configure(connection=conn, target_metadata=metadata, render_as_batch=conn.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


run()
