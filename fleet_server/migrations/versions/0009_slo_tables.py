"""service level objectives: the SLOs, their sampled totals, alerts and their delivery log, planned-rollout
windows that hold notifications, and error-budget overrides

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-06 10:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

from fleet_server.models import UTCDateTime

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "alertdelivery",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("alert_id", AutoString(length=300), nullable=False),
        sa.Column("status", AutoString(length=16), nullable=False),
        sa.Column("receiver", AutoString(length=512), nullable=False),
        sa.Column("payload", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("next_attempt_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("last_error", AutoString(length=512), nullable=False),
        sa.Column("gave_up", sa.Boolean(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("alertdelivery", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_alertdelivery_alert_id"), ["alert_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_alertdelivery_next_attempt_at"), ["next_attempt_at"], unique=False
        )

    op.create_table(
        "budgetoverride",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", AutoString(length=128), nullable=False),
        sa.Column("reason", AutoString(length=512), nullable=False),
        sa.Column("actor", AutoString(length=160), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("expires_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("budgetoverride", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_budgetoverride_model"), ["model"], unique=False)

    op.create_table(
        "plannedwindow",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model", AutoString(length=128), nullable=False),
        sa.Column("hardware_id", AutoString(length=128), nullable=True),
        sa.Column("starts", UTCDateTime(timezone=True), nullable=False),
        sa.Column("ends", UTCDateTime(timezone=True), nullable=False),
        sa.Column("reason", AutoString(length=512), nullable=False),
        sa.Column("created_by", AutoString(length=160), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("plannedwindow", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_plannedwindow_model"), ["model"], unique=False)

    op.create_table(
        "slo",
        sa.Column("name", AutoString(length=64), nullable=False),
        sa.Column("model", AutoString(length=128), nullable=False),
        sa.Column("hardware_id", AutoString(length=128), nullable=True),
        sa.Column("spec", sa.JSON(), nullable=False),
        sa.Column("created_at", UTCDateTime(timezone=True), nullable=False),
        sa.Column("created_by", AutoString(length=160), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )
    with op.batch_alter_table("slo", schema=None) as batch_op:
        batch_op.create_index("ix_slo_created_at_name", ["created_at", "name"], unique=False)
        batch_op.create_index(batch_op.f("ix_slo_model"), ["model"], unique=False)

    op.create_table(
        "sloalert",
        sa.Column("id", AutoString(length=300), nullable=False),
        sa.Column("model", AutoString(length=128), nullable=False),
        sa.Column("hardware_id", AutoString(length=128), nullable=False),
        sa.Column("severity", AutoString(length=16), nullable=False),
        sa.Column("state", AutoString(length=16), nullable=False),
        sa.Column("since", UTCDateTime(timezone=True), nullable=False),
        sa.Column("fired_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("resolved_at", UTCDateTime(timezone=True), nullable=True),
        sa.Column("causes", sa.JSON(), nullable=False),
        sa.Column("silenced", sa.Boolean(), nullable=False),
        sa.Column("notified", sa.Boolean(), nullable=False),
        sa.Column("updated_at", UTCDateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("sloalert", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_sloalert_state"), ["state"], unique=False)

    op.create_table(
        "slosample",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("slo", AutoString(length=64), nullable=False),
        sa.Column("t", UTCDateTime(timezone=True), nullable=False),
        sa.Column("totals", sa.JSON(), nullable=False),
        sa.Column("drift_bad", sa.Integer(), nullable=False),
        sa.Column("drift_steps", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["slo"],
            ["slo.name"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("slo", "t", name="uq_slo_sample"),
    )


def downgrade() -> None:
    op.drop_table("slosample")
    with op.batch_alter_table("sloalert", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_sloalert_state"))

    op.drop_table("sloalert")
    with op.batch_alter_table("slo", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_slo_model"))
        batch_op.drop_index("ix_slo_created_at_name")

    op.drop_table("slo")
    with op.batch_alter_table("plannedwindow", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_plannedwindow_model"))

    op.drop_table("plannedwindow")
    with op.batch_alter_table("budgetoverride", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_budgetoverride_model"))

    op.drop_table("budgetoverride")
    with op.batch_alter_table("alertdelivery", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_alertdelivery_next_attempt_at"))
        batch_op.drop_index(batch_op.f("ix_alertdelivery_alert_id"))

    op.drop_table("alertdelivery")
