"""per (device, model): each input's sampled values counted per bucket of its calibration range
(``INPUT_BUCKETS``), summed like the input checks, for the debug dashboard's input distributions

Revision ID: 0013
Revises: 0011
Create Date: 2026-12-06 14:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("modelaggregate", schema=None) as batch_op:
        batch_op.add_column(sa.Column("input_buckets", sa.JSON(), nullable=False, server_default="{}"))


def downgrade() -> None:
    with op.batch_alter_table("modelaggregate", schema=None) as batch_op:
        batch_op.drop_column("input_buckets")
