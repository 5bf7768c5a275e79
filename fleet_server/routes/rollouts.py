"""``/api/v1/rollouts``: create staged rollouts, read their status, and the operator's actions on them.

Rollout changes take this process's rollout lock (the engine ticker applies
plans under it) and, for actions, the rollout's row lock, so an operator's
pause never interleaves with a tick on another replica.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query, Request
from sqlmodel import Session, select

from fleet_server import deltas, releases
from fleet_server.context import ServerContext
from fleet_server.lifecycle import DeviceRolloutState, RolloutState
from fleet_server.models import Model, RolloutDecision, RolloutDevice, utcnow
from fleet_server.paging import DEFAULT_LIMIT
from fleet_server.rollouts import (
    create_rollout,
    find_rollout,
    list_rollouts,
    operator_action,
    rollout_decisions,
    rollout_devices,
    rollout_status,
    rollout_statuses,
)
from fleet_server.routes.common import OPERATOR, Ctx, Cursor, Db, Limit, admin_router, page_out
from fleet_server.routes.errors import error_responses
from fleet_server.schemas import (
    DecisionOut,
    DecisionPage,
    RolloutDeviceOut,
    RolloutDevicePage,
    RolloutIn,
    RolloutOut,
    RolloutPage,
)
from fleet_server.slos import check_budget_policy

router = admin_router(tags=["rollouts"])

RolloutId = Annotated[str, Path(description="the rollout's id", examples=["3f9a1c2b7d4e"])]


@router.post(
    "/rollouts",
    summary="Start a staged rollout",
    status_code=201,
    response_model=RolloutOut,
    responses=error_responses(404, 409, 413, 422),
    dependencies=OPERATOR,
)
def post_rollout(body: RolloutIn, request: Request, c: Ctx, session: Db) -> RolloutOut:
    """Target the devices the selector picks (and the model's hardware ids allow), then assign them
    stage by stage under the policy's gates. 404 ``model_not_found``, 400 ``no_matching_devices``,
    409 ``rollout_conflict`` when targeted devices are in another active rollout, 409
    ``error_budget_spent`` when an SLO of the model has spent its budget and neither an override
    holds nor the rollout goes back to an older release (docs/slo.md)."""
    name, version = body.model.split(":", 1)
    model = session.exec(select(Model).where(Model.name == name, Model.version == version)).first()
    if model is not None:
        override = check_budget_policy(session, model, utcnow())
        if override is not None:
            request.state.audit_detail = f"error budget spent, override {override.id}: {override.reason}"
    if model is not None:
        # deltas from what the selected devices run, before the rollout exists: its first devices
        # are told to install on the next tick and look for them at once (CPU-bound: outside the lock)
        selector = body.selector.model_dump()
        built = deltas.build_quietly(
            releases.delta_dir(c), model, lambda: deltas.selected_bases(session, model, selector)
        )
        if c.publisher is not None and any(b.kept for b in built):
            # mirrors hold only what was published: devices that install from them look there
            c.publisher.publish_quietly()
    with c.lock:
        rollout = create_rollout(session, body)
        session.commit()
    if c.ticker is not None:
        c.ticker.wake()  # its first stage is assigned now, not at the next interval
    return rollout_status(session, rollout)


@router.get("/rollouts", response_model=RolloutPage, summary="List rollouts")
def get_rollouts(
    session: Db,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
    state: Annotated[RolloutState | None, Query(description="only rollouts in this state")] = None,
    model: Annotated[
        str | None,
        Query(pattern=r"^[^:]+:.+$", max_length=256, description="only rollouts of this model, name:version"),
    ] = None,
) -> RolloutPage:
    """Rollouts with their status, oldest first, a page at a time."""
    rows = list_rollouts(session, state, model, cursor=cursor, limit=limit)
    outs = {out.id: out for out in rollout_statuses(session, rows.items)}
    return page_out(RolloutPage, rows, lambda r: outs[r.id])


@router.get(
    "/rollouts/{rollout_id}",
    response_model=RolloutOut,
    responses=error_responses(404),
    summary="Get a rollout's status",
)
def get_rollout(
    rollout_id: RolloutId,
    session: Db,
    devices: Annotated[
        bool,
        Query(
            description="false: leave the per-device maps (devices, device_reasons) empty; the stage"
            " counts stay. What a poller of a 10,000-device rollout wants several times a second"
        ),
    ] = True,
) -> RolloutOut:
    """Its stages with counts, every targeted device's state and every decision with its figures."""
    return rollout_status(session, find_rollout(session, rollout_id), with_devices=devices)


def rollout_device_out(rd: RolloutDevice) -> RolloutDeviceOut:
    return RolloutDeviceOut.model_validate(rd, from_attributes=True)


@router.get(
    "/rollouts/{rollout_id}/devices",
    response_model=RolloutDevicePage,
    responses=error_responses(404),
    summary="List a rollout's devices",
)
def get_rollout_devices(
    rollout_id: RolloutId,
    session: Db,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
    state: Annotated[
        DeviceRolloutState | None, Query(description="only devices in this state in the rollout")
    ] = None,
) -> RolloutDevicePage:
    """The rollout's targeted devices by id, with their stage, state and reason, a page at a time."""
    rows = rollout_devices(session, find_rollout(session, rollout_id), state, cursor=cursor, limit=limit)
    return page_out(RolloutDevicePage, rows, rollout_device_out)


def decision_out(d: RolloutDecision) -> DecisionOut:
    return DecisionOut.model_validate(d, from_attributes=True)


@router.get(
    "/rollouts/{rollout_id}/decisions",
    response_model=DecisionPage,
    responses=error_responses(404),
    summary="List a rollout's decisions",
)
def get_rollout_decisions(
    rollout_id: RolloutId,
    session: Db,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
    action: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=64,
            description="only decisions of this action, e.g. next_stage, roll_back, pause, joined",
        ),
    ] = None,
) -> DecisionPage:
    """The engine's and operators' decisions on the rollout with their figures, oldest first."""
    rows = rollout_decisions(session, find_rollout(session, rollout_id), action, cursor=cursor, limit=limit)
    return page_out(DecisionPage, rows, decision_out)


