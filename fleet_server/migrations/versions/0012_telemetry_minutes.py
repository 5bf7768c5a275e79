"""telemetry summed per model hash, hardware cohort and minute at ingest: the observability charts
read these rows instead of every raw batch; the batches of the last day (the longest chart
window) are summed in once

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-06 14:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

from fleet_server.models import UTCDateTime
from fleet_server.telemetry_minutes import batch_sums, columns

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
    batches = sa.table(
        "telemetrybatchrow",
        sa.column("device_id", sa.String()),
        sa.column("received_at", UTCDateTime()),
        sa.column("models", sa.JSON()),
    )
    device = sa.table("device", sa.column("id", sa.String()), sa.column("hardware_id", sa.String()))
    since = datetime.now(UTC) - timedelta(days=1)
    conn = op.get_bind()
    rows = conn.execute(
        sa.select(batches.c.received_at, device.c.hardware_id, batches.c.models)
        .join(device, device.c.id == batches.c.device_id)
        .where(batches.c.received_at >= since)
    )
    sums = batch_sums((t, hw, models) for t, hw, models in rows)
    if sums:
        minutes = sa.table(
            "telemetryminute",
            *(sa.column(c) for c in ("sha256", "hardware_id", "minute", "inferences", "errors")),
            *(sa.column(c) for c in ("labels", "labels_correct")),
            sa.column("latency_buckets", sa.JSON()),
            sa.column("output_hist", sa.JSON()),
        )
        conn.execute(
            minutes.insert(),
            [
                {
                    "sha256": sha,
                    "hardware_id": hw,
                    "minute": minute,
                    "inferences": s.inferences,
                    "errors": s.errors,
                    "labels": s.labels,
                    "labels_correct": s.labels_correct,
                    "latency_buckets": columns(s.latency),
                    "output_hist": columns(s.output),
                }
                for (sha, hw, minute), s in sums.items()
            ],
        )


def downgrade() -> None:
    op.drop_table("telemetryminute")
