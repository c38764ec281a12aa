"""Dispatch bookkeeping for the reconciler: when a job's message was last sent, and how often.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("dispatched_at", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("dispatches", sa.Integer(), nullable=False, server_default="0"))
    # Jobs queued before this revision count as sent (their message is in the broker, or the
    # reconciler sends them again once REDISPATCH_AFTER_S has passed).
    op.execute("UPDATE jobs SET dispatched_at = created_at, dispatches = 1 WHERE status = 'queued'")


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("dispatches")
        batch.drop_column("dispatched_at")
