"""ground truth from the field on the server: labels keyed by (inference_id, source), captured
inference batches a device uploaded and one index row per captured inference (attributed to model,
hardware cohort and rollout stage), for the label join and dataset exports

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-12 08:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

from fleet_server.models import UTCDateTime

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "label",
        sa.Column("inference_id", AutoString(length=36), nullable=False),
        sa.Column("source", AutoString(length=64), nullable=False),
        sa.Column("label", sa.JSON(), nullable=False),
        sa.Column("label_time", UTCDateTime(timezone=True), nullable=False),
        sa.Column("received_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("inference_id", "source"),
    )
    op.create_table(
        "capturebatch",
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("batch_id", AutoString(length=64), nullable=False),
        sa.Column("body_sha256", AutoString(length=64), nullable=False),
        sa.Column("model_sha256", AutoString(length=64), nullable=False),
        sa.Column("hardware_id", AutoString(length=128), nullable=False),
        sa.Column("rollout_id", AutoString(length=32), nullable=True),
        sa.Column("stage", sa.Integer(), nullable=True),
        sa.Column("items", sa.Integer(), nullable=False),
        sa.Column("path", AutoString(length=512), nullable=False),
        sa.Column("first_ts", UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_ts", UTCDateTime(timezone=True), nullable=True),
        sa.Column("received_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "batch_id"),
    )
    op.create_index("ix_capturebatch_model_sha256", "capturebatch", ["model_sha256"], unique=False)
    op.create_table(
        "captureitem",
        sa.Column("inference_id", AutoString(length=36), nullable=False),
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("batch_id", AutoString(length=64), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("model_sha256", AutoString(length=64), nullable=False),
        sa.Column("hardware_id", AutoString(length=128), nullable=False),
        sa.Column("rollout_id", AutoString(length=32), nullable=True),
        sa.Column("stage", sa.Integer(), nullable=True),
        sa.Column("ts", UTCDateTime(timezone=True), nullable=False),
        sa.Column("predicted", AutoString(length=64), nullable=True),
        sa.PrimaryKeyConstraint("inference_id"),
    )
    op.create_index("ix_captureitem_model_ts", "captureitem", ["model_sha256", "ts"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_captureitem_model_ts", table_name="captureitem")
    op.drop_table("captureitem")
    op.drop_index("ix_capturebatch_model_sha256", table_name="capturebatch")
    op.drop_table("capturebatch")
    op.drop_table("label")
