"""The rollout decision, as pure functions: a snapshot of one rollout in, a plan out
(``decide``), and the plan applied to the snapshot (``apply_plan``).

No I/O here: the ticker reads the snapshot from the store, calls ``decide``, and
writes what ``apply_plan`` computes (rows) plus the signed directives. That keeps
every rule below testable without a database or a broker, and makes a restart
resume exactly: everything ``decide`` reads is persisted. Every state change goes
through the tables of ``fleet_server.lifecycle`` (drawn in docs/rollouts.md), so a
rule that tried an undesigned move would raise rather than write it.

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
  it was sent, and times out after ``device_timeout_seconds``. A device that
  reports waiting for that seq (its maintenance window, an app's deferral, its
  metered link) is ``waiting``: not a failure, and its timeout clock stops; it
  starts again from zero when the device stops waiting (``timeout_from``), so a
  device that waited for Saturday night still has the whole timeout to prove the
  model then. Waiting longer than ``max_wait_seconds`` is a timeout. A stage
  waits for its waiting devices, and the gates judge only the devices that are
  not waiting (``assigned`` counts those; ``waiting`` the others). A failure whose
  class has retries left waits ``backoff * 2**(attempt-1)`` and is re-sent.
- Gates (gates.py) over every device assigned so far decide: nothing, pause
  (a human decides; ``approve`` accepts the stage) or roll back. The gates are
  checked while paused too: pausing stops assignment, not protection. Devices
  that could not fetch the release (a delivery failure class) are retried by
  default and, once failed, pause the rollout rather than roll it back when
  only they make an install gate trip (``delivery_action``). A human who resumes the paused
  rollout sends them the release again (``redelivery``: back to ``retry_wait``, due at once).
- The gates are judged per cohort (devices of one hardware id: a model may fail
  on one class of hardware only) and pooled over the cohorts still going. A
  cohort that fails alone is rolled back or paused alone and its unassigned
  devices are ``held``; the rollout acts as a whole only when every cohort
  fails or is halted, or when the pooled gate fails and no going cohort
  contradicts it (docs/rollouts.md, "Gates per hardware class").
- When every assigned device has finished, the success threshold holds and the
  soak time has passed, the next stage starts (after a human approval when the
  policy asks for one); after the last stage the rollout is ``completed``. With
  an accuracy gate, a stage also waits until both models have ``min_labels``
  labelled predictions (the gate has not judged before), at most
  ``max_label_wait_seconds`` after its devices finished; then it pauses for a
  human instead of promoting blind.
- An operator roll back (any state) sends every device that got the new model
  back to the model it ran before.
- Every judgement of time that reads what devices sent counts only the time the
  server has heard (``heard_for``): while ingest is behind (``ingest_lag``, the
  measured wait of a message published now), what a device sent in the last
  ``ingest_lag`` seconds is not in the store yet, so the device timeout, the
  wait limit, the soak and the label wait are all measured up to ``now -
  ingest_lag``. A lag that came and went needs nothing more: once ingest has
  caught up, what the device sent during it is stored and read like any report
  (a success is seen before a timeout is considered). Judgements on evidence
  already stored (a failure report, a gate that trips) are not delayed: late
  telemetry cannot make stored evidence untrue, and protection must not wait.
  Times the engine sets itself (``retry_at``, the rate limit) are server time.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fractions import Fraction
from typing import Any

from device_agent.protocol import DeploymentState
from fleet_server import gates
from fleet_server.gates import Histograms
from fleet_server.lifecycle import DEVICE, ROLLOUT
from fleet_server.lifecycle import DeviceRolloutState as DS
from fleet_server.lifecycle import DeviceTrigger as DT
from fleet_server.lifecycle import RolloutState as RS
from fleet_server.lifecycle import RolloutTrigger as RT
from fleet_server.policy import DELIVERY_FAILURES, Policy, ServerFailure

# What a device reports when the seq it was sent did not bring the rollout model into service.
FAILED_DEPLOYMENT_STATES = (DeploymentState.FAILED, DeploymentState.REJECTED, DeploymentState.REVERTED)
PROBATION = DeploymentState.PROBATION
SENT = DEVICE.sources(DT.ROLL_BACK)  # devices that were sent the model: a roll back concerns them
# The states the loops over every device compare with, as module globals: looking a member up on
# its enum class takes about twice as long, and at 10,000 devices decide makes ~100,000 such checks.
PENDING, SHADOWING, NOTIFIED, RETRY_WAIT = DS.PENDING, DS.SHADOWING, DS.NOTIFIED, DS.RETRY_WAIT
INSTALLING, WAITING = DS.INSTALLING, DS.WAITING
DONE, FAILED, TIMED_OUT, ROLLED_BACK = DS.DONE, DS.FAILED, DS.TIMED_OUT, DS.ROLLED_BACK
HELD = DS.HELD  # a not-yet-assigned device whose cohort (hardware id) is halted by a gate
IN_FLIGHT = DS.IN_FLIGHT


@dataclass(frozen=True)
class RolloutSnapshot:
    id: str
    state: RS
    model_sha256: str
    stages: tuple[float, ...]  # cumulative percents (or counts), strictly increasing
    current_stage: int
    stage_ready_at: datetime | None  # when the current stage finished (soak start)
    policy: Policy = field(default_factory=Policy)
    stage_unit: str = "percent"
    started_at: datetime | None = None
    approved_through: int = -1
    rollback_requested: bool = False


@dataclass(frozen=True)
class DeviceSnapshot:
    """One targeted device as the engine sees it; figures concern the rollout's model hash."""

    device_id: str
    state: DS
    stage: int | None = None
    seq: int | None = None  # seq of the directive that carried the rollout model
    desired_seq: int = 0  # seq of the last directive sent to the device, whatever it carried
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
    labels: int = 0  # its predictions that an app labelled with the truth
    labels_correct: int = 0  # ... that the model got right
    reason: str | None = None  # why it is in its state (stored with the state)
    waiting: str | None = None  # why the device reports waiting for ``seq`` (None: it does not)
    timeout_from: datetime | None = None  # the timeout clock's start, when not ``notified_at``


