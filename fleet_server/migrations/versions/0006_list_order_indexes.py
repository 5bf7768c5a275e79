"""rollouts and API tokens are listed oldest first, a page at a time, on the key (created_at, id):
an index on that key makes each page an index range scan

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 08:00:00
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_rollout_created_at_id", "rollout", ["created_at", "id"], unique=False)
    op.create_index("ix_apitoken_created_at_id", "apitoken", ["created_at", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_apitoken_created_at_id", table_name="apitoken")
    op.drop_index("ix_rollout_created_at_id", table_name="rollout")
