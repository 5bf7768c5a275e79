"""Creating rollouts, operator actions on them, and their status view.

Targeted devices: selector AND the model's hardware ids, at creation; devices
that match later join through the ticker (``enrol_joiners``). One active
rollout per device. The conflict rule: a new rollout whose devices are in
another active rollout is refused (``conflict="refuse"``, default) or leaves
those devices out (``conflict="skip"``); a device that joins the selectors of
several active rollouts goes to the oldest one (Mender's "oldest unfinished
deployment first").

Operator actions move the rollout through the same lifecycle table as the
engine (``fleet_server.lifecycle``); one the table does not allow is a
``Conflict``. Every action is idempotent (repeating it is a no-op that returns
the rollout) and audited as a decision row naming the action and prior state.

Listing pages rollouts oldest first, and a rollout's devices (by id) and
decisions (oldest first), with their filters in SQL.

Refusals are domain errors (``fleet_server.errors``); the HTTP layer maps them.
"""

from __future__ import annotations

import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import case, exists, func, insert, update
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from fleet_server import policy
from fleet_server.engine import DeviceSnapshot, Redelivery, assignment_order, redelivery, stage_target
from fleet_server.errors import Conflict, DomainError, Invalid, NotFound
from fleet_server.lifecycle import OPERATOR_ACTIONS, ROLLOUT, IllegalMove, RolloutTrigger
from fleet_server.lifecycle import DeviceRolloutState as DS
from fleet_server.lifecycle import RolloutState as RS
from fleet_server.models import (
    Device,
    EventRow,
    Experiment,
    ExperimentArm,
    ExperimentDevice,
    Model,
    Rollout,
    RolloutDecision,
    RolloutDevice,
    utcnow,
)
from fleet_server.named_windows import resolve_windows
from fleet_server.paging import DEFAULT_LIMIT, Page, select_page
from fleet_server.schemas import DecisionOut, DeliveryOut, RolloutIn, RolloutOut, StageOut
from fleet_server.selector import matches, matching_devices
from fleet_server.store import hold_assignment_lock


def busy_devices(session: Session, device_ids: list[str]) -> list[tuple[str, str]]:
    """(device, holder) pairs of the given devices that are in an active rollout (the rollout's id)
    or held by a running experiment (``experiment:<id>``; docs/experiments.md)."""
    if not device_ids:
        return []
    rows = session.exec(
        select(RolloutDevice.device_id, RolloutDevice.rollout_id)
        .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
        .where(col(Rollout.state).in_(RS.ACTIVE), col(RolloutDevice.device_id).in_(device_ids))
    ).all()
    held = session.exec(
        select(ExperimentDevice.device_id, ExperimentDevice.experiment_id)
        .join(Experiment, col(Experiment.id) == col(ExperimentDevice.experiment_id))
        .where(col(Experiment.state) == "running", col(ExperimentDevice.device_id).in_(device_ids))
    ).all()
    return [(d, r) for d, r in rows] + [(d, f"experiment:{e}") for d, e in held]


def busy_among(session: Session, device_ids: set[str]) -> list[tuple[str, str]]:
    """``busy_devices`` for a large set: every busy device of the fleet is read (no IN list of
    thousands of ids) and intersected here. Sorted by device."""
    if not device_ids:
        return []
    conn = session.connection()
    rows = conn.execute(
        sa_select(col(RolloutDevice.device_id), col(RolloutDevice.rollout_id))
        .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
        .where(col(Rollout.state).in_(RS.ACTIVE))
    ).all()
    held = conn.execute(
        sa_select(col(ExperimentDevice.device_id), col(ExperimentDevice.experiment_id))
        .join(Experiment, col(Experiment.id) == col(ExperimentDevice.experiment_id))
        .where(col(Experiment.state) == "running")
    ).all()
    pairs = [(d, r) for d, r in rows] + [(d, f"experiment:{e}") for d, e in held]
    return sorted(p for p in pairs if p[0] in device_ids)