@dataclass(frozen=True)
class DeviceChange:
    device_id: str
    state: DS
    reason: str | None = None
    stage: int | None = None
    retry_at: datetime | None = None
    attempts: int = 1  # for notify: which attempt this directive is
    timeout_from: datetime | None = None  # restart the timeout clock here (None: leave it)


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

    state: RS
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

    @property
    def touched(self) -> list[str]:
        """Every device the plan changes or sends a directive to, sorted."""
        return sorted(
            {c.device_id for c in self.changes} | {c.device_id for c in self.notify} | set(self.roll_back)
        )


def apply_plan(
    r: RolloutSnapshot, devices: Sequence[DeviceSnapshot], plan: Plan, now: datetime
) -> tuple[RolloutSnapshot, list[DeviceSnapshot]]:
    """The rollout and its devices once ``plan`` is carried out at ``now`` (same device order).

    This is what the ticker writes back (and what the next ``decide`` reads), so a test driving
    ``decide`` tick by tick sees exactly what the server would. Changes first, then the
    directives: a held device released and assigned in one plan ends up assigned. Every directive
    takes the device's next seq; one that carries the rollout model (``notify``) starts a new
    attempt, so events and reports for the earlier seq no longer count.
    """
    by_id = {d.device_id: d for d in devices}
    for c in plan.changes:
        d = by_id[c.device_id]
        by_id[c.device_id] = dataclasses.replace(
            d,
            state=c.state,
            reason=c.reason,
            retry_at=c.retry_at,
            timeout_from=c.timeout_from if c.timeout_from is not None else d.timeout_from,
        )
    for c in plan.notify:
        d = by_id[c.device_id]
        by_id[c.device_id] = dataclasses.replace(
            d,
            state=c.state,
            reason=c.reason,
            stage=c.stage,
            seq=d.desired_seq + 1,
            desired_seq=d.desired_seq + 1,
            notified_at=now,
            attempts=c.attempts,
            retry_at=None,
            event_failure=None,
            event_progress=False,
            waiting=None,
            timeout_from=None,
        )
    for device_id in plan.roll_back:
        d = by_id[device_id]
        by_id[device_id] = dataclasses.replace(d, desired_seq=d.desired_seq + 1)
    rollout = dataclasses.replace(
        r,
        state=plan.state,
        current_stage=plan.current_stage,
        stage_ready_at=plan.stage_ready_at,
        rollback_requested=r.rollback_requested and not plan.rollback_done,
    )
    return rollout, [by_id[d.device_id] for d in devices]


def assignment_order(rollout_id: str, device_id: str) -> str:
    """Deterministic, evenly spread order of devices within a rollout."""
    return hashlib.sha256(f"{rollout_id}{device_id}".encode()).hexdigest()


def stage_target(percent: float, targeted: int, unit: str = "percent") -> int:
    """Cumulative device count of a stage: ceil(percent% of targeted), exact for decimal percents."""
    if unit == "count":
        return min(targeted, int(percent))
    share = Fraction(percent).limit_denominator(10**6) * targeted / 100
    return min(targeted, math.ceil(share))


def heard_for(start: datetime, now: datetime, ingest_lag: float) -> float:
    """Seconds since ``start`` whose reports the server has stored: ``now - ingest_lag - start``.

    ``ingest_lag`` is how long a message published now waits before it is stored; ingest is
    first in, first out, so at ``now`` the store holds what devices sent up to about ``now -
    ingest_lag`` and nothing after. A judgement of "nothing came within T seconds" is fair only
    over those seconds: counting the rest blames a device for the server being behind (a
    working device whose success report waits minutes in the broker's queue for a busy ingest
    worker). Never below zero, so a clock started at ``now`` during a lag stays at zero.
    """
    return max((now - start).total_seconds() - max(ingest_lag, 0.0), 0.0)


def _behind(ingest_lag: float) -> str:
    """What a timeout's reason says about a lag it forgave (nothing when ingest kept up)."""
    return f" (ingest {ingest_lag:.0f}s behind)" if ingest_lag >= 1 else ""


