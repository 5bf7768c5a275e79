"""stored rollout policies take the policy model's shape: the agent-side probation nested as one
object (``probation: {seconds, min_inferences, max_error_rate, max_latency_ratio}`` or null)
instead of four ``probation_*`` keys; retry limits keyed on a failure class no agent reports
(they could never match) are removed, each removal recorded as a decision of its rollout

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 09:00:00
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

from fleet_server.models import UTCDateTime
from fleet_server.policy import ANY_FAILURE, FAILURE_CLASSES

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

FLAT = {
    "probation_seconds": "seconds",
    "probation_min_inferences": "min_inferences",
    "probation_max_error_rate": "max_error_rate",
    "probation_max_latency_ratio": "max_latency_ratio",
}

rollout = sa.table("rollout", sa.column("id", sa.String), sa.column("policy", sa.JSON))
decision = sa.table(
    "rolloutdecision",
    sa.column("rollout_id", sa.String),
    sa.column("ts", UTCDateTime(timezone=True)),
    sa.column("action", sa.String),
    sa.column("reason", sa.String),
    sa.column("figures", sa.JSON),
)


def _nested(policy: dict[str, Any]) -> dict[str, Any]:
    flat = {FLAT[k]: policy.pop(k) for k in list(policy) if k in FLAT}
    if flat:  # a policy stored before probation was nested (a row without any of the keys has none)
        seconds = flat.get("seconds")
        policy["probation"] = None if seconds is None else flat
    return policy


def _flat(policy: dict[str, Any]) -> dict[str, Any]:
    if "probation" in policy:
        probation = policy.pop("probation") or {"seconds": None}
        policy.update({k: probation[v] for k, v in FLAT.items() if v in probation})
    return policy


def upgrade() -> None:
    conn = op.get_bind()
    now = datetime.now(UTC)
    for rollout_id, stored in conn.execute(sa.select(rollout.c.id, rollout.c.policy)).all():
        policy = _nested(dict(stored or {}))
        limits = dict(policy.get("retry_limits") or {})
        unknown = sorted(set(limits) - FAILURE_CLASSES - {ANY_FAILURE})
        if unknown:
            policy["retry_limits"] = {k: v for k, v in limits.items() if k not in unknown}
            conn.execute(
                decision.insert().values(
                    rollout_id=rollout_id,
                    ts=now,
                    action="policy_migrated",
                    reason=f"retry limits for unknown failure class(es) {', '.join(map(repr, unknown))}"
                    " removed: no device reports such a class, so they never applied",
                    figures={"removed_retry_limits": {k: limits[k] for k in unknown}},
                )
            )
        if policy != (stored or {}):
            conn.execute(rollout.update().where(rollout.c.id == rollout_id).values(policy=policy))


def downgrade() -> None:
    conn = op.get_bind()
    for rollout_id, stored in conn.execute(sa.select(rollout.c.id, rollout.c.policy)).all():
        policy = _flat(dict(stored or {}))
        if policy != (stored or {}):
            conn.execute(rollout.update().where(rollout.c.id == rollout_id).values(policy=policy))
