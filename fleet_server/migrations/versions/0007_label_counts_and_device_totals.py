"""ground truth and availability per (device, model): labels, correct labels, the confusion counts,
label delays, absolute label error, local API requests and their errors, input checks, CPU time and
captured inferences; per device, what a batch counts for the device as a whole (unmatched labels,
evicted captures, batches dropped offline)

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-10 08:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

from fleet_server.models import UTCDateTime

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COUNTS = ("labels", "labels_correct", "requests", "captured")
_SUMS = ("label_abs_error_sum", "cpu_ms")
_JSON = (("confusion", "{}"), ("label_delay_buckets", "[]"), ("request_errors", "{}"), ("input_checks", "{}"))


def upgrade() -> None:
    with op.batch_alter_table("modelaggregate", schema=None) as batch_op:
        for name in _COUNTS:
            batch_op.add_column(sa.Column(name, sa.Integer(), nullable=False, server_default="0"))
        for name in _SUMS:
            batch_op.add_column(sa.Column(name, sa.Float(), nullable=False, server_default="0"))
        for name, empty in _JSON:
            batch_op.add_column(sa.Column(name, sa.JSON(), nullable=False, server_default=empty))
    op.create_table(
        "devicetotals",
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("labels_unmatched", sa.JSON(), nullable=False),
        sa.Column("capture_evicted", sa.Integer(), nullable=False),
        sa.Column("dropped_batches", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id"),
    )


def downgrade() -> None:
    op.drop_table("devicetotals")
    with op.batch_alter_table("modelaggregate", schema=None) as batch_op:
        for name, _ in reversed(_JSON):
            batch_op.drop_column(name)
        for name in reversed(_SUMS):
            batch_op.drop_column(name)
        for name in reversed(_COUNTS):
            batch_op.drop_column(name)
