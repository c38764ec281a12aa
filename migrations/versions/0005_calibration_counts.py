"""Calibration and evaluation counts on job_metrics: what a job really calibrated and evaluated on.

A short calibration source is used as far as it goes (awqforge.calibration); these columns keep the real
sample and token counts, and how many tokens were missing, beside the job's other metrics.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("calibration_samples", "calibration_tokens", "calibration_shortfall", "eval_tokens")


def upgrade() -> None:
    with op.batch_alter_table("job_metrics") as batch:
        for name in COLUMNS:
            batch.add_column(sa.Column(name, sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("job_metrics") as batch:
        for name in reversed(COLUMNS):
            batch.drop_column(name)