def _failure(d: DeviceSnapshot, r: RolloutSnapshot, now: datetime, ingest_lag: float = 0.0) -> str | None:
    """Why an in-flight device failed (``class: detail``), or None; timeouts count heard time only."""
    if d.event_failure is not None:
        return d.event_failure
    if d.seq is not None and d.reported_seq == d.seq and d.reported_state in FAILED_DEPLOYMENT_STATES:
        if d.reported_state == DeploymentState.REVERTED:
            return (
                f"{ServerFailure.REVERTED}: {d.reported_error}"
                if d.reported_error
                else ServerFailure.REVERTED
            )
        return d.reported_error or d.reported_state
    start = d.timeout_from or d.notified_at
    if start is None:
        return None
    heard = heard_for(start, now, ingest_lag)
    if d.state == WAITING:
        limit = r.policy.max_wait_seconds
        if heard > limit:
            return (
                f"{ServerFailure.TIMED_OUT}: waited more than {limit:g}s ({d.waiting or 'waiting'})"
                f"{_behind(ingest_lag)}"
            )
        return None
    timeout = r.policy.device_timeout_seconds
    if heard > timeout:
        return f"{ServerFailure.TIMED_OUT}: no success within {timeout:g}s{_behind(ingest_lag)}"
    return None


RESENT_ON_RESUME = "sent the release again: the rollout resumed after a delivery hold"
RELEASED_ON_RESUME = "cohort released: the rollout resumed after a delivery hold"


@dataclass(frozen=True)
class Redelivery:
    """What resuming a paused rollout does to its devices (``redelivery``).

    ``resent``: devices that could not fetch the release, back to ``retry_wait`` with ``retry_at``
    the resume and no attempt made (``attempts`` 0): the engine's retry path sends them the
    release on its next tick as attempt 1, so they get the policy's delivery retries anew.
    ``released``: the ``held`` devices of the paused hardware classes those devices belong to,
    back to ``pending``.
    """

    resent: list[DeviceChange]
    released: list[DeviceChange]

    @property
    def changes(self) -> list[DeviceChange]:
        return [*self.resent, *self.released]

    def apply(self, devices: Sequence[DeviceSnapshot]) -> list[DeviceSnapshot]:
        """``devices`` as the resume writes them back (same order), as ``apply_plan`` does for a tick."""
        by_id = {c.device_id: c for c in self.changes}
        resent = {c.device_id for c in self.resent}
        out = []
        for d in devices:
            c = by_id.get(d.device_id)
            if c is None:
                out.append(d)
                continue
            attempts = c.attempts if d.device_id in resent else d.attempts
            timeout_from = None if d.device_id in resent else d.timeout_from  # as ``_resume`` writes it
            out.append(
                dataclasses.replace(
                    d,
                    state=c.state,
                    reason=c.reason,
                    retry_at=c.retry_at,
                    attempts=attempts,
                    timeout_from=timeout_from,
                )
            )
        return out


def redelivery(devices: Sequence[DeviceSnapshot], now: datetime) -> Redelivery:
    """The devices a resume of a paused rollout sends the release again, and the devices it releases.

    A device ``failed`` with a delivery class (``policy.DELIVERY_FAILURES``, read from its stored
    reason) judged nothing about the model: the mirror, CDN or link could not hand the release
    over. Once a human has fixed that and resumes, leaving it failed would only pause the rollout
    again on the next tick, its failure still counted. Every other failure (the model's own,
    ``timed_out``: it may have fetched the model and hung on it, security verdicts on what was
    fetched) stays final. A cohort rolled back keeps its devices where they are.

    A hardware class paused by a gate holds its unassigned devices (``held``), and a held class is
    halted: the engine sends its devices nothing, not even a retry. A class the delivery gate held
    (its held devices' reason says so: ``gates.held_for_delivery``) has its held devices released
    along with the devices sent again. A class another gate held (the model failed its own
    installs, errors, latency) keeps them held and its failed devices failed: the devices sent
    again would change what that gate saw (in flight, they no longer count as failed, and the
    rate's denominator grows), and it could pass a model it had stopped. That class is for
    ``approve`` (accept it as it is) or ``rollback``.
    """
    # classes whose devices stay where they are: rolled back, or held by a gate that judged the model
    excluded = {d.hardware_id for d in devices if d.state == ROLLED_BACK}
    excluded |= {d.hardware_id for d in devices if d.state == HELD and not gates.held_for_delivery(d.reason)}
    ordered = sorted(devices, key=lambda d: d.device_id)
    resent = [
        DeviceChange(
            d.device_id,
            DEVICE.move(d.state, DT.REDELIVER),
            f"{RESENT_ON_RESUME} (was failed: {d.reason})",
            retry_at=now,
            attempts=0,
        )
        for d in ordered
        if d.state == FAILED
        and d.hardware_id not in excluded
        and gates.failure_class(d.reason) in DELIVERY_FAILURES
    ]
    again = {c.device_id for c in resent}
    classes = {d.hardware_id for d in ordered if d.device_id in again}
    released = [
        DeviceChange(d.device_id, DEVICE.move(d.state, DT.RELEASE), RELEASED_ON_RESUME)
        for d in ordered
        if d.state == HELD and d.hardware_id in classes
    ]
    return Redelivery(resent, released)