def add_rollout_devices(session: Session, rollout_id: str, device_ids: Sequence[str], now: datetime) -> None:
    """The rollout's device rows, pending, in one multi-row INSERT per few thousand rows (SQLAlchemy's
    insertmanyvalues, on PostgreSQL and SQLite alike) rather than one ORM object each: 10,000 ORM
    objects (construction, identity map, unit of work) were most of creating a 10,000-device
    rollout."""
    if not device_ids:
        return
    session.execute(
        insert(RolloutDevice),
        [
            {
                "rollout_id": rollout_id,
                "device_id": d,
                "order_key": assignment_order(rollout_id, d),
                "state": DS.PENDING,
                "attempts": 0,
                "updated_at": now,
            }
            for d in device_ids
        ],
    )


def create_rollout(session: Session, req: RolloutIn) -> Rollout:
    req = resolve_windows(session, req)
    name, version = req.model.split(":", 1)
    model = session.exec(select(Model).where(Model.name == name, Model.version == version)).first()
    if model is None or model.id is None:
        raise NotFound("model_not_found", f"no model {req.model}")
    selector = req.selector.model_dump()
    hold_assignment_lock(session)  # until the new rows are committed: nobody takes a device meanwhile
    targeted = [t.id for t in matching_devices(session, selector, model.hardware_ids)]
    if not targeted:  # the request is well formed and names real things, but selects no device
        raise DomainError(
            "no_matching_devices", f"no registered device matches the selector and {model.hardware_ids}"
        )
    busy = busy_among(session, set(targeted))
    if busy and req.conflict == "refuse":
        others = sorted({r for _, r in busy})
        raise Conflict(
            "rollout_conflict",
            f"{len(busy)} targeted device(s) are in active rollout(s) or running experiment(s)"
            f" {', '.join(others)}",
        )
    skipped = {d for d, _ in busy}
    targeted = [d for d in targeted if d not in skipped]
    if not targeted:
        raise Conflict("rollout_conflict", "every targeted device is in another active rollout")
    now = utcnow()
    rollout = Rollout(
        id=uuid.uuid4().hex[:12],
        model_id=model.id,
        model_ref=f"{model.name}:{model.version}",
        model_sha256=model.sha256,
        selector=selector,
        stages=list(req.stages),
        stage_unit=req.stage_unit,
        **policy.to_row(req.policy()),
        created_at=now,
        updated_at=now,
    )
    session.add(rollout)
    session.flush()
    add_rollout_devices(session, rollout.id, targeted, now)
    session.add(
        RolloutDecision(
            rollout_id=rollout.id,
            ts=now,
            action="created",
            reason=f"{len(targeted)} device(s) targeted, stages {_stages_text(req.stages, req.stage_unit)}"
            + (f"; {len(skipped)} busy device(s) left out" if skipped else ""),
            figures={"targeted": len(targeted), "stages": list(req.stages), "skipped": sorted(skipped)},
        )
    )
    return rollout


def _stages_text(stages: Sequence[float], unit: str) -> str:
    """Stages as people write them: "10% 50% 100%", or device counts "5 20 devices"."""
    suffix = "%" if unit == "percent" else ""
    return " ".join(f"{s:g}{suffix}" for s in stages) + ("" if suffix else " devices")


def operator_action(session: Session, rollout: Rollout, action: str) -> Rollout:
    """Pause/resume/abort/approve/rollback: idempotent and audited; ``Conflict`` when the lifecycle
    does not allow it in the rollout's state."""
    if action not in OPERATOR_ACTIONS:
        raise Invalid(
            "unknown_action", f"no operator action {action!r}; known: {', '.join(OPERATOR_ACTIONS)}"
        )
    trigger = RolloutTrigger(action)
    try:
        target = ROLLOUT.move(rollout.state, trigger)
    except IllegalMove:
        if rollout.state in RS.FINISHED:
            raise Conflict("rollout_finished", f"cannot {action} a {rollout.state} rollout") from None
        allowed = sorted(t for t in OPERATOR_ACTIONS if ROLLOUT.allows(rollout.state, t))
        raise Conflict(
            "action_not_allowed",
            f"cannot {action} a {rollout.state} rollout (allowed: {', '.join(allowed)})",
        ) from None
    if trigger == RolloutTrigger.ROLLBACK:
        return _request_rollback(session, rollout, target)
    if trigger == RolloutTrigger.APPROVE:
        return _approve(session, rollout, target)
    if trigger == RolloutTrigger.RESUME and rollout.state == RS.PAUSED:
        return _resume(session, rollout, target)
    if target == rollout.state:
        return rollout
    _audit(session, rollout, action, f"operator: {action}")
    rollout.state, rollout.updated_at = target, utcnow()
    session.add(rollout)
    return rollout