def _act(rollout_id: str, action: str, c: ServerContext, session: Session) -> RolloutOut:
    with c.lock:  # this process's ticker; other replicas' wait on the row lock below
        rollout = operator_action(session, find_rollout(session, rollout_id, for_update=True), action)
        session.commit()
    if c.ticker is not None:
        c.ticker.wake()  # the engine carries the action out (a resume, an approval, a roll back) now
    return rollout_status(session, rollout)


ACTION_ERRORS = error_responses(404, 409)


@router.post(
    "/rollouts/{rollout_id}/pause",
    summary="Pause a rollout",
    response_model=RolloutOut,
    responses=ACTION_ERRORS,
    dependencies=OPERATOR,
)
def pause_rollout(rollout_id: RolloutId, c: Ctx, session: Db) -> RolloutOut:
    """No new devices are notified until it is resumed or approved (repeated: no-op)."""
    return _act(rollout_id, "pause", c, session)


@router.post(
    "/rollouts/{rollout_id}/resume",
    summary="Resume a paused rollout",
    response_model=RolloutOut,
    responses=ACTION_ERRORS,
    dependencies=OPERATOR,
)
def resume_rollout(rollout_id: RolloutId, c: Ctx, session: Db) -> RolloutOut:
    """Go on notifying devices where the rollout paused (repeated: no-op). Its devices that failed
    because they could not fetch the release (a delivery failure class) are sent it again, with the
    delivery retries anew, and the held devices of their paused hardware class are released."""
    return _act(rollout_id, "resume", c, session)


@router.post(
    "/rollouts/{rollout_id}/abort",
    summary="Abort a rollout",
    response_model=RolloutOut,
    responses=ACTION_ERRORS,
    dependencies=OPERATOR,
)
def abort_rollout(rollout_id: RolloutId, c: Ctx, session: Db) -> RolloutOut:
    """Nothing more is sent; devices keep what they run (repeated: no-op)."""
    return _act(rollout_id, "abort", c, session)


@router.post(
    "/rollouts/{rollout_id}/approve",
    summary="Approve a rollout's current stage",
    response_model=RolloutOut,
    responses=ACTION_ERRORS,
    dependencies=OPERATOR,
)
def approve_rollout(rollout_id: RolloutId, c: Ctx, session: Db) -> RolloutOut:
    """Accept the current stage: passes the manual gate, or overrides a gate that paused the rollout."""
    return _act(rollout_id, "approve", c, session)


@router.post(
    "/rollouts/{rollout_id}/rollback",
    summary="Roll a rollout back",
    response_model=RolloutOut,
    responses=ACTION_ERRORS,
    dependencies=OPERATOR,
)
def rollback_rollout(rollout_id: RolloutId, c: Ctx, session: Db) -> RolloutOut:
    """Send every device that got this rollout's model back to the model it ran before (any state)."""
    return _act(rollout_id, "rollback", c, session)
