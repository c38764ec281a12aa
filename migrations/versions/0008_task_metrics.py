"""lm-evaluation-harness task results per job (task_metrics) and the FP scores kept across jobs
(task_fp_scores).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "task_metrics",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True
        ),
        sa.Column("job_id", sa.String(40), sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("metric", sa.String(64), nullable=False),
        sa.Column("fp", sa.Float(), nullable=True),
        sa.Column("quantized", sa.Float(), nullable=True),
        sa.Column("stderr", sa.Float(), nullable=True),
        sa.Column("fp_stderr", sa.Float(), nullable=True),
        sa.Column("recovery", sa.Float(), nullable=True),
        sa.Column("n_samples", sa.Integer(), nullable=True),
        sa.Column("fp_cached", sa.Boolean(), nullable=False, server_default=sa.false()),
        sa.Column("fp_s", sa.Float(), nullable=True),
        sa.Column("quantized_s", sa.Float(), nullable=True),
        sa.Column("tokens", sa.BigInteger(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )
    op.create_index("ix_task_metrics_job_id", "task_metrics", ["job_id"])
    op.create_table(
        "task_fp_scores",
        sa.Column("key", sa.String(64), primary_key=True),
        sa.Column("scope", sa.String(40), primary_key=True),
        sa.Column("task", sa.String(200), nullable=False),
        sa.Column("score", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    )


def downgrade() -> None:
    op.drop_table("task_fp_scores")
    op.drop_index("ix_task_metrics_job_id", table_name="task_metrics")
    op.drop_table("task_metrics")
