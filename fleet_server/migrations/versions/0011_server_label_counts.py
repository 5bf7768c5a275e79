"""labels posted to the server that met a captured prediction, counted per model hash and hardware
cohort, with the right ones: the accuracy SLI reads them next to the devices' own label counts

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-06 13:10:00
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

from fleet_server.models import UTCDateTime
from fleet_server.server_label_counts import add_counts, tally

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "serverlabelcount",
        sa.Column("model_sha256", AutoString(length=64), nullable=False),
        sa.Column("hardware_id", AutoString(length=128), nullable=False),
        sa.Column("labels", sa.Integer(), nullable=False),
        sa.Column("labels_correct", sa.Integer(), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("model_sha256", "hardware_id"),
    )
    # the labels that met their capture before this table existed, counted once as ingest counts them
    conn = op.get_bind()
    rows = conn.execute(
        sa.text(
            "SELECT c.model_sha256, c.hardware_id, CAST(l.label AS TEXT), c.predicted FROM label l"
            " JOIN captureitem c ON c.inference_id = l.inference_id WHERE c.predicted IS NOT NULL"
        )
    )
    counts = tally((sha, hw, json.loads(label), predicted) for sha, hw, label, predicted in rows)
    add_counts(conn, counts, datetime.now(UTC))


def downgrade() -> None:
    op.drop_table("serverlabelcount")