def _approve(session: Session, rollout: Rollout, target: RS) -> Rollout:
    """Accept the current stage: passes a manual gate, or overrides a gate that paused the rollout
    or held a cohort.

    A running rollout with no held cohort waits for nobody, so approving it is a no-op: otherwise a
    repeated click that lands after the engine started the next stage would approve that stage in
    advance, skipping its manual gate and silencing its pausing gates.
    """
    if rollout.approved_through >= rollout.current_stage and rollout.state == target:
        return rollout
    if rollout.state == RS.RUNNING and not _holds_devices(session, rollout):
        return rollout
    _audit(session, rollout, "approve", f"operator: approve stage {rollout.current_stage + 1}")
    rollout.approved_through = rollout.current_stage
    rollout.state, rollout.updated_at = target, utcnow()
    session.add(rollout)
    return rollout


def _resume(session: Session, rollout: Rollout, target: RS) -> Rollout:
    """Resume a paused rollout, sending the release again to its devices that could not fetch it.

    Which devices is the engine's pure ``redelivery`` (their state, stored reason and hardware
    class); here it is read and written. Only the devices it may concern are read (failed, held,
    rolled back; never the whole rollout), and written by primary key, one executemany each. The
    engine sends the release on its next tick through its retry path, within the rate limit. A
    stage that had finished (soaking) has devices on their way again: its soak starts again once
    they are done, so the devices sent again are soaked too.
    """
    now = utcnow()
    figures: dict[str, Any]
    if rollout.rollback_requested:  # the next tick rolls every device back: sending it again is moot
        reason, figures = "operator: resume (a roll back is requested: nothing is sent again)", {}
    else:
        reason, figures = _resume_note(_redeliver(session, rollout, now))
    _audit(session, rollout, "resume", reason, figures)
    rollout.state, rollout.updated_at = target, now
    session.add(rollout)
    return rollout


def _redeliver(session: Session, rollout: Rollout, now: datetime) -> Redelivery:
    """Read the devices ``redelivery`` may concern, write what it decides; what it decided."""
    rows = (
        session.connection()
        .execute(
            sa_select(
                col(RolloutDevice.id),
                col(RolloutDevice.device_id),
                col(RolloutDevice.state),
                col(RolloutDevice.reason),
                col(Device.hardware_id),
            )
            .join(Device, col(Device.id) == col(RolloutDevice.device_id))
            .where(
                col(RolloutDevice.rollout_id) == rollout.id,
                col(RolloutDevice.state).in_((DS.FAILED, DS.HELD, DS.ROLLED_BACK)),
            )
        )
        .all()
    )
    again = redelivery(
        [
            DeviceSnapshot(
                device_id=r.device_id, state=DS(r.state), reason=r.reason, hardware_id=r.hardware_id
            )
            for r in rows
        ],
        now,
    )
    pk = {r.device_id: r.id for r in rows}
    if again.resent:
        session.execute(
            update(RolloutDevice),
            [
                {
                    "id": pk[c.device_id],
                    "state": c.state,
                    "reason": c.reason,
                    "retry_at": c.retry_at,
                    "attempts": c.attempts,
                    "timeout_from": None,
                    "updated_at": now,
                }
                for c in again.resent
            ],
        )
        rollout.stage_ready_at = None
    if again.released:
        session.execute(
            update(RolloutDevice),
            [
                {"id": pk[c.device_id], "state": c.state, "reason": c.reason, "updated_at": now}
                for c in again.released
            ],
        )
    return again