def observe(
    d: DeviceSnapshot, r: RolloutSnapshot, now: datetime, ingest_lag: float = 0.0
) -> DeviceChange | None:
    """What an in-flight device's reports move it to, if anything (``ingest_lag``: see ``heard_for``)."""
    if d.state == RETRY_WAIT:
        return None
    proves = d.served_ok > 0 or d.inferences - d.errors > 0
    if (
        d.state != SHADOWING
        and d.running_sha256 == r.model_sha256
        and proves
        and d.reported_state != PROBATION
    ):
        return DeviceChange(d.device_id, DEVICE.move(d.state, DT.SERVING_PROOF), "serving the rollout model")
    if d.waiting is not None and d.state in (NOTIFIED, INSTALLING) and d.event_failure is None:
        # Not a failure and not late: the timeout clock stops; the wait has its own limit.
        return DeviceChange(
            d.device_id, DEVICE.move(d.state, DT.WAIT), f"waiting: {d.waiting}", timeout_from=now
        )
    if d.state == WAITING and d.waiting is None and d.event_failure is None:
        reported_failure = d.reported_seq == d.seq and d.reported_state in FAILED_DEPLOYMENT_STATES
        if not reported_failure:
            return DeviceChange(
                d.device_id, DEVICE.move(d.state, DT.PROCEED), "stopped waiting", timeout_from=now
            )
    why = _failure(d, r, now, ingest_lag)
    if why is not None:
        cls = gates.failure_class(why)
        if d.attempts <= gates.retries_allowed(r.policy, cls):
            wait = r.policy.retry_backoff_seconds * 2 ** (d.attempts - 1)
            return DeviceChange(
                d.device_id,
                DEVICE.move(d.state, DT.FAIL_RETRYABLE),
                f"{why} (retry {d.attempts} in {wait:g}s)",
                retry_at=now + timedelta(seconds=wait),
            )
        return DeviceChange(
            d.device_id, DEVICE.move(d.state, DT.TIME_OUT if cls == ServerFailure.TIMED_OUT else DT.FAIL), why
        )
    if d.state == SHADOWING:
        return None
    progressed = d.event_progress or (d.seq is not None and d.reported_seq == d.seq)
    if d.state == NOTIFIED and (progressed or d.running_sha256 == r.model_sha256):
        return DeviceChange(d.device_id, DEVICE.move(d.state, DT.PROGRESS))
    return None


