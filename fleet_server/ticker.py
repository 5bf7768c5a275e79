"""Runs the rollout engine every ``tick_interval`` and applies its plans.

Only the replica holding the leader lock ticks (leader.py). Per active
rollout: enrol devices that joined the selector, read one snapshot (with the
rollout row locked ``FOR UPDATE`` on PostgreSQL, so an operator action on
another replica waits instead of being overwritten), call the pure
``engine.decide``, write what the pure ``engine.apply_plan`` makes of it (device
states, stage, decisions, desired seqs) in one transaction, and only then
publish the signed directives, so a directive is never out before the seq it
carries is recorded. ``lock`` serialises the ticker with API calls within this
process (SQLite's case).

Besides every ``tick_interval``, the leader ticks as soon as there is something to decide
(``wake``): a rollout was created or an operator acted on one, or a device's live report
settles the last device a stage waits for (``observe``). A stage's devices finish within
seconds of each other, and waiting up to a whole interval for the next tick was a fixed delay
per stage. Which reports matter is judged from the devices' rollout states at the last tick
(``Watch``); a woken tick decides exactly as a timed one (the engine reads everything from the
store), so a wake that comes too early costs one tick and a missed one costs at most the
interval. Woken ticks keep a gap of at least twice the last tick's duration, so a burst of
reports cannot keep the engine busy.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Engine, and_, case, null, or_
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from device_agent.protocol import DeploymentState
from fleet_server import engine as rollout_engine
from fleet_server import experiments
from fleet_server import policy as rollout_policy
from fleet_server.directives import build_directive, sign_directive
from fleet_server.gates import Histograms, add_counts
from fleet_server.leader import LeaderLock
from fleet_server.lifecycle import DeviceRolloutState as DS
from fleet_server.lifecycle import RolloutState
from fleet_server.models import (
    Device,
    EventRow,
    Model,
    ModelAggregate,
    Rollout,
    RolloutDecision,
    RolloutDevice,
    utcnow,
)
from fleet_server.policy import Policy, ServerFailure
from fleet_server.reconcile import Observation
from fleet_server.rollouts import enrol_joiners, find_joiners, joiner_rollouts
from fleet_server.settings import ServerSettings
from fleet_server.store import new_session
from signing.keys import KeyPair

log = logging.getLogger(__name__)
EXPERIMENT_EVERY_S = 1.0  # how often the leader evaluates the running experiments
MIN_WAKE_GAP_S = 0.05  # the least time between a tick and one a wake brings forward
# What a device reports once it has settled the seq it was sent: serving it (the report that also
# carries its first served inference is a serving one too) or finished with it otherwise. Not
# ``probation``: the engine waits for the probation's end.
SETTLED_STATES = frozenset(
    {DeploymentState.SERVING, DeploymentState.FAILED, DeploymentState.REJECTED, DeploymentState.REVERTED}
)
FINAL_FAILURES = SETTLED_STATES - {DeploymentState.SERVING}
SWAPPED = frozenset({DeploymentState.SERVING, DeploymentState.PROBATION})  # states after the swap
# In flight and able to finish on a report (a retry waits for its time, not for a report).
WATCHED_STATES = frozenset(DS.IN_FLIGHT) - {DS.RETRY_WAIT}

Publish = Callable[[str, bytes], None]  # (device_id, signed directive)


SNAPSHOT_COLUMNS = (
    col(RolloutDevice.device_id),
    col(RolloutDevice.state),
    col(RolloutDevice.stage),
    col(RolloutDevice.seq),
    col(RolloutDevice.notified_at),
    col(RolloutDevice.attempts),
    col(RolloutDevice.retry_at),
    col(RolloutDevice.reason),
    col(RolloutDevice.previous_sha256),
    col(RolloutDevice.timeout_from),
    col(Device.hardware_id),
    col(Device.running_sha256),
    col(Device.deployment_seq),
    col(Device.deployment_state),
    col(Device.desired_seq),
)
# A device's reported snapshot and its events for the seq it was sent are read by the engine only
# while the device is in flight (``engine.observe``): a finished, pending or held device's would be
# decoded for nothing, and decoding the JSON documents was most of a tick at 10,000 devices.
IN_FLIGHT = tuple(DS.IN_FLIGHT)
REPORTED_IN_FLIGHT = case(
    (col(RolloutDevice.state).in_(IN_FLIGHT), col(Device.reported)), else_=null()
).label("reported")
# An aggregate's counters, and with its sketches (JSON lists) for a policy with a relative gate:
# without one nothing reads them, and decoding them is a tick's cost at fleet scale.
COUNT_COLUMNS = (
    col(ModelAggregate.device_id),
    col(ModelAggregate.sha256),
    col(ModelAggregate.served_ok),
    col(ModelAggregate.inferences),
    col(ModelAggregate.errors),
    col(ModelAggregate.shadow_samples),
    col(ModelAggregate.shadow_agree),
    col(ModelAggregate.labels),
    col(ModelAggregate.labels_correct),
)
AGGREGATE_COLUMNS = (*COUNT_COLUMNS, col(ModelAggregate.latency_buckets), col(ModelAggregate.output_hist))


def snapshot(
    session: Session, rollout: Rollout
) -> tuple[list[rollout_engine.DeviceSnapshot], dict[str, Histograms]]:
    """Everything the engine needs about the rollout's devices, and the replaced models' baseline.

    Plain column rows, joined on the rollout's devices (no ORM objects, no IN lists), read
    through the session's connection: the snapshot of a 10,000-device rollout is the bulk
    of a tick, and the ORM's row loading (identity and entity bookkeeping for columns
    that are not entities) cost more than the SQL itself. The reported snapshot is decoded
    here, whole: taking its few fields out with JSON paths in SQL costs more on SQLite 3.40
    (a ``json_extract`` parses the document again for each field) and gains nothing on
    PostgreSQL. Only the in-flight devices' reported snapshots and events are read (the only
    ones the engine looks at), and the latency and output sketches only for a policy with a
    relative gate.
    """
    session.flush()  # what this session added is part of the snapshot, as with session.execute
    conn = session.connection()
    policy = rollout_policy.from_row(rollout)
    sketches = _relative(policy)
    mine = and_(
        col(RolloutDevice.rollout_id) == rollout.id,
        col(RolloutDevice.device_id) == col(ModelAggregate.device_id),
    )
    rows = conn.execute(
        sa_select(*SNAPSHOT_COLUMNS, REPORTED_IN_FLIGHT)
        .join(Device, col(Device.id) == col(RolloutDevice.device_id))
        .where(col(RolloutDevice.rollout_id) == rollout.id)
    ).all()
    aggs = {
        a.device_id: a
        for a in conn.execute(
            sa_select(*(AGGREGATE_COLUMNS if sketches else COUNT_COLUMNS))
            .join(RolloutDevice, mine)
            .where(col(ModelAggregate.sha256) == rollout.model_sha256)
        ).all()
    }
    failures: dict[str, str] = {}
    progress: set[str] = set()
    events = conn.execute(
        sa_select(col(EventRow.device_id), col(EventRow.state), col(EventRow.reason))
        .join(
            RolloutDevice,
            and_(
                col(RolloutDevice.rollout_id) == rollout.id,
                col(RolloutDevice.device_id) == col(EventRow.device_id),
                col(RolloutDevice.seq) == col(EventRow.seq),
                col(RolloutDevice.state).in_(IN_FLIGHT),
            ),
        )
        .order_by(col(EventRow.id))
    ).all()
    for ev in events:
        progress.add(ev.device_id)
        if ev.state in rollout_engine.FAILED_DEPLOYMENT_STATES:
            why = ev.reason or ev.state
            failures[ev.device_id] = (
                f"{ServerFailure.REVERTED}: {why}" if ev.state == DeploymentState.REVERTED else why
            )
    out = []
    for rd in rows:
        agg = aggs.get(rd.device_id)
        reported = rd.reported or {}
        rejection = reported.get("last_rejection") or {}
        failure = failures.get(rd.device_id)
        if failure is None and rd.seq is not None and rejection.get("seq") == rd.seq:
            failure = str(rejection.get("reason") or "rejected")
        waits = reported.get("waiting") or {}
        waiting = (
            str(waits.get("reason") or "waiting")
            if rd.seq is not None and waits.get("seq") == rd.seq
            else None
        )
        out.append(
            rollout_engine.DeviceSnapshot(
                device_id=rd.device_id,
                state=rd.state,
                stage=rd.stage,
                seq=rd.seq,
                desired_seq=rd.desired_seq,
                notified_at=rd.notified_at,
                running_sha256=rd.running_sha256,
                reported_seq=rd.deployment_seq,
                reported_state=rd.deployment_state,
                reported_error=reported.get("deployment_error"),
                event_failure=failure,
                event_progress=rd.device_id in progress,
                served_ok=agg.served_ok if agg else 0,
                inferences=agg.inferences if agg else 0,
                errors=agg.errors if agg else 0,
                hardware_id=rd.hardware_id,
                # 0 only for a device a resume sends the release again: its next directive is attempt 1
                attempts=rd.attempts if rd.state == DS.RETRY_WAIT else max(rd.attempts, 1),
                retry_at=rd.retry_at,
                latency_buckets=tuple(agg.latency_buckets) if agg and sketches else (),
                output_hist=tuple(agg.output_hist) if agg and sketches else (),
                shadow_samples=agg.shadow_samples if agg else 0,
                shadow_agree=agg.shadow_agree if agg else 0,
                labels=agg.labels if agg else 0,
                labels_correct=agg.labels_correct if agg else 0,
                reason=rd.reason,
                waiting=waiting,
                timeout_from=rd.timeout_from,
            )
        )
    return out, _baseline(session, rollout, policy, rows, mine)


def _relative(policy: Policy) -> bool:
    """Whether a gate of the policy compares sketches with the replaced models' (reads them)."""
    return (
        policy.max_latency_ratio is not None
        or policy.max_output_psi is not None
        or policy.max_accuracy_drop is not None
    )


