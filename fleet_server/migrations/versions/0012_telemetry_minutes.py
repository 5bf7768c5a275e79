"""telemetry summed per model hash, hardware cohort and minute at ingest: the observability charts
read these rows instead of every raw batch

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 14:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "telemetryminute",
        sa.Column("sha256", AutoString(length=64), nullable=False),
        sa.Column("hardware_id", AutoString(length=128), nullable=False),
        sa.Column("minute", sa.BigInteger(), nullable=False),
        sa.Column("inferences", sa.BigInteger(), nullable=False),
        sa.Column("errors", sa.BigInteger(), nullable=False),
        sa.Column("labels", sa.BigInteger(), nullable=False),
        sa.Column("labels_correct", sa.BigInteger(), nullable=False),
        sa.Column("latency_buckets", sa.JSON(), nullable=False),
        sa.Column("output_hist", sa.JSON(), nullable=False),
        sa.PrimaryKeyConstraint("sha256", "hardware_id", "minute"),
    )


def downgrade() -> None:
    op.drop_table("telemetryminute")