def decide(
    r: RolloutSnapshot,
    devices: Sequence[DeviceSnapshot],
    now: datetime,
    baseline: Mapping[str, Histograms] | None = None,
    ingest_lag: float = 0.0,
) -> Plan:
    """One engine step for one rollout. Pure: same inputs, same plan.

    ``baseline``: per hardware id, the summed sketches of the models the
    rollout's devices ran before (the comparison of the relative gates).
    ``ingest_lag``: seconds the server's ingest is behind now (the ticker passes its
    measurement); the timeouts, the soak and the label wait count only heard time
    (``heard_for``).
    """
    plan = Plan(state=r.state, current_stage=r.current_stage, stage_ready_at=r.stage_ready_at)
    state = {d.device_id: d.state for d in devices}
    reasons = {d.device_id: d.reason for d in devices}
    if r.rollback_requested:
        plan.rollback_done = True
        return _roll_back(
            plan, devices, state, "operator: roll back to the last good release", {}, "operator", RT.ROLLBACK
        )
    if r.state not in RS.ACTIVE:
        return plan
    p = r.policy

    # 1. What happened to the devices already notified.
    for d in devices:
        if d.state in IN_FLIGHT:
            change = observe(d, r, now, ingest_lag)
            if change is not None:
                state[d.device_id], reasons[d.device_id] = change.state, change.reason
                plan.changes.append(change)

    # 2. The gates, per cohort (hardware id) and pooled over the cohorts still going.
    assigned = [d for d in devices if d.stage is not None]
    j = _judge(r, plan, devices, state, reasons, baseline or {})
    whole = j.overall_trip
    whole_figures = j.overall
    # A failure is isolated to its hardware classes only when another class has proved the
    # model (a device of it is done) or still may in this stage (a device of it is on its way):
    # a failure that shows at install (the on-device acceptance check) comes before any device
    # of a healthy class is done, and must not roll that class back. With neither — a canary
    # stage that held one class only — the failure may well be everywhere: the whole rollout
    # acts, so the broken model never reaches more devices than the canary.
    if whole is None and j.failing and not _proven(j, state) and not _on_their_way(j, state):
        whole = _all_cohorts_trip(j)
        whole_figures = _figures(
            r,
            [d for d in assigned if d.hardware_id not in j.rolled],
            state,
            reasons,
            baseline,
            len(j.cohorts),
        )
    if whole is not None and whole.action == gates.ROLL_BACK:
        return _roll_back(
            plan,
            devices,
            state,
            whole.reason,
            {**whole_figures, **_whole_notes(j)},
            whole.gate,
            RT.GATE_ROLL_BACK,
        )
    for hw, trip in sorted(j.failing.items()):
        if trip.action == gates.ROLL_BACK:
            _roll_back_cohort(plan, j.cohorts[hw], state, reasons, trip, j.verdicts[hw])
        elif hw not in j.held and whole is None:  # a whole-rollout pause stops every cohort anyway
            _hold_cohort(plan, j.cohorts[hw], state, reasons, trip, j.verdicts[hw])
    for hw in sorted(j.rolled | j.held):  # devices that joined a halted cohort since
        _hold_cohort(
            plan, j.cohorts[hw], state, reasons, None, {}, "rolled back" if hw in j.rolled else "paused"
        )
    if whole is not None:
        if r.state != RS.PAUSED:
            plan.state = ROLLOUT.move(plan.state, RT.GATE_PAUSE)
            notes = {**whole_figures, **_whole_notes(j), "gate": whole.gate}
            plan.decisions.append(Decision("pause", whole.reason, notes))
        return plan
    if r.state == RS.PAUSED:
        return plan
    halted = j.halted
    figures = {**j.overall, "cohorts": j.going_figures, "halted_cohorts": _halted_summary(j, state)}

    # 3. Shadow promotion, retries and new assignments, within the rate limit; halted cohorts get none.
    budget = _budget(r, devices, now)
    shadow_first = p.min_shadow_agreement is not None and not gates.shadow_passed(p, j.overall)
    ordered = sorted(
        (d for d in devices if d.hardware_id not in halted),
        key=lambda d: assignment_order(r.id, d.device_id),
    )  # input order must not matter
    promote = [d for d in ordered if state[d.device_id] == SHADOWING and not shadow_first]
    for d in promote:
        state[d.device_id] = DEVICE.move(state[d.device_id], DT.PROMOTE)
        plan.notify.append(
            DeviceChange(
                d.device_id, state[d.device_id], "shadow agreement passed", d.stage, attempts=d.attempts
            )
        )
    if promote:
        plan.decisions.append(
            Decision("promote", f"shadow agreement passed: {len(promote)} device(s) get the model", figures)
        )
    assign, retry = (DT.ASSIGN_SHADOW, DT.RETRY_SHADOW) if shadow_first else (DT.ASSIGN, DT.RETRY)
    for d in ordered:
        if state[d.device_id] == RETRY_WAIT and d.retry_at is not None and d.retry_at <= now:
            if budget is not None and budget <= 0:
                break
            state[d.device_id] = DEVICE.move(state[d.device_id], retry)
            why = f"retry {d.attempts}" if d.attempts else RESENT_ON_RESUME
            plan.notify.append(
                DeviceChange(d.device_id, state[d.device_id], why, d.stage, attempts=d.attempts + 1)
            )
            budget = None if budget is None else budget - 1

    pending = [d for d in ordered if d.stage is None and state[d.device_id] == PENDING]
    n_assigned = len(assigned)
    while True:
        target = stage_target(r.stages[plan.current_stage], len(devices), r.stage_unit)
        if n_assigned < target and pending:
            room = target - n_assigned if budget is None else min(target - n_assigned, budget)
            if room <= 0:
                return plan
            batch, pending = pending[:room], pending[room:]
            for d in batch:
                state[d.device_id] = DEVICE.move(state[d.device_id], assign)
                plan.notify.append(DeviceChange(d.device_id, state[d.device_id], None, plan.current_stage))
            plan.stage_ready_at = None
            plan.decisions.append(
                Decision(
                    "assign",
                    f"stage {plan.current_stage + 1}/{len(r.stages)}: "
                    f"{'shadow' if shadow_first else 'notify'} {len(batch)} device(s)",
                    {
                        "stage": plan.current_stage,
                        "target_count": target,
                        "notified": len(batch),
                        "rate_budget": budget,
                        "cohorts": dict(sorted(Counter(d.hardware_id for d in batch).items())),
                        "halted_cohorts": sorted(halted),
                    },
                )
            )
            return plan
        # The stage waits for the devices of the cohorts still going; a halted cohort's stay as they are.
        if any(state[d.device_id] in IN_FLIGHT for d in ordered):
            return plan
        if j.deferred is not None:  # a pooled gate fails: wait for the cohorts' own verdicts
            return plan
        if plan.stage_ready_at is None:
            plan.stage_ready_at = now
            plan.decisions.append(
                Decision(
                    "stage_finished",
                    f"stage {plan.current_stage + 1}: every device finished; soaking {p.soak_seconds:g}s",
                    figures,
                )
            )
        # The soak watches the stage's devices serving: only the time whose telemetry is stored
        # counts, or a stage would be promoted on seconds of telemetry nobody has read yet.
        soaked = heard_for(plan.stage_ready_at, now, ingest_lag)
        if soaked < p.soak_seconds:
            return plan
        wanted = gates.labels_wanted(p, j.overall)
        if wanted is not None and r.approved_through < plan.current_stage:
            # Not passing: the accuracy gate has not judged. Wait for the labels (they come late:
            # the truth is often known hours after the prediction), then ask a human.
            if soaked < p.max_label_wait_seconds:
                return plan
            plan.state = ROLLOUT.move(plan.state, RT.GATE_PAUSE)
            plan.decisions.append(
                Decision(
                    "pause",
                    f"stage {plan.current_stage + 1} waited {soaked:.0f}s for labels and has only "
                    f"{wanted}: a human decides (approve promotes without them)",
                    {**figures, "gate": "label_wait", "waited_seconds": round(soaked, 1)},
                )
            )
            return plan
        if plan.current_stage + 1 >= len(r.stages):
            paused = sorted(j.paused)
            if paused:
                if r.state != RS.PAUSED:
                    plan.state = ROLLOUT.move(plan.state, RT.GATE_PAUSE)
                    plan.decisions.append(
                        Decision(
                            "pause",
                            f"last stage soaked {soaked:.1f}s for the other hardware classes; "
                            f"{', '.join(map(repr, paused))} paused by a gate: a human decides "
                            "(approve completes them, rollback or abort ends the rollout)",
                            {**figures, "gate": "cohort_paused"},
                        )
                    )
                return plan
            plan.state = ROLLOUT.move(plan.state, RT.COMPLETE)
            rolled = sorted(halted - j.paused)
            note = f"; rolled back on {', '.join(map(repr, rolled))} only" if rolled else ""
            plan.decisions.append(
                Decision(
                    "completed", f"last stage soaked {soaked:.1f}s with the gates passing{note}", figures
                )
            )
            return plan
        if p.require_approval and r.approved_through < plan.current_stage:
            if r.state != RS.AWAITING_APPROVAL:
                plan.state = ROLLOUT.move(plan.state, RT.AWAIT_APPROVAL)
                plan.decisions.append(
                    Decision(
                        "await_approval",
                        f"stage {plan.current_stage + 1} soaked {soaked:.1f}s; a human must approve the next",
                        figures,
                    )
                )
            return plan
        plan.state = ROLLOUT.move(plan.state, RT.NEXT_STAGE)
        plan.current_stage += 1
        plan.stage_ready_at = None
        plan.decisions.append(
            Decision(
                "next_stage",
                f"stage {plan.current_stage} soaked {soaked:.1f}s; starting stage {plan.current_stage + 1}",
                figures,
            )
        )


