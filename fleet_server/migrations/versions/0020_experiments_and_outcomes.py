"""A/B experiments (their arms, devices and decisions) and the apps' outcome metrics per (device,
model hash)

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-06 16:30:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

from fleet_server.models import UTCDateTime

revision: str = "0020"
down_revision: str | None = "0019"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "experiment",
        sa.Column("id", AutoString(length=32), nullable=False),
        sa.Column("name", AutoString(length=128), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("control", AutoString(length=64), nullable=False),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("policy", sa.JSON(), nullable=False),
        sa.Column("auto_promote", sa.Boolean(), nullable=False),
        sa.Column("state", AutoString(length=16), nullable=False),
        sa.Column("reason", AutoString(length=1024), nullable=False),
        sa.Column("decision", sa.JSON(), nullable=False),
        sa.Column("promoted_rollout_id", AutoString(length=32), nullable=True),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("experiment", schema=None) as batch_op:
        batch_op.create_index("ix_experiment_created_at_id", ["created_at", "id"], unique=False)
        batch_op.create_index(batch_op.f("ix_experiment_state"), ["state"], unique=False)

    op.create_table(
        "experimentarm",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", AutoString(length=32), nullable=False),
        sa.Column("name", AutoString(length=64), nullable=False),
        sa.Column("model_id", sa.Integer(), nullable=False),
        sa.Column("model_ref", AutoString(length=256), nullable=False),
        sa.Column("model_sha256", AutoString(length=64), nullable=False),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("state", AutoString(length=16), nullable=False),
        sa.Column("reason", AutoString(length=1024), nullable=False),
        sa.Column("rollout_id", AutoString(length=32), nullable=True),
        sa.Column("return_rollout_id", AutoString(length=32), nullable=True),
        sa.Column("stopped_at", UTCDateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiment.id"]),
        sa.ForeignKeyConstraint(["model_id"], ["model.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("experiment_id", "name", name="uq_experiment_arm"),
    )
    with op.batch_alter_table("experimentarm", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_experimentarm_experiment_id"), ["experiment_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_experimentarm_rollout_id"), ["rollout_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_experimentarm_return_rollout_id"), ["return_rollout_id"], unique=False
        )

    op.create_table(
        "experimentdevice",
        sa.Column("experiment_id", AutoString(length=32), nullable=False),
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("arm", AutoString(length=64), nullable=False),
        sa.Column("hardware_id", AutoString(length=128), nullable=False),
        sa.Column("start", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiment.id"]),
        sa.PrimaryKeyConstraint("experiment_id", "device_id"),
    )
    with op.batch_alter_table("experimentdevice", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_experimentdevice_device_id"), ["device_id"], unique=False)

    op.create_table(
        "experimentdecision",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("experiment_id", AutoString(length=32), nullable=False),
        sa.Column("ts", UTCDateTime(timezone=True), nullable=False),
        sa.Column("action", AutoString(length=64), nullable=False),
        sa.Column("reason", AutoString(length=1024), nullable=False),
        sa.Column("figures", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["experiment_id"], ["experiment.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("experimentdecision", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_experimentdecision_experiment_id"), ["experiment_id"], unique=False
        )

    op.create_table(
        "outcomeaggregate",
        sa.Column("device_id", AutoString(length=128), nullable=False),
        sa.Column("sha256", AutoString(length=64), nullable=False),
        sa.Column("metric", AutoString(length=64), nullable=False),
        sa.Column("n", sa.BigInteger(), nullable=False),
        sa.Column("total", sa.Float(), nullable=False),
        sa.Column("total_sq", sa.Float(), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("device_id", "sha256", "metric"),
    )


def downgrade() -> None:
    op.drop_table("outcomeaggregate")
    op.drop_table("experimentdecision")
    op.drop_table("experimentdevice")
    op.drop_table("experimentarm")
    op.drop_table("experiment")
