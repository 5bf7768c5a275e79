"""``/api/v1/telemetry`` and ``/api/v1/rollouts/{id}/telemetry``: what the gates read, for people.

The aggregates are groups (model x hardware id x stage) summed from the
per-device totals; there are few of them, so a page is cut from the sorted
groups rather than from an index.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from fleet_server.aggregates import telemetry_aggregates
from fleet_server.paging import DEFAULT_LIMIT, Key, list_page
from fleet_server.rollouts import find_rollout
from fleet_server.routes.common import Cursor, Db, Limit, admin_router, page_out
from fleet_server.routes.errors import error_responses
from fleet_server.routes.rollouts import RolloutId
from fleet_server.schemas import AggregateOut, AggregatePage

router = admin_router(tags=["telemetry"])

GROUP_KEY = (str, str, int)


def _group(a: AggregateOut) -> Key:
    return (a.sha256, a.hardware_id, -1 if a.stage is None else a.stage)


def _page(kind: str, rows: list[AggregateOut], cursor: str | None, limit: int) -> AggregatePage:
    return page_out(AggregatePage, list_page(kind, rows, _group, GROUP_KEY, cursor, limit), lambda a: a)


HardwareQuery = Annotated[
    str | None, Query(min_length=1, max_length=128, description="only this device class", examples=["rpi4"])
]
ModelQuery = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=256,
        description="only this model: name:version or the model file's sha256 (404 for an unknown"
        " name:version)",
        examples=["face-det:7"],
    ),
]


@router.get(
    "/rollouts/{rollout_id}/telemetry",
    response_model=AggregatePage,
    responses=error_responses(404),
    summary="Telemetry of a rollout's devices",
)
def rollout_telemetry(
    rollout_id: RolloutId,
    session: Db,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
    model: ModelQuery = None,
    hardware_id: HardwareQuery = None,
) -> AggregatePage:
    """The rollout's devices' telemetry per model, stage and hardware id (what its gates read)."""
    rollout = find_rollout(session, rollout_id)
    rows = telemetry_aggregates(session, model=model, hardware_id=hardware_id, rollout=rollout)
    return _page("rollout-telemetry", rows, cursor, limit)


@router.get(
    "/telemetry", response_model=AggregatePage, responses=error_responses(404), summary="Telemetry per model"
)
def telemetry(
    session: Db,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
    model: ModelQuery = None,
    hardware_id: HardwareQuery = None,
) -> AggregatePage:
    """Telemetry per model version and device class (hardware id), over every device."""
    rows = telemetry_aggregates(session, model=model, hardware_id=hardware_id)
    return _page("telemetry", rows, cursor, limit)