@dataclass
class _Judgement:
    """The gates' verdicts on one tick, per cohort and pooled.

    ``rolled``: cohorts already rolled back (a device of theirs is ``rolled_back``
    while the rollout is active); ``held``: cohorts paused earlier (a device of
    theirs is ``held``); ``failing``: cohorts whose own gate trips now;
    ``going``: every other cohort, including those with no device assigned yet.
    ``overall``: the figures pooled over the assigned devices of ``going``;
    ``overall_trip`` acts on the whole rollout, ``deferred`` is a pooled trip
    that a going cohort contradicts (it passes on its own figures), so the
    stage waits instead.
    """

    cohorts: dict[str, list[DeviceSnapshot]]
    rolled: set[str]
    held: set[str]
    verdicts: dict[str, dict[str, Any]]
    failing: dict[str, gates.Trip]
    going: list[str]
    overall: dict[str, Any]
    going_figures: dict[str, dict[str, Any]]
    overall_trip: gates.Trip | None = None
    deferred: gates.Trip | None = None

    @property
    def halted(self) -> set[str]:
        return self.rolled | self.held | set(self.failing)

    @property
    def paused(self) -> set[str]:
        """Halted cohorts a human must decide on (paused, not rolled back)."""
        rolling = {hw for hw, t in self.failing.items() if t.action == gates.ROLL_BACK}
        return (self.held - rolling) | {hw for hw, t in self.failing.items() if t.action == gates.PAUSE}


def _judge(
    r: RolloutSnapshot,
    plan: Plan,
    devices: Sequence[DeviceSnapshot],
    state: dict[str, DS],
    reasons: dict[str, str | None],
    baseline: Mapping[str, Histograms],
) -> _Judgement:
    """Every cohort's gates (each with its own minimum sample), then the pooled gates over those going.

    A pausing gate is silenced for a stage a human approved (``approved_through``);
    the approval also releases the held devices of a paused cohort (the same
    meaning as for the whole rollout: approve accepts the stage). Roll-back gates
    are never silenced.
    """
    p = r.policy
    cohorts: dict[str, list[DeviceSnapshot]] = {}
    for d in sorted(devices, key=lambda d: d.device_id):
        cohorts.setdefault(d.hardware_id, []).append(d)
    approved = r.approved_through >= plan.current_stage
    rolled = {hw for hw, ds in cohorts.items() if any(state[d.device_id] == ROLLED_BACK for d in ds)}
    held = {
        hw for hw, ds in cohorts.items() if hw not in rolled and any(state[d.device_id] == HELD for d in ds)
    }
    verdicts: dict[str, dict[str, Any]] = {}
    failing: dict[str, gates.Trip] = {}
    for hw, ds in cohorts.items():
        mine = [d for d in ds if d.stage is not None]
        if hw in rolled or not mine:
            continue
        verdicts[hw] = _figures(r, mine, state, reasons, baseline, len(cohorts))
        trip = gates.check(p, verdicts[hw], _finished(mine, state), approved)
        if trip is not None:
            failing[hw] = trip
    if approved:
        for hw in sorted(held - set(failing)):
            for d in cohorts[hw]:
                if state[d.device_id] == HELD:
                    state[d.device_id] = DEVICE.move(state[d.device_id], DT.RELEASE)
                    reasons[d.device_id] = "cohort released: stage approved"
                    plan.changes.append(DeviceChange(d.device_id, state[d.device_id], reasons[d.device_id]))
            held.discard(hw)
    going = sorted(set(cohorts) - rolled - held - set(failing))
    pooled = [d for hw in going for d in cohorts[hw] if d.stage is not None]
    j = _Judgement(
        cohorts,
        rolled,
        held,
        verdicts,
        failing,
        going,
        _figures(r, pooled, state, reasons, baseline, len(cohorts)),
        {hw: verdicts[hw] for hw in going if hw in verdicts},
    )
    trip = gates.check(p, j.overall, _finished(pooled, state), approved) if pooled else None
    if trip is None:
        return j
    if trip.gate in gates.SAMPLED_GATES and _contradicting(r, trip.gate, j, state, reasons, baseline):
        j.deferred = trip
    else:
        j.overall_trip = trip
    return j


