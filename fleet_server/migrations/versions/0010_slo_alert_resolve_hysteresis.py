"""an SLO alert resolves only after its rules' short window without a breach: when it last went
clear, and how long it must stay clear

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06 10:50:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from fleet_server.models import UTCDateTime

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("sloalert", schema=None) as batch_op:
        batch_op.add_column(sa.Column("clear_since", UTCDateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("quiet_s", sa.Float(), nullable=False, server_default="0"))


def downgrade() -> None:
    with op.batch_alter_table("sloalert", schema=None) as batch_op:
        batch_op.drop_column("quiet_s")
        batch_op.drop_column("clear_since")
