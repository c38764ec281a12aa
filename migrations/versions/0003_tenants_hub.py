"""Tenants and the hub: publish namespaces and the service-token flag per tenant, the source token and
resolved source commit per job, the publish commit per artifact.

Revision ID: 0003
Revises: 0001
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("tenants") as b:
        b.add_column(sa.Column("hub_namespaces", sa.JSON(), nullable=True))
        b.add_column(
            sa.Column("allow_service_token", sa.Boolean(), nullable=False, server_default=sa.false())
        )
    with op.batch_alter_table("jobs") as b:
        b.add_column(sa.Column("source_token_enc", sa.Text(), nullable=True))
        b.add_column(sa.Column("source_sha", sa.String(length=64), nullable=True))
    with op.batch_alter_table("artifacts") as b:
        b.add_column(sa.Column("commit_url", sa.Text(), nullable=True))
        b.add_column(sa.Column("hub_revision", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("artifacts") as b:
        b.drop_column("hub_revision")
        b.drop_column("commit_url")
    with op.batch_alter_table("jobs") as b:
        b.drop_column("source_sha")
        b.drop_column("source_token_enc")
    with op.batch_alter_table("tenants") as b:
        b.drop_column("allow_service_token")
        b.drop_column("hub_namespaces")