def _contradicting(
    r: RolloutSnapshot,
    gate: str,
    j: _Judgement,
    state: dict[str, DS],
    reasons: dict[str, str | None],
    baseline: Mapping[str, Histograms],
) -> list[str]:
    """Going cohorts that, minimum samples waived, pass the gate the pooled figures fail.

    Such a cohort is evidence that the failure is not across all cohorts: it
    comes from a cohort still below its own minimum sample, which must not
    trigger on its own, so the engine waits for it rather than stopping everyone.
    """
    loose = dataclasses.replace(r, policy=gates.without_minimums(r.policy))
    out = []
    for hw in j.going:
        mine = [d for d in j.cohorts[hw] if d.stage is not None]
        if not mine:
            continue
        f = _figures(loose, mine, state, reasons, baseline, len(j.cohorts))
        if gates.has_evidence(gate, f) and gates.looks_healthy(r.policy, f, _finished(mine, state), gate):
            out.append(hw)
    return out


def _proven(j: _Judgement, state: Mapping[str, DS]) -> list[str]:
    """Going cohorts with at least one device that proved it serves the new model (``done``)."""
    return [hw for hw in j.going if any(state[d.device_id] == DONE for d in j.cohorts[hw])]


def _on_their_way(j: _Judgement, state: Mapping[str, DS]) -> list[str]:
    """Going cohorts with a device of this stage still installing (it may yet prove the model)."""
    return [hw for hw in j.going if any(state[d.device_id] in IN_FLIGHT for d in j.cohorts[hw])]


def _all_cohorts_trip(j: _Judgement) -> gates.Trip:
    """No cohort has proved the model and some trip now: the whole rollout acts (roll back if any says so)."""
    trips = sorted(j.failing.items())
    action = gates.ROLL_BACK if any(t.action == gates.ROLL_BACK for _, t in trips) else gates.PAUSE
    first = next(t for _, t in trips if t.action == action)
    if len(j.cohorts) == 1:
        return gates.Trip(first.gate, action, first.reason)
    detail = "; ".join(f"{hw!r}: {t.reason}" for hw, t in trips)
    return gates.Trip(first.gate, action, f"every hardware class fails or is halted: {detail}")


def _whole_notes(j: _Judgement) -> dict[str, Any]:
    """What a whole-rollout decision records about the cohorts: who tripped which gate, who was halted."""
    return {
        "scope": "rollout",
        "failing_cohorts": {
            hw: {"gate": t.gate, "action": t.action, "reason": t.reason}
            for hw, t in sorted(j.failing.items())
        },
        "halted_cohorts": sorted(j.rolled | j.held),
    }


def _halted_summary(j: _Judgement, state: dict[str, DS]) -> dict[str, dict[str, Any]]:
    """Per halted cohort: how (``rolled_back`` or ``paused``) and how many of its devices are where."""
    out: dict[str, dict[str, Any]] = {}
    for hw in sorted(j.halted):
        counts = Counter(state[d.device_id] for d in j.cohorts[hw])
        out[hw] = {
            "state": "rolled_back"
            if hw in j.rolled or j.failing.get(hw, _NO_TRIP).action == gates.ROLL_BACK
            else "paused",
            "devices": dict(sorted(counts.items())),
        }
    return out


_NO_TRIP = gates.Trip("", "", "")


def _finished(assigned: Sequence[DeviceSnapshot], state: dict[str, DS]) -> bool:
    return bool(assigned) and not any(state[d.device_id] in IN_FLIGHT for d in assigned)


def _roll_back_cohort(
    plan: Plan,
    cohort: Sequence[DeviceSnapshot],
    state: dict[str, DS],
    reasons: dict[str, str | None],
    trip: gates.Trip,
    figures: dict[str, Any],
) -> None:
    """One hardware class goes back: devices that got the model get the previous one, the rest are held."""
    hw = cohort[0].hardware_id
    back = {d.device_id for d in cohort if state[d.device_id] in SENT}
    earlier = {c.device_id: c for c in plan.changes if c.device_id in back}
    plan.changes = [c for c in plan.changes if c.device_id not in back]
    for d in cohort:
        if d.device_id in back:
            why = earlier[d.device_id].reason if d.device_id in earlier else None
            note = f"rolled back with {hw!r} (was {state[d.device_id]}{': ' + why if why else ''})"
            plan.roll_back.append(d.device_id)
            state[d.device_id], reasons[d.device_id] = DEVICE.move(state[d.device_id], DT.ROLL_BACK), note
            plan.changes.append(DeviceChange(d.device_id, state[d.device_id], note))
    held = _hold(plan, cohort, state, reasons, f"cohort {hw!r} rolled back: {trip.reason}")
    plan.decisions.append(
        Decision(
            "roll_back_cohort",
            f"hardware {hw!r}: {trip.reason}",
            {
                **figures,
                "scope": "cohort",
                "cohort": hw,
                "gate": trip.gate,
                "rolled_back": len(back),
                "held": held,
            },
        )
    )


