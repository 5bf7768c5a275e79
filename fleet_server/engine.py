"""The rollout decision, as a pure function: a snapshot of one rollout in, a plan out.

No I/O here: the ticker reads the snapshot from the store, calls ``decide``,
and applies the plan (rows + signed directives). That keeps every rule below
testable without a database or a broker, lets the simulator run the same core,
and makes a restart resume exactly: everything ``decide`` reads is persisted.
States, transitions and gates are drawn in docs/rollouts.md.

- Devices are assigned stage by stage; stage ``k`` covers ``ceil(stages[k]% *
  targeted)`` devices cumulatively (or ``stages[k]`` devices with the ``count``
  unit), picked in a fixed pseudo-random order (sha256 of rollout id + device
  id) so a restart or another replica picks the same devices. Devices that join
  the selector later are targeted too, so the counts grow with the fleet.
- A rate limit caps devices notified per minute (optionally ramping up).
- With a shadow gate, a device first runs the new model beside its own
  (``shadowing``); once the rollout's shadow agreement passes with the minimum
  sample, shadowing devices are sent the model for real.
- A notified device is ``done`` only when it reports the rollout model's hash
  as running, out of probation, AND has served at least one successful
  inference with it; it fails on a failed/rejected/reverted report for the seq
  it was sent, and times out after ``device_timeout_seconds``. A failure whose
  class has retries left waits ``backoff * 2**(attempt-1)`` and is re-sent.
- Gates (gates.py) over every device assigned so far decide: nothing, pause
  (a human decides; ``approve`` accepts the stage) or roll back. The gates are
  checked while paused too: pausing stops assignment, not protection.
- When every assigned device has finished, the success threshold holds and the
  soak time has passed, the next stage starts (after a human approval when the
  policy asks for one); after the last stage the rollout is ``completed``.
- An operator roll back (any state) sends every device that got the new model
  back to the model it ran before.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fractions import Fraction
from typing import Any

from fleet_server import gates
from fleet_server.gates import Histograms, Policy
from fleet_server.models import DeviceRolloutState as DS
from fleet_server.models import RolloutState as RS

FAILED_DEPLOYMENT_STATES = ("failed", "rejected", "reverted")
PROBATION_STATE = "probation"


@dataclass(frozen=True)
class RolloutSnapshot:
    id: str
    state: str
    model_sha256: str
    stages: tuple[float, ...]  # cumulative percents (or counts), strictly increasing
    current_stage: int
    stage_ready_at: datetime | None  # when the current stage finished (soak start)
    soak_seconds: float
    device_timeout_seconds: float
    max_error_rate: float
    min_inferences: int
    max_failure_rate: float
    policy: Policy = field(default_factory=Policy)
    stage_unit: str = "percent"
    started_at: datetime | None = None
    approved_through: int = -1
    rollback_requested: bool = False


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
    event_failure: str | None = None  # reason of a failed/rejected/reverted event for ``seq``
    event_progress: bool = False  # any event for ``seq``
    served_ok: int = 0
    inferences: int = 0
    errors: int = 0
    hardware_id: str = ""
    attempts: int = 1
    retry_at: datetime | None = None
    latency_buckets: tuple[int, ...] = ()
    output_hist: tuple[int, ...] = ()
    shadow_samples: int = 0
    shadow_agree: int = 0
    reason: str | None = None  # why it is in its state (stored with the state)


@dataclass(frozen=True)
class DeviceChange:
    device_id: str
    state: str
    reason: str | None = None
    stage: int | None = None
    retry_at: datetime | None = None
    attempts: int = 1  # for notify: which attempt this directive is


@dataclass(frozen=True)
class Decision:
    action: str
    reason: str
    figures: dict[str, Any] = field(default_factory=dict)


@dataclass
class Plan:
    """What the ticker must do.

    ``notify``: send the rollout model (state ``notified``) or ask to shadow it
    (state ``shadowing``); ``roll_back``: send the previous model.
    """

    state: str
    current_stage: int
    stage_ready_at: datetime | None
    changes: list[DeviceChange] = field(default_factory=list)
    notify: list[DeviceChange] = field(default_factory=list)
    roll_back: list[str] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)
    rollback_done: bool = False  # an operator roll back request was carried out

    @property
    def empty(self) -> bool:
        return not (self.changes or self.notify or self.roll_back or self.decisions)


def assignment_order(rollout_id: str, device_id: str) -> str:
    """Deterministic, evenly spread order of devices within a rollout."""
    return hashlib.sha256(f"{rollout_id}{device_id}".encode()).hexdigest()


def stage_target(percent: float, targeted: int, unit: str = "percent") -> int:
    """Cumulative device count of a stage: ceil(percent% of targeted), exact for decimal percents."""
    if unit == "count":
        return min(targeted, int(percent))
    share = Fraction(percent).limit_denominator(10**6) * targeted / 100
    return min(targeted, math.ceil(share))


def _failure(d: DeviceSnapshot, r: RolloutSnapshot, now: datetime) -> str | None:
    """Why an in-flight device failed (``class: detail``), or None."""
    if d.event_failure is not None:
        return d.event_failure
    if d.seq is not None and d.reported_seq == d.seq and d.reported_state in FAILED_DEPLOYMENT_STATES:
        if d.reported_state == "reverted":
            return f"reverted: {d.reported_error}" if d.reported_error else "reverted"
        return d.reported_error or d.reported_state
    if d.notified_at is not None and (now - d.notified_at).total_seconds() > r.device_timeout_seconds:
        return f"timed_out: no success within {r.device_timeout_seconds:g}s"
    return None


def observe(d: DeviceSnapshot, r: RolloutSnapshot, now: datetime) -> tuple[str, str | None, datetime | None]:
    """New state of an in-flight device from what it reported (state, reason, retry_at)."""
    if d.state == DS.RETRY_WAIT:
        return d.state, None, d.retry_at
    proves = d.served_ok > 0 or d.inferences - d.errors > 0
    if (
        d.state != DS.SHADOWING
        and d.running_sha256 == r.model_sha256
        and proves
        and d.reported_state != PROBATION_STATE
    ):
        return DS.DONE, "serving the rollout model", None
    why = _failure(d, r, now)
    if why is not None:
        cls = gates.failure_class(why)
        if d.attempts <= gates.retries_allowed(r.policy, cls):
            wait = r.policy.retry_backoff_seconds * 2 ** (d.attempts - 1)
            return DS.RETRY_WAIT, f"{why} (retry {d.attempts} in {wait:g}s)", now + timedelta(seconds=wait)
        return (DS.TIMED_OUT if cls == "timed_out" else DS.FAILED), why, None
    if d.state == DS.SHADOWING:
        return d.state, None, None
    progressed = d.event_progress or (d.seq is not None and d.reported_seq == d.seq)
    if d.state == DS.NOTIFIED and (progressed or d.running_sha256 == r.model_sha256):
        return DS.INSTALLING, None, None
    return d.state, None, None


def decide(
    r: RolloutSnapshot,
    devices: Sequence[DeviceSnapshot],
    now: datetime,
    baseline: Mapping[str, Histograms] | None = None,
) -> Plan:
    """One engine step for one rollout. Pure: same inputs, same plan.

    ``baseline``: per hardware id, the summed sketches of the models the
    rollout's devices ran before (the comparison of the relative gates).
    """
    plan = Plan(state=r.state, current_stage=r.current_stage, stage_ready_at=r.stage_ready_at)
    state = {d.device_id: d.state for d in devices}
    reasons = {d.device_id: d.reason for d in devices}
    if r.rollback_requested:
        plan.rollback_done = True
        return _roll_back(
            plan, devices, state, "operator: roll back to the last good release", {}, "operator"
        )
    if r.state not in RS.ACTIVE:
        return plan
    p = r.policy

    # 1. What happened to the devices already notified.
    for d in devices:
        if d.state in DS.IN_FLIGHT:
            new, reason, retry_at = observe(d, r, now)
            if new != d.state:
                state[d.device_id], reasons[d.device_id] = new, reason
                plan.changes.append(DeviceChange(d.device_id, new, reason, retry_at=retry_at))

    # 2. The gates, over every device assigned so far.
    assigned = [d for d in devices if d.stage is not None]
    stage_finished = bool(assigned) and not any(state[d.device_id] in DS.IN_FLIGHT for d in assigned)
    figures = _figures(r, assigned, state, baseline or {})
    failure_classes: dict[str, int] = {}
    for d in assigned:
        if state[d.device_id] in (DS.FAILED, DS.TIMED_OUT):
            cls = gates.failure_class(reasons[d.device_id])
            failure_classes[cls] = failure_classes.get(cls, 0) + 1
    figures["failure_classes"] = dict(sorted(failure_classes.items()))
    trip = gates.check(p, figures, stage_finished)
    if trip is not None and trip.action == gates.ROLL_BACK:
        return _roll_back(plan, devices, state, trip.reason, figures, trip.gate)
    if trip is not None and r.approved_through < plan.current_stage:
        if r.state != RS.PAUSED:
            plan.state = RS.PAUSED
            plan.decisions.append(Decision("pause", trip.reason, {**figures, "gate": trip.gate}))
        return plan
    if r.state == RS.PAUSED:
        return plan

    # 3. Shadow promotion, retries and new assignments, within the rate limit.
    budget = _budget(r, devices, now)
    shadow_first = p.min_shadow_agreement is not None and not gates.shadow_passed(p, figures)
    ordered = sorted(
        devices, key=lambda d: assignment_order(r.id, d.device_id)
    )  # input order must not matter
    promote = [d for d in ordered if state[d.device_id] == DS.SHADOWING and not shadow_first]
    for d in promote:
        state[d.device_id] = DS.NOTIFIED
        plan.notify.append(
            DeviceChange(d.device_id, DS.NOTIFIED, "shadow agreement passed", d.stage, attempts=d.attempts)
        )
    if promote:
        plan.decisions.append(
            Decision("promote", f"shadow agreement passed: {len(promote)} device(s) get the model", figures)
        )
    fresh = DS.SHADOWING if shadow_first else DS.NOTIFIED
    for d in ordered:
        if state[d.device_id] == DS.RETRY_WAIT and d.retry_at is not None and d.retry_at <= now:
            if budget is not None and budget <= 0:
                break
            state[d.device_id] = fresh
            plan.notify.append(
                DeviceChange(d.device_id, fresh, f"retry {d.attempts}", d.stage, attempts=d.attempts + 1)
            )
            budget = None if budget is None else budget - 1

    pending = [d for d in ordered if d.stage is None and state[d.device_id] == DS.PENDING]
    n_assigned = len(assigned)
    while True:
        target = stage_target(r.stages[plan.current_stage], len(devices), r.stage_unit)
        if n_assigned < target and pending:
            room = target - n_assigned if budget is None else min(target - n_assigned, budget)
            if room <= 0:
                return plan
            batch, pending = pending[:room], pending[room:]
            for d in batch:
                state[d.device_id] = fresh
                plan.notify.append(DeviceChange(d.device_id, fresh, None, plan.current_stage))
            plan.stage_ready_at = None
            plan.decisions.append(
                Decision(
                    "assign",
                    f"stage {plan.current_stage + 1}/{len(r.stages)}: "
                    f"{'shadow' if fresh == DS.SHADOWING else 'notify'} {len(batch)} device(s)",
                    {
                        "stage": plan.current_stage,
                        "target_count": target,
                        "notified": len(batch),
                        "rate_budget": budget,
                    },
                )
            )
            return plan
        if any(s in DS.IN_FLIGHT for s in state.values()):
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
                Decision("completed", f"last stage soaked {soaked:.1f}s with the gates passing", figures)
            )
            return plan
        if p.require_approval and r.approved_through < plan.current_stage:
            if r.state != RS.AWAITING_APPROVAL:
                plan.state = RS.AWAITING_APPROVAL
                plan.decisions.append(
                    Decision(
                        "await_approval",
                        f"stage {plan.current_stage + 1} soaked {soaked:.1f}s; a human must approve the next",
                        figures,
                    )
                )
            return plan
        plan.state = RS.RUNNING
        plan.current_stage += 1
        plan.stage_ready_at = None
        plan.decisions.append(
            Decision(
                "next_stage",
                f"stage {plan.current_stage} soaked {soaked:.1f}s; starting stage {plan.current_stage + 1}",
                figures,
            )
        )


def _budget(r: RolloutSnapshot, devices: Sequence[DeviceSnapshot], now: datetime) -> int | None:
    if r.policy.rate_per_minute is None:
        return None
    recent = sum(
        1 for d in devices if d.notified_at is not None and 0 <= (now - d.notified_at).total_seconds() < 60
    )
    minutes = (now - r.started_at).total_seconds() / 60 if r.started_at else 0.0
    return gates.rate_budget(r.policy, minutes, recent)


def _figures(
    r: RolloutSnapshot,
    assigned: Sequence[DeviceSnapshot],
    state: dict[str, str],
    baseline: Mapping[str, Histograms],
) -> dict[str, Any]:
    inferences = sum(d.inferences for d in assigned)
    errors = sum(d.errors for d in assigned)
    failed = sum(1 for d in assigned if state[d.device_id] in (DS.FAILED, DS.TIMED_OUT))
    done = sum(1 for d in assigned if state[d.device_id] == DS.DONE)
    shadow_samples = sum(d.shadow_samples for d in assigned)
    shadow_agree = sum(d.shadow_agree for d in assigned)
    figures: dict[str, Any] = {
        "assigned": len(assigned),
        "done": done,
        "failed": failed,
        "failure_rate": failed / len(assigned) if assigned else 0.0,
        "max_failure_rate": r.max_failure_rate,
        "success_rate": done / len(assigned) if assigned else 0.0,
        "inferences": inferences,
        "errors": errors,
        "error_rate": errors / inferences if inferences else 0.0,
        "max_error_rate": r.max_error_rate,
        "min_inferences": r.min_inferences,
        "shadow_samples": shadow_samples,
        "shadow_agreement": shadow_agree / shadow_samples if shadow_samples else None,
    }
    p = r.policy
    if p.max_latency_ratio is not None or p.max_output_psi is not None:
        groups: dict[str, list[Histograms]] = {}
        for d in assigned:
            groups.setdefault(d.hardware_id, []).append(Histograms(d.latency_buckets, d.output_hist))
        new = {hw: gates.merge(hs) for hw, hs in groups.items()}
        if p.max_latency_ratio is not None:
            figures.update(gates.latency_figures(p, new, baseline))
        if p.max_output_psi is not None:
            figures.update(gates.drift_figures(new, baseline))
    return figures


def _roll_back(
    plan: Plan,
    devices: Sequence[DeviceSnapshot],
    state: dict[str, str],
    reason: str,
    figures: dict[str, Any],
    gate: str,
) -> Plan:
    """Every device that was sent the new model goes back to its previous one; pending ones never get it."""
    earlier = {c.device_id: c for c in plan.changes}
    sent = DS.IN_FLIGHT + DS.FINISHED
    changes = [c for c in plan.changes if c.state not in sent]
    for d in devices:
        prior = state[d.device_id]
        if prior in sent:
            plan.roll_back.append(d.device_id)
            why = earlier[d.device_id].reason if d.device_id in earlier else None
            note = f"rolled back (was {prior}{': ' + why if why else ''})"
            changes.append(DeviceChange(d.device_id, DS.ROLLED_BACK, note))
    plan.changes = changes
    plan.state = RS.ROLLED_BACK
    plan.decisions.append(
        Decision("roll_back", reason, {**figures, "gate": gate, "rolled_back": len(plan.roll_back)})
    )
    return plan