def _baseline(
    session: Session, rollout: Rollout, policy: Policy, rows: Sequence[Any], mine: Any
) -> dict[str, Histograms]:
    """Summed sketches and label counts of the models the rollout's devices ran before, per
    hardware id (only what a relative gate of the policy compares with)."""
    if not _relative(policy):
        return {}
    hw = {rd.device_id: rd.hardware_id for rd in rows}
    previous = {rd.previous_sha256 for rd in rows if rd.previous_sha256}
    previous |= {rd.running_sha256 for rd in rows if rd.stage is None and rd.running_sha256}
    previous.discard(rollout.model_sha256)
    if not previous:
        return {}
    groups: dict[str, Histograms] = {}
    aggs = session.execute(
        sa_select(*AGGREGATE_COLUMNS)
        .join(RolloutDevice, mine)
        .where(col(ModelAggregate.sha256).in_(previous))
    ).all()
    for a in aggs:
        h = groups.get(hw[a.device_id], Histograms())
        groups[hw[a.device_id]] = Histograms(
            add_counts(h.latency, a.latency_buckets),
            add_counts(h.output, a.output_hist),
            h.labels + a.labels,
            h.labels_correct + a.labels_correct,
        )
    return groups


def rollout_snapshot(r: Rollout) -> rollout_engine.RolloutSnapshot:
    return rollout_engine.RolloutSnapshot(
        id=r.id,
        state=r.state,
        model_sha256=r.model_sha256,
        stages=tuple(r.stages),
        current_stage=r.current_stage,
        stage_ready_at=r.stage_ready_at,
        policy=rollout_policy.from_row(r),
        stage_unit=r.stage_unit,
        started_at=r.created_at,
        approved_through=r.approved_through,
        rollback_requested=r.rollback_requested,
    )