def _resume_note(again: Redelivery) -> tuple[str, dict[str, Any]]:
    """The resume's audit reason and figures: how many devices are sent the release again."""
    n, held = len(again.resent), len(again.released)
    reason = "operator: resume"
    if n:
        reason += (
            f"; {n} device{'s' if n != 1 else ''} that could not fetch the release"
            f" {'are' if n != 1 else 'is'} sent it again"
        )
    if held:
        reason += f"; {held} held device{'s' if held != 1 else ''} released (a paused hardware class)"
    return reason, {"redelivered": n, "released": held}


def _holds_devices(session: Session, rollout: Rollout) -> bool:
    """Whether a gate holds some of the rollout's devices back until a human approves the stage."""
    held = select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id, RolloutDevice.state == DS.HELD)
    return bool(session.exec(select(exists(held))).one())


def _request_rollback(session: Session, rollout: Rollout, target: RS) -> Rollout:
    """Ask the engine leader to send every device that got this model back to its previous one.

    The move itself (to ``target``, rolled back) is the engine's, on its next tick: it holds the
    devices' state and sends the directives.
    """
    if rollout.state == target or rollout.rollback_requested:
        return rollout
    _audit(session, rollout, "rollback_requested", "operator: roll back to the last good release")
    rollout.rollback_requested, rollout.updated_at = True, utcnow()
    session.add(rollout)
    return rollout


def _audit(
    session: Session, rollout: Rollout, action: str, reason: str, figures: dict[str, Any] | None = None
) -> None:
    session.add(
        RolloutDecision(
            rollout_id=rollout.id,
            ts=utcnow(),
            action=action,
            reason=reason,
            figures={"from": rollout.state, "stage": rollout.current_stage, **(figures or {})},
        )
    )


def find_rollout(session: Session, rollout_id: str, *, for_update: bool = False) -> Rollout:
    rollout = session.get(Rollout, rollout_id, with_for_update=for_update)
    if rollout is None:
        raise NotFound("rollout_not_found", f"no rollout {rollout_id}")
    return rollout


