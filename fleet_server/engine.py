"""The rollout decision, as a pure function: a snapshot of one rollout in, a plan out.

No I/O here: the ticker reads the snapshot from the store, calls ``decide``,
and applies the plan (rows + signed directives). That keeps every rule below
testable without a database or a broker, and lets the simulator run the same core.

Rules (skeleton gate of docs/contracts.md):

- Devices are assigned stage by stage; stage ``k`` covers
  ``ceil(stages[k]% * targeted)`` devices cumulatively, picked in a fixed
  pseudo-random order (sha256 of rollout id + device id) so a restart or a
  second server picks the same devices.
- A notified device is ``done`` only when it reports the rollout model's hash
  as running AND has served at least one successful inference with it (so
  success is never counted before the device really runs the update);
  ``failed`` when it reports failed/rejected for the seq it was sent;
  ``timed_out`` when neither happened within ``device_timeout_seconds``.
- Gate, over every assigned device on the new model's hash: with at least
  ``min_inferences`` inferences, an error rate above ``max_error_rate`` rolls
  back; a failed fraction (failed + timed out) above ``max_failure_rate`` rolls
  back. The gate is checked while paused too: pausing stops assignment, not protection.
- When every assigned device has finished and the soak time has passed since,
  the next stage starts; after the last stage the rollout is ``completed``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from fractions import Fraction
from typing import Any

from fleet_server.models import DeviceRolloutState as DS
from fleet_server.models import RolloutState as RS

FAILED_DEPLOYMENT_STATES = ("failed", "rejected")


@dataclass(frozen=True)
class RolloutSnapshot:
    id: str
    state: str
    model_sha256: str
    stages: tuple[float, ...]  # cumulative percents, strictly increasing
    current_stage: int
    stage_ready_at: datetime | None  # when the current stage finished (soak start)
    soak_seconds: float
    device_timeout_seconds: float
    max_error_rate: float
    min_inferences: int
    max_failure_rate: float


@dataclass(frozen=True)
class DeviceSnapshot:
    """One targeted device as the engine sees it; figures concern the rollout's model hash."""

    device_id: str
    state: str  # DeviceRolloutState
    stage: int | None = None
    seq: int | None = None  # seq of the directive that carried the rollout model
    notified_at: datetime | None = None
    running_sha256: str | None = None
    reported_seq: int = 0
    reported_state: str | None = None
    reported_error: str | None = None
    event_failure: str | None = None  # reason of a failed/rejected event for ``seq``
    event_progress: bool = False  # any event for ``seq``
    served_ok: int = 0
    inferences: int = 0
    errors: int = 0


@dataclass(frozen=True)
class DeviceChange:
    device_id: str
    state: str
    reason: str | None = None
    stage: int | None = None


@dataclass(frozen=True)
class Decision:
    action: str
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """What the ticker must do. ``notify``: send the rollout model; ``roll_back``: send the previous one."""

    state: str
    current_stage: int
    stage_ready_at: datetime | None
    changes: list[DeviceChange] = field(default_factory=list)
    notify: list[DeviceChange] = field(default_factory=list)
    roll_back: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.changes or self.notify or self.roll_back or self.decisions)


def assignment_order(rollout_id: str, device_id: str) -> str:
    """Deterministic, evenly spread order of devices within a rollout."""
    return hashlib.sha256(f"{rollout_id}{device_id}".encode()).hexdigest()


def stage_target(percent: float, targeted: int) -> int:
    """Cumulative device count of a stage: ceil(percent% of targeted), exact for decimal percents."""
    share = Fraction(percent).limit_denominator(10**6) * targeted / 100
    return min(targeted, math.ceil(share))


def observe(d: DeviceSnapshot, r: RolloutSnapshot, now: datetime) -> tuple[str, str | None]:
    """New state of an in-flight device from what it reported."""
    if d.running_sha256 == r.model_sha256 and (d.served_ok > 0 or d.inferences - d.errors > 0):
        return DS.DONE, "serving the rollout model"
    if d.event_failure is not None:
        return DS.FAILED, d.event_failure
    if d.seq is not None and d.reported_seq == d.seq and d.reported_state in FAILED_DEPLOYMENT_STATES:
        return DS.FAILED, d.reported_error or d.reported_state
    if d.notified_at is not None and (now - d.notified_at).total_seconds() > r.device_timeout_seconds:
        return DS.TIMED_OUT, f"no success within {r.device_timeout_seconds:g}s"
    progressed = d.event_progress or (d.seq is not None and d.reported_seq == d.seq)
    if d.state == DS.NOTIFIED and (progressed or d.running_sha256 == r.model_sha256):
        return DS.INSTALLING, None
    return d.state, None