class Watch:
    """Which live reports may let the engine move: per rollout, the devices it waits for.

    ``track`` (after each tick of a rollout) records its in-flight devices with the seq each was
    sent and the state each last reported for it. ``seen`` (each live report) answers True for
    the report that settles the last of them (serving, or failed: a stage may end now) and for the
    one that finishes the last of them. A device has finished once it failed, or once it reports
    serving after a report of its swap (serving or probation): the agent reports its first served
    inference with the new model in a report of its own, after the swap's, and the engine counts
    a device done only on that proof. So a stage wakes the engine about twice, not once per
    report. A rollout with a device waiting for a retry is not watched (its stage waits for it).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._devices: dict[str, tuple[str, int | None]] = {}  # device -> (rollout, seq sent)
        self._last: dict[str, str | None] = {}  # device -> state it last reported for that seq
        self._unsettled: dict[str, set[str]] = {}  # rollout -> watched devices not settled yet
        self._unfinished: dict[str, set[str]] = {}  # rollout -> watched devices not finished yet

    def track(self, rollout_id: str, devices: Sequence[rollout_engine.DeviceSnapshot]) -> None:
        watched = [d for d in devices if d.state in WATCHED_STATES]
        blocked = any(d.state == DS.RETRY_WAIT for d in devices)
        with self._lock:
            for device_id in self._unfinished.pop(rollout_id, set()):
                self._devices.pop(device_id, None)
                self._last.pop(device_id, None)
            self._unsettled.pop(rollout_id, None)
            if blocked or not watched:
                return
            for d in watched:
                self._devices[d.device_id] = (rollout_id, d.seq)
                self._last[d.device_id] = d.reported_state if d.reported_seq == d.seq else None
            self._unsettled[rollout_id] = {
                d.device_id for d in watched if self._last[d.device_id] not in SETTLED_STATES
            }
            self._unfinished[rollout_id] = {d.device_id for d in watched}

    def forget(self, rollout_id: str) -> None:
        self.track(rollout_id, ())

    def seen(self, device_id: str, seq: int, state: str) -> bool:
        with self._lock:
            held = self._devices.get(device_id)
            if held is None:
                return False
            rollout_id, sent = held
            if sent is not None and seq != sent:
                return False
            before, self._last[device_id] = self._last.get(device_id), state
            wake = False
            unsettled = self._unsettled.get(rollout_id, set())
            if state in SETTLED_STATES and device_id in unsettled:
                unsettled.discard(device_id)
                wake = not unsettled
            unfinished = self._unfinished.get(rollout_id, set())
            finished = state in FINAL_FAILURES or (state == DeploymentState.SERVING and before in SWAPPED)
            if finished and device_id in unfinished:
                unfinished.discard(device_id)
                wake = wake or not unfinished
            return wake


class Ticker:
    def __init__(
        self,
        settings: ServerSettings,
        engine: Engine,
        publish: Publish,
        fleet_key: KeyPair,
        lock: threading.Lock,
        ingest_lag: Callable[[], float] = lambda: 0.0,
    ) -> None:
        """``ingest_lag``: how far behind the server's ingest is now, in seconds (the bridge's
        probe measurement): the engine does not count that time against a device (``engine.heard_for``)."""
        self.settings = settings
        self.ingest_lag = ingest_lag
        self.engine = engine
        self.publish = publish
        self.fleet_key = fleet_key
        self.lock = lock
        self.leader = LeaderLock(engine)
        self._stop = threading.Event()
        self._woken = threading.Event()
        self._thread: threading.Thread | None = None
        self._experiments_at = -EXPERIMENT_EVERY_S
        self.watch = Watch()
        self.woken_ticks = 0  # ticks a wake brought forward (for /api/v1/stats-like views and tests)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ef-ticker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._woken.set()
        if self._thread is not None:
            self._thread.join(10)
        self.leader.release()

    @property
    def is_leader(self) -> bool:
        return self.leader.is_leader

    def wake(self) -> None:
        """Tick now rather than at the next interval (any thread; cheap)."""
        self._woken.set()

    def observe(self, observations: Sequence[Observation]) -> None:
        """Live reported snapshots, as stored: wake when one may let a rollout move."""
        if any(self.watch.seen(o.device_id, o.reported.seq, o.reported.state) for o in observations):
            self.wake()

    def _run(self) -> None:
        last_cost = 0.0
        while not self._stop.is_set():
            woken = self._woken.wait(self.settings.tick_interval)
            if self._stop.is_set():
                break
            if woken:
                self._woken.clear()
                # a burst of wakes waits its gap (and is then one tick): the engine stays a fraction
                # of the server however fast reports come
                if self._stop.wait(max(MIN_WAKE_GAP_S, 2 * last_cost)):
                    break
                self._woken.clear()
            started = time.monotonic()
            try:
                if self.leader.acquire():
                    self.tick()
                    self.woken_ticks += woken
            except Exception:  # the ticker must outlive any one bad rollout or DB hiccup
                log.exception("engine tick failed")
            last_cost = time.monotonic() - started

    def tick(self, now: datetime | None = None) -> None:
        """Run the engine once over every active rollout (also called directly by tests)."""
        with self.lock:
            with new_session(self.engine) as session:
                ids = session.exec(
                    select(Rollout.id)
                    .where(or_(col(Rollout.state).in_(RolloutState.ACTIVE), col(Rollout.rollback_requested)))
                    .order_by(col(Rollout.created_at))  # the oldest rollout claims joiners first
                ).all()
            self._enrol_joiners(ids)
            for rollout_id in ids:
                lag = self._lag()  # before ``now`` and the snapshot: the store holds at least ``now - lag``
                self._tick_one(rollout_id, now or utcnow(), lag)
            self._tick_experiments()

    def _lag(self) -> float:
        """The ingest lag now, in seconds. A failing reading counts as none: the engine must go on
        (and then judges as it would with ingest keeping up)."""
        try:
            return max(float(self.ingest_lag()), 0.0)
        except Exception:
            log.exception("reading the ingest lag failed; the tick counts none")
            return 0.0

    def _tick_experiments(self) -> None:
        """Evaluate the running experiments: guardrail stops, winners, auto-promote. The rollouts
        that starts are ticked from the next tick on. At most once a second: an evaluation reads
        every experiment device's counters, and telemetry arrives in windows of seconds anyway
        (a look more or less changes nothing: the intervals are valid at any number of looks)."""
        now = time.monotonic()
        if now - self._experiments_at < EXPERIMENT_EVERY_S:
            return
        self._experiments_at = now
        with new_session(self.engine) as session:
            if experiments.tick(session):
                session.commit()

    def _enrol_joiners(self, ids: Sequence[str]) -> None:
        """Give devices that joined a selector to the oldest active rollout that wants them.

        One pass over every rollout, oldest first, before any rollout is decided, with the free
        devices read once (``rollouts.find_joiners``): enrolling inside each rollout's own tick,
        or reading the devices per rollout, let a device registered in between go to the newer
        rollout. The look is without locks; only when it finds someone does a second transaction
        enrol (``rollouts.enrol_joiners``: the assignment lock, then the rollout rows).
        """
        with new_session(self.engine) as session:
            if not find_joiners(session, joiner_rollouts(session, ids)):
                return
        with new_session(self.engine) as session:
            if enrol_joiners(session, ids):
                session.commit()

    def _tick_one(self, rollout_id: str, now: datetime, ingest_lag: float = 0.0) -> None:
        outbox: list[tuple[str, bytes]] = []
        with new_session(self.engine) as session:
            rollout = session.get(Rollout, rollout_id, with_for_update=True)
            if rollout is None or not (rollout.state in RolloutState.ACTIVE or rollout.rollback_requested):
                self.watch.forget(rollout_id)
                return
            devices, baseline = snapshot(session, rollout)
            before = rollout_snapshot(rollout)
            plan = rollout_engine.decide(before, devices, now, baseline, ingest_lag)
            if (
                plan.empty
                and plan.state == rollout.state
                and plan.stage_ready_at == rollout.stage_ready_at
                and not session.new
            ):
                self.watch.track(rollout_id, devices)
                return
            after, applied = rollout_engine.apply_plan(before, devices, plan, now)
            outbox = self._write(session, rollout, plan, after, applied, now)
            session.commit()
        self.watch.track(rollout_id, applied if after.state in RolloutState.ACTIVE else ())
        for device_id, payload in outbox:
            self.publish(device_id, payload)

    def _write(
        self,
        session: Session,
        rollout: Rollout,
        plan: rollout_engine.Plan,
        after: rollout_engine.RolloutSnapshot,
        applied: Sequence[rollout_engine.DeviceSnapshot],
        now: datetime,
    ) -> list[tuple[str, bytes]]:
        """Store the applied plan (rows of the devices it touched, the rollout, the decisions)
        and sign the directives it sends, in the order ``apply_plan`` numbered them."""
        touched = plan.touched
        wanted = set(touched)
        new = {d.device_id: d for d in applied if d.device_id in wanted}
        rds: dict[str, RolloutDevice] = {}
        devices: dict[str, Device] = {}
        for chunk in range(0, len(touched), 5000):  # bounded IN lists; one query per 5,000 devices
            part = touched[chunk : chunk + 5000]
            rds.update(
                (rd.device_id, rd)
                for rd in session.exec(
                    select(RolloutDevice).where(
                        RolloutDevice.rollout_id == rollout.id, col(RolloutDevice.device_id).in_(part)
                    )
                ).all()
            )
            devices.update(
                (d.id, d) for d in session.exec(select(Device).where(col(Device.id).in_(part))).all()
            )
        new_model = session.get(Model, rollout.model_id)
        if new_model is None:  # the foreign key forbids it
            raise LookupError(f"rollout {rollout.id}: model row {rollout.model_id} is missing")
        model_ids: dict[str | None, int | None] = {}
        notified = {ch.device_id for ch in plan.notify}
        for device_id in touched:
            rd, d, device = rds[device_id], new[device_id], devices[device_id]
            if device_id in notified and rd.stage is None:  # first assignment: remember what to roll back to
                rd.previous_sha256 = device.running_sha256
                if device.running_sha256 not in model_ids:
                    model_ids[device.running_sha256] = _model_id_for(session, device.running_sha256)
                rd.previous_model_id = model_ids[device.running_sha256]
            rd.state, rd.reason, rd.retry_at, rd.updated_at = d.state, d.reason, d.retry_at, now
            rd.timeout_from = d.timeout_from
            if device_id in notified:
                rd.stage, rd.seq, rd.notified_at, rd.attempts = d.stage, d.seq, d.notified_at, d.attempts
            session.add(rd)
            if device.desired_seq != d.desired_seq:
                device.desired_seq = d.desired_seq
                session.add(device)
        outbox: list[tuple[str, bytes]] = []
        for ch in plan.notify:
            rd, device = rds[ch.device_id], devices[ch.device_id]
            assert rd.seq is not None  # apply_plan numbered it
            if ch.state == DS.SHADOWING:
                current = session.get(Model, rd.previous_model_id) if rd.previous_model_id else None
                payload = self._signed(
                    device, rd.seq, current, rollout.id, now, shadow=new_model, policy=after.policy
                )
            else:
                payload = self._signed(device, rd.seq, new_model, rollout.id, now, policy=after.policy)
            outbox.append((device.id, payload))
        for device_id in plan.roll_back:
            rd, device = rds[device_id], devices[device_id]
            previous = session.get(Model, rd.previous_model_id) if rd.previous_model_id else None
            outbox.append(
                (device.id, self._signed(device, new[device_id].desired_seq, previous, rollout.id, now))
            )
        for dec in plan.decisions:
            session.add(
                RolloutDecision(
                    rollout_id=rollout.id, ts=now, action=dec.action, reason=dec.reason, figures=dec.figures
                )
            )
            log.info("rollout %s: %s: %s", rollout.id, dec.action, dec.reason)
        rollout.state, rollout.current_stage = after.state, after.current_stage
        rollout.stage_ready_at, rollout.rollback_requested = after.stage_ready_at, after.rollback_requested
        rollout.updated_at = now
        session.add(rollout)
        return outbox

    def _signed(
        self,
        device: Device,
        seq: int,
        model: Model | None,
        rollout_id: str,
        now: datetime,
        *,
        shadow: Model | None = None,
        policy: Policy | None = None,
    ) -> bytes:
        directive = build_directive(
            device.id,
            seq,
            model,
            public_url=self.settings.public_url,
            ttl_seconds=self.settings.directive_ttl_seconds,
            now=now,
            rollout_id=rollout_id,
            shadow=shadow,
            policy=policy,
            hardware_id=device.hardware_id,
            tags=device.tags,
        )
        return sign_directive(directive, self.fleet_key)


def _model_id_for(session: Session, sha256: str | None) -> int | None:
    """The stored model a device runs (newest if several bundles share the file), if we know it."""
    if sha256 is None:
        return None
    return session.exec(
        select(Model.id).where(Model.sha256 == sha256).order_by(col(Model.created_at).desc())
    ).first()
