"""device clock offset (device timestamp minus server receive time: informational, never decides);
telemetry batch rows lose their device_id index, which the unique (device_id, batch_id) key covers
(one index less to maintain per stored batch)

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-28 08:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from fleet_server.models import UTCDateTime

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.add_column(sa.Column("clock_offset_seconds", sa.Float(), nullable=True))
        batch_op.add_column(sa.Column("clock_offset_at", UTCDateTime(timezone=True), nullable=True))
    with op.batch_alter_table("telemetrybatchrow", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_telemetrybatchrow_device_id"))


def downgrade() -> None:
    with op.batch_alter_table("telemetrybatchrow", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_telemetrybatchrow_device_id"), ["device_id"], unique=False)
    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_column("clock_offset_at")
        batch_op.drop_column("clock_offset_seconds")
