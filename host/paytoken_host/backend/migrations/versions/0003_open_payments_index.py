"""an index on the open payments of each payer

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07 03:15:00

Every upload looks up the open (pending or held) payments of the payers it names, to lock their payees and to
settle what waited on a gap. The payer index (payer_id, payer_upd) does not know the state, so the lookup read
every payment those payers ever made, and on a table growing faster than its statistics PostgreSQL's planner
scanned the whole table instead (1.8 ms per upload at 6,000 payments). A partial index holds only the open
payments: few at any time, so it stays small and its lookups cost the same whatever the size of the history.
"""

from __future__ import annotations

from alembic import op
from sqlalchemy import text

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

OPEN = "state IN ('pending', 'held')"


def upgrade() -> None:
    op.create_index('ix_payments_open', 'payments', ['payer_id'], unique=False,
                    sqlite_where=text(OPEN), postgresql_where=text(OPEN))


def downgrade() -> None:
    op.drop_index('ix_payments_open', table_name='payments')
