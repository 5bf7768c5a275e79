"""events looked up by (device, directive seq): one composite index instead of one per column

The ticker joins every rollout device to its events on (device_id, seq). With
an index on each column alone, SQLite picked ``seq``, which every device of a
rollout shares, so each tick read every event of the rollout once per device:
quadratic in the fleet (at 1,000 devices a third of the server's CPU). The
composite index answers each device's lookup directly, and its ``device_id``
prefix serves the queries by device alone.

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-06 16:10:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0022"
down_revision: str | None = "0021"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("eventrow", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_eventrow_seq"))
        batch_op.drop_index(batch_op.f("ix_eventrow_device_id"))
        batch_op.create_index("ix_eventrow_device_seq", ["device_id", "seq"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("eventrow", schema=None) as batch_op:
        batch_op.drop_index("ix_eventrow_device_seq")
        batch_op.create_index(batch_op.f("ix_eventrow_device_id"), ["device_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_eventrow_seq"), ["seq"], unique=False)
