"""outbox bodies compressed with lz4 on PostgreSQL

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-07 00:25:00

A settlement's outbox event lists every payment of the upload (some 70 kB of JSON for 500): PostgreSQL's default
TOAST compression (pglz) spent about 0.8 ms of the database's CPU on each, lz4 about a sixth of that. A server built
without lz4 (or older than PostgreSQL 14) keeps its default. SQLite stores the text as it is.
"""

from __future__ import annotations

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DO $$ BEGIN ALTER TABLE outbox ALTER COLUMN body SET COMPRESSION lz4; "
                   "EXCEPTION WHEN feature_not_supported OR syntax_error THEN NULL; END $$")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("ALTER TABLE outbox ALTER COLUMN body SET COMPRESSION DEFAULT")
