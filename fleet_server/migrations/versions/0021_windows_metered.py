"""maintenance windows and metered links: a rollout device's timeout clock may restart when it
stops waiting (``rolloutdevice.timeout_from``), and an event carries the bytes its install fetched
(``event.bytes_fetched``), summed per rollout

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-06 16:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from fleet_server.models import UTCDateTime

revision: str = "0021"
down_revision: str | None = "0020"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("rolloutdevice", schema=None) as batch_op:
        batch_op.add_column(sa.Column("timeout_from", UTCDateTime(timezone=True), nullable=True))
    with op.batch_alter_table("eventrow", schema=None) as batch_op:
        batch_op.add_column(sa.Column("bytes_fetched", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("eventrow", schema=None) as batch_op:
        batch_op.drop_column("bytes_fetched")
    with op.batch_alter_table("rolloutdevice", schema=None) as batch_op:
        batch_op.drop_column("timeout_from")