def list_rollouts(
    session: Session,
    state: RS | None = None,
    model: str | None = None,
    *,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> Page[Rollout]:
    """One page of the rollouts (in ``state``, of ``model`` = name:version), oldest first."""
    query = select(Rollout)
    if state is not None:
        query = query.where(col(Rollout.state) == state)
    if model is not None:
        query = query.where(col(Rollout.model_ref) == model)
    order = [col(Rollout.created_at), col(Rollout.id)]
    return select_page(session, query, order, "rollouts", cursor, limit)


def rollout_devices(
    session: Session,
    rollout: Rollout,
    state: DS | None = None,
    *,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> Page[RolloutDevice]:
    """One page of the rollout's devices (in ``state``), by device id."""
    query = select(RolloutDevice).where(col(RolloutDevice.rollout_id) == rollout.id)
    if state is not None:
        query = query.where(col(RolloutDevice.state) == state)
    order = [col(RolloutDevice.device_id)]
    return select_page(session, query, order, "rollout-devices", cursor, limit)


def rollout_decisions(
    session: Session,
    rollout: Rollout,
    action: str | None = None,
    *,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> Page[RolloutDecision]:
    """One page of the rollout's decisions (with ``action``), oldest first."""
    query = select(RolloutDecision).where(col(RolloutDecision.rollout_id) == rollout.id)
    if action is not None:
        query = query.where(col(RolloutDecision.action) == action)
    order = [col(RolloutDecision.id)]
    return select_page(session, query, order, "rollout-decisions", cursor, limit)


def rollout_status(session: Session, rollout: Rollout, *, with_devices: bool = True) -> RolloutOut:
    return rollout_statuses(session, [rollout], with_devices=with_devices)[0]


def rollout_statuses(
    session: Session, rollouts: Sequence[Rollout], *, with_devices: bool = True
) -> list[RolloutOut]:
    """The status views of a page of rollouts from two column queries for the whole page (devices,
    decisions), not one ORM load of every device and decision per rollout: a page of 50 rollouts
    of 200 devices each took seconds that way. ``with_devices=False`` leaves the per-device maps
    empty (the stage counts are still computed): building, validating and serialising 10,000
    entries was most of the cost of a poll."""
    ids = [r.id for r in rollouts]
    if not ids:
        return []
    devices: dict[str, list[tuple[str, str, int | None, str | None]]] = {i: [] for i in ids}
    counts: dict[str, Counter[tuple[int | None, str, str | None]]] = {i: Counter() for i in ids}
    session.flush()  # the Core queries below see the session's pending changes (an action's decision)
    conn = session.connection()  # Core rows: no ORM bookkeeping per device
    if with_devices:
        for rid, device_id, state, stage, reason in conn.execute(
            sa_select(
                col(RolloutDevice.rollout_id),
                col(RolloutDevice.device_id),
                col(RolloutDevice.state),
                col(RolloutDevice.stage),
                col(RolloutDevice.reason),
            ).where(col(RolloutDevice.rollout_id).in_(ids))
        ).all():
            devices[rid].append((device_id, state, stage, reason))
            counts[rid][(stage, state, reason if state == DS.WAITING else None)] += 1
        for rows in devices.values():
            rows.sort()  # by device id in Python's order, not the database collation's
    else:  # the counts alone, counted by the database: a few rows instead of one per device
        waiting_reason = case((col(RolloutDevice.state) == DS.WAITING, col(RolloutDevice.reason)))
        for rid, stage, state, reason, n in conn.execute(
            sa_select(
                col(RolloutDevice.rollout_id),
                col(RolloutDevice.stage),
                col(RolloutDevice.state),
                waiting_reason,
                func.count(),
            )
            .where(col(RolloutDevice.rollout_id).in_(ids))
            .group_by(
                col(RolloutDevice.rollout_id),
                col(RolloutDevice.stage),
                col(RolloutDevice.state),
                waiting_reason,
            )
        ).all():
            counts[rid][(stage, state, reason)] += n
    decisions: dict[str, list[DecisionOut]] = {i: [] for i in ids}
    for rid, ts, action, reason, figures in conn.execute(
        sa_select(
            col(RolloutDecision.rollout_id),
            col(RolloutDecision.ts),
            col(RolloutDecision.action),
            col(RolloutDecision.reason),
            col(RolloutDecision.figures),
        )
        .where(col(RolloutDecision.rollout_id).in_(ids))
        .order_by(col(RolloutDecision.id))
    ).all():
        decisions[rid].append(DecisionOut(ts=ts, action=action, reason=reason, figures=figures))
    delivery = _delivery(conn, ids)
    return [
        _status(r, devices[r.id], counts[r.id], decisions[r.id], delivery.get(r.id), with_devices)
        for r in rollouts
    ]


def _delivery(conn: Any, ids: list[str]) -> dict[str, DeliveryOut]:
    """Bytes fetched per rollout: the events of its devices that carry ``bytes_fetched``, for the
    seqs it sent them (up to the last with its model, so a later roll back's is not counted), received
    since it began (a device's earlier rollouts' are not)."""
    rows = conn.execute(
        sa_select(
            col(RolloutDevice.rollout_id),
            func.sum(col(EventRow.bytes_fetched)),
            func.count(col(EventRow.id)),
        )
        .join(EventRow, col(EventRow.device_id) == col(RolloutDevice.device_id))
        .join(Rollout, col(Rollout.id) == col(RolloutDevice.rollout_id))
        .where(
            col(RolloutDevice.rollout_id).in_(ids),
            col(EventRow.bytes_fetched).is_not(None),
            col(RolloutDevice.seq).is_not(None),
            col(EventRow.seq) <= col(RolloutDevice.seq),
            col(EventRow.received_at) >= col(Rollout.created_at),
        )
        .group_by(col(RolloutDevice.rollout_id))
    ).all()
    return {
        rid: DeliveryOut(
            bytes_fetched=int(total or 0),
            installs=int(n),
            bytes_per_install=round(int(total or 0) / n, 1) if n else None,
        )
        for rid, total, n in rows
    }


def _status(
    rollout: Rollout,
    rds: list[tuple[str, str, int | None, str | None]],
    counts: Counter[tuple[int | None, str, str | None]],
    decisions: list[DecisionOut],
    delivery: DeliveryOut | None = None,
    with_devices: bool = True,
) -> RolloutOut:
    """One rollout's status from its devices: ``counts`` per (stage, state, reason of a waiting
    device), and with ``with_devices`` each device (device, state, stage, reason; sorted by id)."""
    effective = policy.from_row(rollout)
    # devices per (stage, state): a stage's counts are cumulative over it and every earlier stage
    per_stage: Counter[tuple[int, str]] = Counter()
    for (stage, state, _), n in counts.items():
        if stage is not None:
            per_stage[(stage, state)] += n
    targeted = counts.total()
    stages = []
    for i, percent in enumerate(rollout.stages):
        mine: Counter[str] = Counter()
        for (stage, state), n in per_stage.items():
            if stage <= i:
                mine[state] += n
        state = _stage_state(rollout, i)
        on_their_way = sum(mine[s] for s in DS.IN_FLIGHT)
        if (
            state == "running"
            and i == rollout.current_stage
            and on_their_way
            and on_their_way == mine[DS.WAITING]
        ):
            state = "waiting"  # not stalled: every device still on its way waits for its window or link
        stages.append(
            StageOut(
                percent=percent,
                target_count=stage_target(percent, targeted, rollout.stage_unit),
                assigned=mine.total(),
                done=mine[DS.DONE],
                failed=mine[DS.FAILED] + mine[DS.TIMED_OUT],
                waiting=mine[DS.WAITING],
                state=state,
            )
        )
    waiting: Counter[str] = Counter()
    for (_, state, reason), n in counts.items():
        if state == DS.WAITING:
            waiting[(reason or "").removeprefix("waiting: ") or "waiting"] += n
    return RolloutOut(
        id=rollout.id,
        model=rollout.model_ref,
        model_sha256=rollout.model_sha256,
        state=rollout.state,
        current_stage=rollout.current_stage,
        selector=rollout.selector,
        settings=policy.settings(effective),
        stage_unit=rollout.stage_unit,
        policy=policy.document(effective),
        approved_through=rollout.approved_through,
        rollback_requested=rollout.rollback_requested,
        created_at=rollout.created_at,
        updated_at=rollout.updated_at,
        stages=stages,
        devices={device_id: state for device_id, state, _, _ in rds} if with_devices else {},
        device_reasons={d: reason for d, _, _, reason in rds if reason} if with_devices else {},
        waiting=dict(sorted(waiting.items())),
        delivery=delivery or DeliveryOut(bytes_fetched=0, installs=0, bytes_per_install=None),
        decisions=decisions,
    )


def _stage_state(rollout: Rollout, i: int) -> str:
    if i < rollout.current_stage or rollout.state == RS.COMPLETED:
        return "done"
    if i > rollout.current_stage:
        return "pending"
    if rollout.state in (
        RS.ROLLED_BACK,
        RS.ABORTED,
        RS.PAUSED,
        RS.AWAITING_APPROVAL,
    ):
        return rollout.state
    return "soaking" if rollout.stage_ready_at is not None else "running"


def claim_joiners(
    wanting: Sequence[tuple[str, Mapping[str, Any], list[str]]], candidates: Sequence[Device]
) -> dict[str, list[str]]:
    """Which rollout each free device joins: the first (oldest) of ``wanting`` -- (rollout id,
    selector, the model's hardware ids) -- whose selector and hardware it matches. Rollouts no
    device joins are left out."""
    claimed: set[str] = set()
    joined: dict[str, list[str]] = {}
    for rollout_id, selector, hardware_ids in wanting:
        mine = [d.id for d in candidates if d.id not in claimed and matches(d, selector, hardware_ids)]
        if mine:
            claimed.update(mine)
            joined[rollout_id] = mine
    return joined


def find_joiners(session: Session, rollouts: Sequence[tuple[Rollout, list[str]]]) -> dict[str, list[str]]:
    """Which free devices (in no active rollout or running experiment) would join which of
    ``rollouts`` (given oldest first, with their models' hardware ids): ``claim_joiners`` over
    the free devices, read once for every rollout. Reads only; without the assignment lock held
    it is a forecast (``enrol_joiners`` holds it).

    Reading the free devices per rollout let a device that registered between two of those reads
    go to the newer rollout: a transaction does not stop that, as each statement reads what is
    committed then (on PostgreSQL at READ COMMITTED, and on SQLite, whose driver leaves reads
    outside a transaction). Only running and soaking rollouts take joiners (not paused, awaiting
    approval or ended ones). A rollout an experiment started (an arm's, or a return to the
    control) targets exactly the devices the experiment assigned, and a running experiment's
    devices join no rollout."""
    takers = [(r, hw) for r, hw in rollouts if r.state in RS.ACTIVE and r.state != RS.PAUSED]
    ids = [r.id for r, _ in takers]
    if not ids:
        return {}
    by_experiment = set(
        session.exec(select(ExperimentArm.rollout_id).where(col(ExperimentArm.rollout_id).in_(ids))).all()
    ) | set(
        session.exec(
            select(ExperimentArm.return_rollout_id).where(col(ExperimentArm.return_rollout_id).in_(ids))
        ).all()
    )
    wanting = [(r.id, r.selector, hw) for r, hw in takers if r.id not in by_experiment]
    hardware = sorted({h for _, _, hw in wanting for h in hw})
    if not hardware:
        return {}
    in_active = exists().where(
        col(RolloutDevice.device_id) == col(Device.id),
        col(RolloutDevice.rollout_id) == col(Rollout.id),
        col(Rollout.state).in_(RS.ACTIVE),
    )
    in_experiment = exists().where(
        col(ExperimentDevice.device_id) == col(Device.id),
        col(ExperimentDevice.experiment_id) == col(Experiment.id),
        col(Experiment.state) == "running",
    )
    candidates = session.exec(
        select(Device).where(col(Device.hardware_id).in_(hardware), ~in_active, ~in_experiment)
    ).all()
    return claim_joiners(wanting, candidates)


def joiner_rollouts(
    session: Session, rollout_ids: Sequence[str], *, for_update: bool = False
) -> list[tuple[Rollout, list[str]]]:
    """The rollouts ``rollout_ids`` (oldest first) with their models' hardware ids, as
    ``find_joiners`` takes them."""
    found: list[tuple[Rollout, list[str]]] = []
    for rollout_id in rollout_ids:
        rollout = session.get(Rollout, rollout_id, with_for_update=for_update)
        model = session.get(Model, rollout.model_id) if rollout is not None else None
        if rollout is not None and model is not None:
            found.append((rollout, model.hardware_ids))
    return found


def enrol_joiners(session: Session, rollout_ids: Sequence[str]) -> int:
    """Add the devices ``find_joiners`` finds to the rollouts ``rollout_ids`` (oldest first).
    Returns how many joined. The assignment lock comes first, then the rollout rows are read (and
    locked, on PostgreSQL): a rollout paused or ended since the caller last looked takes nobody,
    and no holder of the lock waits for a row whose holder waits for the lock."""
    hold_assignment_lock(session)
    joined = find_joiners(session, joiner_rollouts(session, rollout_ids, for_update=True))
    now = utcnow()
    for rollout_id, device_ids in joined.items():
        add_rollout_devices(session, rollout_id, device_ids, now)
        session.add(
            RolloutDecision(
                rollout_id=rollout_id,
                ts=now,
                action="joined",
                reason=f"{len(device_ids)} device(s) joined the selector",
                figures={"devices": sorted(device_ids)[:100], "count": len(device_ids)},
            )
        )
    return sum(len(d) for d in joined.values())
