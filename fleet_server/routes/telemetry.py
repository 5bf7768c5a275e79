"""``/api/v1/telemetry`` and ``/api/v1/rollouts/{id}/telemetry``: what the gates read, for people."""

from __future__ import annotations

from fleet_server.aggregates import telemetry_aggregates
from fleet_server.routes.common import Db, admin_router
from fleet_server.routes.errors import error_responses
from fleet_server.routes.rollouts import find_rollout
from fleet_server.schemas import AggregateOut

router = admin_router(tags=["telemetry"])


@router.get(
    "/rollouts/{rollout_id}/telemetry", response_model=list[AggregateOut], responses=error_responses(404)
)
def rollout_telemetry(rollout_id: str, session: Db) -> list[AggregateOut]:
    """The rollout's devices' telemetry per model, stage and hardware id (what its gates read)."""
    return telemetry_aggregates(session, rollout=find_rollout(session, rollout_id))


@router.get("/telemetry", response_model=list[AggregateOut], responses=error_responses(404))
def telemetry(session: Db, model: str | None = None, hardware_id: str | None = None) -> list[AggregateOut]:
    """Telemetry per model version and device class (hardware id); ``model`` is name:version or a sha256."""
    return telemetry_aggregates(session, model=model, hardware_id=hardware_id)
