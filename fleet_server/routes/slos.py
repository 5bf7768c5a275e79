"""``/api/v1/slos``, ``/api/v1/alerts``, ``/api/v1/planned-windows`` and the error-budget override.

SLOs are created by operators and read by anyone with a token; an SLO's status
is evaluated from its stored samples at the request, on any replica. Overriding
a spent budget needs an admin and a reason, which the audit log keeps.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Path, Query, Request

from fleet_server import slos
from fleet_server.auth import Principal, require
from fleet_server.models import AlertDelivery, BudgetOverride, PlannedWindow, SloAlert
from fleet_server.paging import DEFAULT_LIMIT
from fleet_server.routes.common import Cursor, Db, Limit, admin_router, page_out
from fleet_server.routes.errors import error_responses
from fleet_server.slo_schemas import (
    AlertOut,
    AlertPage,
    DeliveryOut,
    DeliveryPage,
    OverrideIn,
    OverrideOut,
    PlannedWindowIn,
    PlannedWindowOut,
    PlannedWindowPage,
    SloIn,
    SloOut,
    SloPage,
    SloStatusOut,
)

router = admin_router(tags=["slos"])

Operator = Annotated[Principal, Depends(require("operator"))]
Admin = Annotated[Principal, Depends(require("admin"))]
SloName = Annotated[
    str, Path(description="the SLO's name", max_length=64, examples=["face-det-availability"])
]
ModelFilter = Annotated[str | None, Query(max_length=128, description="only this model's (its name)")]


@router.post(
    "/slos",
    status_code=201,
    response_model=SloOut,
    responses=error_responses(409, 413, 422),
    summary="Create an SLO",
)
def post_slo(body: SloIn, request: Request, session: Db, who: Operator) -> SloOut:
    """Store an SLO; the leader samples and evaluates it from then on. 409 ``slo_exists``, 422
    ``invalid_slo`` naming what is wrong (a target outside (0, 1), a missing threshold, ...)."""
    row = slos.create_slo(session, body, who.actor)
    session.commit()
    request.state.audit_detail = f"slo {row.name} ({row.model}, {row.hardware_id or 'every cohort'})"
    return slos.slo_out(row)


@router.get("/slos", response_model=SloPage, summary="List SLOs")
def get_slos(
    session: Db, model: ModelFilter = None, cursor: Cursor = None, limit: Limit = DEFAULT_LIMIT
) -> SloPage:
    """SLOs, oldest first, a page at a time."""
    return page_out(SloPage, slos.list_slos(session, model, cursor=cursor, limit=limit), slos.slo_out)


@router.get("/slos/{name}", response_model=SloOut, responses=error_responses(404), summary="Get an SLO")
def get_slo(name: SloName, session: Db) -> SloOut:
    """One SLO with every default filled in (its rules, windows and minimum events)."""
    return slos.slo_out(slos.find_slo(session, name))


@router.get(
    "/slos/{name}/status",
    response_model=SloStatusOut,
    responses=error_responses(404),
    summary="An SLO's status",
)
def get_slo_status(name: SloName, session: Db) -> SloStatusOut:
    """Each objective's SLI over its window, the budget left, and every burn-rate rule's burn rates."""
    now = slos.now_utc()
    status, samples = slos.status_of(session, slos.find_slo(session, name), now)
    return slos.status_out(status, samples)


def alert_out(row: SloAlert) -> AlertOut:
    return AlertOut.model_validate(row, from_attributes=True)


@router.get("/alerts", response_model=AlertPage, summary="List SLO alerts")
def get_alerts(
    session: Db,
    state: Annotated[
        str | None, Query(pattern="^(pending|firing|resolved)$", description="only in this state")
    ] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
) -> AlertPage:
    """Alerts by id (model/cohort/severity): pending, firing, or resolved within the last day."""
    return page_out(AlertPage, slos.list_alerts(session, state, cursor=cursor, limit=limit), alert_out)


def delivery_out(row: AlertDelivery) -> DeliveryOut:
    return DeliveryOut.model_validate(row, from_attributes=True)


@router.get("/alerts/deliveries", response_model=DeliveryPage, summary="The alert delivery log")
def get_deliveries(
    session: Db,
    alert: Annotated[str | None, Query(max_length=300, description="only this alert's (its id)")] = None,
    cursor: Cursor = None,
    limit: Limit = DEFAULT_LIMIT,
) -> DeliveryPage:
    """Every notification to every receiver, oldest first: tries, last error, delivered or given up."""
    return page_out(
        DeliveryPage, slos.list_deliveries(session, alert, cursor=cursor, limit=limit), delivery_out
    )


def window_out(row: PlannedWindow) -> PlannedWindowOut:
    return PlannedWindowOut.model_validate(row, from_attributes=True)


@router.post(
    "/planned-windows",
    status_code=201,
    response_model=PlannedWindowOut,
    responses=error_responses(413, 422),
    summary="Declare a planned-rollout window",
)
def post_window(body: PlannedWindowIn, request: Request, session: Db, who: Operator) -> PlannedWindowOut:
    """The model's alerts are not notified during the window; one still firing at its end is."""
    row = slos.create_window(session, body, who.actor, slos.now_utc())
    session.commit()
    request.state.audit_detail = f"window {row.id} for {row.model}: {row.reason}"
    return window_out(row)


@router.get("/planned-windows", response_model=PlannedWindowPage, summary="List planned-rollout windows")
def get_windows(
    session: Db, model: ModelFilter = None, cursor: Cursor = None, limit: Limit = DEFAULT_LIMIT
) -> PlannedWindowPage:
    """Planned-rollout windows by id, past ones included."""
    return page_out(
        PlannedWindowPage, slos.list_windows(session, model, cursor=cursor, limit=limit), window_out
    )


def override_out(row: BudgetOverride) -> OverrideOut:
    return OverrideOut.model_validate(row, from_attributes=True)


@router.post(
    "/budget-overrides",
    status_code=201,
    response_model=OverrideOut,
    responses=error_responses(404, 413),
    summary="Override the error-budget policy",
)
def post_override(body: OverrideIn, request: Request, session: Db, who: Admin) -> OverrideOut:
    """Let new rollouts of a model whose budget is spent go ahead for ``hours``; the reason is
    kept here and in the audit log. 404 ``model_not_found``."""
    row = slos.create_override(session, body.model, body, who.actor, slos.now_utc())
    session.commit()
    request.state.audit_detail = f"budget override {row.id} for {body.model}: {body.reason}"
    return override_out(row)