def decide(r: RolloutSnapshot, devices: Sequence[DeviceSnapshot], now: datetime) -> Plan:
    """One engine step for one rollout. Pure: same inputs, same plan."""
    plan = Plan(state=r.state, current_stage=r.current_stage, stage_ready_at=r.stage_ready_at)
    if r.state not in RS.ACTIVE:
        return plan

    # 1. What happened to the devices already notified.
    state = {d.device_id: d.state for d in devices}
    for d in devices:
        if d.state in DS.IN_FLIGHT:
            new, reason = observe(d, r, now)
            if new != d.state:
                state[d.device_id] = new
                plan.changes.append(DeviceChange(d.device_id, new, reason))

    # 2. The gate, over every device assigned so far.
    assigned = [d for d in devices if d.stage is not None]
    figures = _figures(r, assigned, state)
    trip = _gate(r, figures)
    if trip is not None:
        return _roll_back(plan, r, devices, state, trip, figures)
    if r.state == RS.PAUSED:
        return plan

    # 3. Stage progression: assign, wait until finished, soak, advance.
    pending = sorted(
        (d for d in devices if d.stage is None and state[d.device_id] == DS.PENDING),
        key=lambda d: assignment_order(r.id, d.device_id),
    )
    n_assigned = len(assigned)
    while True:
        target = stage_target(r.stages[plan.current_stage], len(devices))
        if n_assigned < target:
            batch, pending = pending[: target - n_assigned], pending[target - n_assigned :]
            for d in batch:
                state[d.device_id] = DS.NOTIFIED
                plan.notify.append(DeviceChange(d.device_id, DS.NOTIFIED, None, plan.current_stage))
            n_assigned += len(batch)
            plan.decisions.append(
                Decision(
                    "assign",
                    f"stage {plan.current_stage + 1}/{len(r.stages)}: notify {len(batch)} device(s)",
                    {"stage": plan.current_stage, "target_count": target, "notified": len(batch)},
                )
            )
            return plan
        unfinished = [i for i, s in state.items() if s in DS.IN_FLIGHT]
        if unfinished:
            return plan
        if plan.stage_ready_at is None:
            plan.stage_ready_at = now
            plan.decisions.append(
                Decision(
                    "stage_finished",
                    f"stage {plan.current_stage + 1}: every device finished; soaking {r.soak_seconds:g}s",
                    figures,
                )
            )
        soaked = (now - plan.stage_ready_at).total_seconds()
        if soaked < r.soak_seconds:
            return plan
        if plan.current_stage + 1 >= len(r.stages):
            plan.state = RS.COMPLETED
            plan.decisions.append(
                Decision("completed", f"last stage soaked {soaked:.1f}s with the gate passing", figures)
            )
            return plan
        plan.current_stage += 1
        plan.stage_ready_at = None
        plan.decisions.append(
            Decision(
                "next_stage",
                f"stage {plan.current_stage} soaked {soaked:.1f}s; starting stage {plan.current_stage + 1}",
                figures,
            )
        )


def _figures(r: RolloutSnapshot, assigned: Sequence[DeviceSnapshot], state: dict[str, str]) -> dict[str, Any]:
    inferences = sum(d.inferences for d in assigned)
    errors = sum(d.errors for d in assigned)
    failed = sum(1 for d in assigned if state[d.device_id] in (DS.FAILED, DS.TIMED_OUT))
    done = sum(1 for d in assigned if state[d.device_id] == DS.DONE)
    return {
        "assigned": len(assigned),
        "done": done,
        "failed": failed,
        "failure_rate": failed / len(assigned) if assigned else 0.0,
        "max_failure_rate": r.max_failure_rate,
        "inferences": inferences,
        "errors": errors,
        "error_rate": errors / inferences if inferences else 0.0,
        "max_error_rate": r.max_error_rate,
        "min_inferences": r.min_inferences,
    }


def _gate(r: RolloutSnapshot, f: dict[str, Any]) -> str | None:
    if f["inferences"] > 0 and f["inferences"] >= r.min_inferences and f["error_rate"] > r.max_error_rate:
        return (
            f"error rate {f['error_rate']:.3f} over {f['inferences']} inferences exceeds {r.max_error_rate:g}"
        )
    if f["assigned"] and f["failure_rate"] > r.max_failure_rate:
        return (
            f"{f['failed']} of {f['assigned']} devices failed or timed out "
            f"({f['failure_rate']:.3f} > {r.max_failure_rate:g})"
        )
    return None


def _roll_back(
    plan: Plan,
    r: RolloutSnapshot,
    devices: Sequence[DeviceSnapshot],
    state: dict[str, str],
    reason: str,
    figures: dict[str, Any],
) -> Plan:
    """Every device that was sent the new model goes back to its previous one; pending ones never get it."""
    earlier = {c.device_id: c for c in plan.changes}
    changes = [c for c in plan.changes if c.state not in DS.IN_FLIGHT + DS.FINISHED]
    for d in devices:
        prior = state[d.device_id]
        if prior in DS.IN_FLIGHT + DS.FINISHED:
            plan.roll_back.append(d.device_id)
            why = earlier[d.device_id].reason if d.device_id in earlier else None
            note = f"rolled back (was {prior}{': ' + why if why else ''})"
            changes.append(DeviceChange(d.device_id, DS.ROLLED_BACK, note))
    plan.changes = changes
    plan.state = RS.ROLLED_BACK
    plan.decisions.append(Decision("roll_back", reason, {**figures, "rolled_back": len(plan.roll_back)}))
    return plan
