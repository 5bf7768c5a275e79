"""events carry the agent's id for them: a resent event is stored once

An agent keeps the events the broker could not take while it was away and
sends them when it is back; an event whose acknowledgement was lost is sent
again. ``event_id`` (unique per device, NULL for agents that predate it) with a
unique key on (device_id, event_id) lets the ingest store each event once.

Revision ID: 0023
Revises: 0022
Create Date: 2026-12-07 17:40:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

revision: str = "0023"
down_revision: str | None = "0022"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("eventrow", schema=None) as batch_op:
        batch_op.add_column(sa.Column("event_id", AutoString(length=64), nullable=True))
        batch_op.create_unique_constraint("uq_eventrow_device_event", ["device_id", "event_id"])


def downgrade() -> None:
    with op.batch_alter_table("eventrow", schema=None) as batch_op:
        batch_op.drop_constraint("uq_eventrow_device_event", type_="unique")
        batch_op.drop_column("event_id")
