"""Creating rollouts, operator actions on them, and their status view.

The targeted devices are fixed at creation (selector AND the model's hardware
ids), which makes stage sizes stable and the one-active-rollout-per-device rule
a simple check against the devices of running/paused rollouts.
"""

from __future__ import annotations

import uuid

from sqlmodel import Session, col, select

from fleet_server.engine import assignment_order, stage_target
from fleet_server.errors import ApiError
from fleet_server.models import (
    Device,
    Model,
    Rollout,
    RolloutDecision,
    RolloutDevice,
    RolloutState,
    utcnow,
)
from fleet_server.models import DeviceRolloutState as DS
from fleet_server.schemas import DecisionOut, RolloutIn, RolloutOut, StageOut


def matches(device: Device, req: RolloutIn) -> bool:
    sel = req.selector
    if sel.hardware_id is not None and device.hardware_id != sel.hardware_id:
        return False
    return all(device.tags.get(k) == v for k, v in sel.tags.items())


def create_rollout(session: Session, req: RolloutIn) -> Rollout:
    name, version = req.model.split(":", 1)
    model = session.exec(select(Model).where(Model.name == name, Model.version == version)).first()
    if model is None or model.id is None:
        raise ApiError(404, "model_not_found", f"no model {req.model}")
    targeted = [
        d
        for d in session.exec(select(Device)).all()
        if matches(d, req) and d.hardware_id in model.hardware_ids
    ]
    if not targeted:
        raise ApiError(
            400, "no_matching_devices", f"no registered device matches the selector and {model.hardware_ids}"
        )
    busy = session.exec(
        select(RolloutDevice.device_id, RolloutDevice.rollout_id)
        .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
        .where(
            col(Rollout.state).in_(RolloutState.ACTIVE),
            col(RolloutDevice.device_id).in_([d.id for d in targeted]),
        )
    ).all()
    if busy:
        others = sorted({r for _, r in busy})
        raise ApiError(
            409,
            "rollout_conflict",
            f"{len(busy)} targeted device(s) are in active rollout(s) {', '.join(others)}",
        )
    now = utcnow()
    rollout = Rollout(
        id=uuid.uuid4().hex[:12],
        model_id=model.id,
        model_ref=f"{model.name}:{model.version}",
        model_sha256=model.sha256,
        selector=req.selector.model_dump(),
        stages=list(req.stages),
        soak_seconds=req.soak_seconds,
        device_timeout_seconds=req.device_timeout_seconds,
        max_error_rate=req.max_error_rate,
        min_inferences=req.min_inferences,
        max_failure_rate=req.max_failure_rate,
        created_at=now,
        updated_at=now,
    )
    session.add(rollout)
    session.flush()
    for d in targeted:
        session.add(
            RolloutDevice(
                rollout_id=rollout.id,
                device_id=d.id,
                order_key=assignment_order(rollout.id, d.id),
                updated_at=now,
            )
        )
    session.add(
        RolloutDecision(
            rollout_id=rollout.id,
            ts=now,
            action="created",
            reason=f"{len(targeted)} device(s) targeted, stages {req.stages}",
            figures={"targeted": len(targeted), "stages": list(req.stages)},
        )
    )
    return rollout


OPERATOR_ACTIONS = {
    # action: (states it applies to, new state, states where it is a no-op)
    "pause": ((RolloutState.RUNNING,), RolloutState.PAUSED, (RolloutState.PAUSED,)),
    "resume": ((RolloutState.PAUSED,), RolloutState.RUNNING, (RolloutState.RUNNING,)),
    "abort": (RolloutState.ACTIVE, RolloutState.ABORTED, (RolloutState.ABORTED,)),
}


def operator_action(session: Session, rollout: Rollout, action: str) -> Rollout:
    """Pause/resume/abort: idempotent; 409 when the rollout is already finished otherwise."""
    applies, new_state, noop = OPERATOR_ACTIONS[action]
    if rollout.state in noop:
        return rollout
    if rollout.state not in applies:
        raise ApiError(409, "rollout_finished", f"cannot {action} a {rollout.state} rollout")
    now = utcnow()
    session.add(
        RolloutDecision(
            rollout_id=rollout.id,
            ts=now,
            action=action,
            reason=f"operator: {action}",
            figures={"from": rollout.state},
        )
    )
    rollout.state, rollout.updated_at = new_state, now
    session.add(rollout)
    return rollout


def rollout_status(session: Session, rollout: Rollout) -> RolloutOut:
    rds = session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)).all()
    decisions = session.exec(
        select(RolloutDecision)
        .where(RolloutDecision.rollout_id == rollout.id)
        .order_by(col(RolloutDecision.id))
    ).all()
    stages = []
    for i, percent in enumerate(rollout.stages):
        mine = [rd for rd in rds if rd.stage is not None and rd.stage <= i]
        stages.append(
            StageOut(
                percent=percent,
                target_count=stage_target(percent, len(rds)),
                assigned=len(mine),
                done=sum(1 for rd in mine if rd.state == DS.DONE),
                failed=sum(1 for rd in mine if rd.state in (DS.FAILED, DS.TIMED_OUT)),
                state=_stage_state(rollout, i),
            )
        )
    return RolloutOut(
        id=rollout.id,
        model=rollout.model_ref,
        model_sha256=rollout.model_sha256,
        state=rollout.state,
        current_stage=rollout.current_stage,
        selector=rollout.selector,
        settings={
            "soak_seconds": rollout.soak_seconds,
            "device_timeout_seconds": rollout.device_timeout_seconds,
            "max_error_rate": rollout.max_error_rate,
            "min_inferences": rollout.min_inferences,
            "max_failure_rate": rollout.max_failure_rate,
        },
        created_at=rollout.created_at,
        updated_at=rollout.updated_at,
        stages=stages,
        devices={rd.device_id: rd.state for rd in sorted(rds, key=lambda r: r.device_id)},
        decisions=[
            DecisionOut(ts=d.ts, action=d.action, reason=d.reason, figures=d.figures) for d in decisions
        ],
    )


def _stage_state(rollout: Rollout, i: int) -> str:
    if i < rollout.current_stage or rollout.state == RolloutState.COMPLETED:
        return "done"
    if i > rollout.current_stage:
        return "pending"
    if rollout.state in (RolloutState.ROLLED_BACK, RolloutState.ABORTED, RolloutState.PAUSED):
        return rollout.state
    return "soaking" if rollout.stage_ready_at is not None else "running"
