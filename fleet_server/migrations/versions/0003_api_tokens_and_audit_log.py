"""api tokens (hashed, with roles) and the append-only audit log

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27 06:20:00
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlmodel.sql.sqltypes import AutoString

from fleet_server.models import UTCDateTime

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "apitoken",
        sa.Column("id", AutoString(length=32), nullable=False),
        sa.Column("name", AutoString(length=128), nullable=False),
        sa.Column("role", AutoString(length=16), nullable=False),
        sa.Column("token_hash", AutoString(length=64), nullable=False),
        sa.Column("created_at", UTCDateTime(), nullable=False),
        sa.Column("created_by", AutoString(length=160), nullable=False),
        sa.Column("revoked_at", UTCDateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_apitoken_token_hash"), "apitoken", ["token_hash"], unique=True)
    op.create_table(
        "auditentry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("ts", UTCDateTime(), nullable=False),
        sa.Column("actor", AutoString(length=160), nullable=False),
        sa.Column("role", AutoString(length=16), nullable=False),
        sa.Column("method", AutoString(length=8), nullable=False),
        sa.Column("path", AutoString(length=512), nullable=False),
        sa.Column("status", sa.Integer(), nullable=False),
        sa.Column("result", AutoString(length=64), nullable=False),
        sa.Column("detail", AutoString(length=512), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    op.create_index(op.f("ix_auditentry_ts"), "auditentry", ["ts"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_auditentry_ts"), table_name="auditentry")
    op.drop_table("auditentry")
    op.drop_index(op.f("ix_apitoken_token_hash"), table_name="apitoken")
    op.drop_table("apitoken")