def _hold_cohort(
    plan: Plan,
    cohort: Sequence[DeviceSnapshot],
    state: dict[str, DS],
    reasons: dict[str, str | None],
    trip: gates.Trip | None,
    figures: dict[str, Any],
    how: str = "paused",
) -> None:
    """A paused cohort (``trip``) or one halted earlier (None): its unassigned devices are held.

    A pause is recorded once, when it first holds devices; with nothing left to
    hold it has nothing to stop, and the rollout pauses for a human at its end.
    """
    hw = cohort[0].hardware_id
    why = f"cohort {hw!r} paused: {trip.reason}" if trip is not None else _halt_reason(cohort, reasons, how)
    held = _hold(plan, cohort, state, reasons, why)
    if trip is not None and held:
        plan.decisions.append(
            Decision(
                "pause_cohort",
                f"hardware {hw!r}: {trip.reason}",
                {**figures, "scope": "cohort", "cohort": hw, "gate": trip.gate, "held": held},
            )
        )


def _halt_reason(cohort: Sequence[DeviceSnapshot], reasons: dict[str, str | None], how: str) -> str:
    """The reason the cohort's held devices carry (joiners get the same)."""
    for d in cohort:
        why = reasons[d.device_id]
        if why and why.startswith("cohort "):
            return why
    return f"cohort {cohort[0].hardware_id!r} {how}"


def _hold(
    plan: Plan,
    cohort: Sequence[DeviceSnapshot],
    state: dict[str, DS],
    reasons: dict[str, str | None],
    why: str,
) -> int:
    n = 0
    for d in cohort:
        if d.stage is None and state[d.device_id] == PENDING:
            state[d.device_id], reasons[d.device_id] = DEVICE.move(state[d.device_id], DT.HOLD), why
            plan.changes.append(DeviceChange(d.device_id, state[d.device_id], why))
            n += 1
    return n


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
    state: dict[str, DS],
    reasons: dict[str, str | None],
    baseline: Mapping[str, Histograms] | None,
    cohorts: int = 1,
) -> dict[str, Any]:
    """The figures every gate reads, over ``assigned`` (one cohort, or the cohorts pooled).

    ``cohorts``: how many hardware classes the rollout has, each judged on its own besides the
    pooled verdict; the accuracy gate splits its false-alarm rate over them.
    """
    baseline = baseline or {}
    p = r.policy
    waiting = sum(1 for d in assigned if state[d.device_id] == WAITING)
    if waiting:  # the gates judge the devices that got on with it; those waiting have not
        assigned = [d for d in assigned if state[d.device_id] != WAITING]
    inferences = sum(d.inferences for d in assigned)
    errors = sum(d.errors for d in assigned)
    failed = sum(1 for d in assigned if state[d.device_id] in (FAILED, TIMED_OUT))
    done = sum(1 for d in assigned if state[d.device_id] == DONE)
    shadow_samples = sum(d.shadow_samples for d in assigned)
    shadow_agree = sum(d.shadow_agree for d in assigned)
    failure_classes = Counter(
        gates.failure_class(reasons[d.device_id])
        for d in assigned
        if state[d.device_id] in (FAILED, TIMED_OUT)
    )
    figures: dict[str, Any] = {
        "assigned": len(assigned),
        "waiting": waiting,
        "done": done,
        "failed": failed,
        "failure_rate": failed / len(assigned) if assigned else 0.0,
        "max_failure_rate": p.max_failure_rate,
        "success_rate": done / len(assigned) if assigned else 0.0,
        "inferences": inferences,
        "errors": errors,
        "error_rate": errors / inferences if inferences else 0.0,
        "max_error_rate": p.max_error_rate,
        "min_inferences": p.min_inferences,
        "shadow_samples": shadow_samples,
        "shadow_agreement": shadow_agree / shadow_samples if shadow_samples else None,
        "failure_classes": dict(sorted(failure_classes.items())),
        "delivery_failed": sum(n for c, n in failure_classes.items() if c in DELIVERY_FAILURES),
    }
    if p.max_latency_ratio is not None or p.max_output_psi is not None or p.max_accuracy_drop is not None:
        groups: dict[str, list[Histograms]] = {}
        for d in assigned:
            groups.setdefault(d.hardware_id, []).append(
                Histograms(d.latency_buckets, d.output_hist, d.labels, d.labels_correct)
            )
        new = {hw: gates.merge(hs) for hw, hs in groups.items()}
        if p.max_latency_ratio is not None:
            figures.update(gates.latency_figures(p, new, baseline))
        if p.max_output_psi is not None:
            figures.update(gates.drift_figures(new, baseline))
        if p.max_accuracy_drop is not None:
            figures.update(gates.accuracy_figures(p, new, baseline, gates.accuracy_alpha(p, cohorts)))
    return figures


def _roll_back(
    plan: Plan,
    devices: Sequence[DeviceSnapshot],
    state: dict[str, DS],
    reason: str,
    figures: dict[str, Any],
    gate: str,
    trigger: RT,
) -> Plan:
    """Every device that was sent the new model goes back to its previous one; pending ones never get it."""
    earlier = {c.device_id: c for c in plan.changes}
    changes = [c for c in plan.changes if c.state not in SENT]
    for d in devices:
        prior = state[d.device_id]
        if prior in SENT:
            plan.roll_back.append(d.device_id)
            why = earlier[d.device_id].reason if d.device_id in earlier else None
            note = f"rolled back (was {prior}{': ' + why if why else ''})"
            changes.append(DeviceChange(d.device_id, DEVICE.move(prior, DT.ROLL_BACK), note))
    plan.changes = changes
    plan.state = ROLLOUT.move(plan.state, trigger)
    plan.decisions.append(
        Decision("roll_back", reason, {**figures, "gate": gate, "rolled_back": len(plan.roll_back)})
    )
    return plan
