"""Runs the rollout engine every ``tick_interval`` and applies its plans.

Reads one snapshot per active rollout, calls the pure ``engine.decide``,
writes the plan (device states, stage, decisions, desired seqs) in one
transaction, and only then publishes the signed directives, so a directive is
never out before the seq it carries is recorded. ``lock`` serialises the
ticker with API calls that change rollouts (pause/resume/abort/create) within
this process; several replicas would need row locks (SELECT ... FOR UPDATE).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from datetime import datetime

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from fleet_server import engine as rollout_engine
from fleet_server.directives import build_directive, sign_directive
from fleet_server.models import (
    Device,
    EventRow,
    Model,
    ModelAggregate,
    Rollout,
    RolloutDecision,
    RolloutDevice,
    RolloutState,
    utcnow,
)
from fleet_server.settings import ServerSettings
from fleet_server.store import new_session
from signing.keys import KeyPair

log = logging.getLogger(__name__)

Publish = Callable[[str, bytes], None]  # (device_id, signed directive)


def snapshot(session: Session, rollout: Rollout) -> list[rollout_engine.DeviceSnapshot]:
    """Everything the engine needs about the rollout's devices, in three queries."""
    rows = session.exec(
        select(RolloutDevice, Device)
        .join(Device, col(Device.id) == col(RolloutDevice.device_id))
        .where(RolloutDevice.rollout_id == rollout.id)
    ).all()
    ids = [rd.device_id for rd, _ in rows]
    aggs = {
        a.device_id: a
        for a in session.exec(
            select(ModelAggregate).where(
                col(ModelAggregate.device_id).in_(ids), ModelAggregate.sha256 == rollout.model_sha256
            )
        ).all()
    }
    seqs = {rd.device_id: rd.seq for rd, _ in rows if rd.seq is not None}
    failures: dict[str, str] = {}
    progress: set[str] = set()
    if seqs:
        events = session.exec(
            select(EventRow)
            .where(col(EventRow.device_id).in_(list(seqs)), col(EventRow.seq).in_(set(seqs.values())))
            .order_by(col(EventRow.id))
        ).all()
        for ev in events:
            if seqs.get(ev.device_id) != ev.seq:
                continue
            progress.add(ev.device_id)
            if ev.state in rollout_engine.FAILED_DEPLOYMENT_STATES:
                failures[ev.device_id] = ev.reason or ev.state
    out = []
    for rd, dev in rows:
        agg = aggs.get(rd.device_id)
        reported = dev.reported or {}
        out.append(
            rollout_engine.DeviceSnapshot(
                device_id=rd.device_id,
                state=rd.state,
                stage=rd.stage,
                seq=rd.seq,
                notified_at=rd.notified_at,
                running_sha256=dev.running_sha256,
                reported_seq=dev.deployment_seq,
                reported_state=dev.deployment_state,
                reported_error=reported.get("deployment_error"),
                event_failure=failures.get(rd.device_id),
                event_progress=rd.device_id in progress,
                served_ok=agg.served_ok if agg else 0,
                inferences=agg.inferences if agg else 0,
                errors=agg.errors if agg else 0,
            )
        )
    return out


def rollout_snapshot(r: Rollout) -> rollout_engine.RolloutSnapshot:
    return rollout_engine.RolloutSnapshot(
        id=r.id,
        state=r.state,
        model_sha256=r.model_sha256,
        stages=tuple(r.stages),
        current_stage=r.current_stage,
        stage_ready_at=r.stage_ready_at,
        soak_seconds=r.soak_seconds,
        device_timeout_seconds=r.device_timeout_seconds,
        max_error_rate=r.max_error_rate,
        min_inferences=r.min_inferences,
        max_failure_rate=r.max_failure_rate,
    )


class Ticker:
    def __init__(
        self,
        settings: ServerSettings,
        engine: Engine,
        publish: Publish,
        fleet_key: KeyPair,
        lock: threading.Lock,
    ) -> None:
        self.settings = settings
        self.engine = engine
        self.publish = publish
        self.fleet_key = fleet_key
        self.lock = lock
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ef-ticker", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.settings.tick_interval):
            try:
                self.tick()
            except Exception:  # the ticker must outlive any one bad rollout or DB hiccup
                log.exception("engine tick failed")

    def tick(self, now: datetime | None = None) -> None:
        """Run the engine once over every active rollout (also called directly by tests)."""
        with self.lock:
            with new_session(self.engine) as session:
                ids = session.exec(
                    select(Rollout.id).where(col(Rollout.state).in_(RolloutState.ACTIVE))
                ).all()
            for rollout_id in ids:
                self._tick_one(rollout_id, now or utcnow())

    def _tick_one(self, rollout_id: str, now: datetime) -> None:
        outbox: list[tuple[str, bytes]] = []
        with new_session(self.engine) as session:
            rollout = session.get(Rollout, rollout_id)
            if rollout is None or rollout.state not in RolloutState.ACTIVE:
                return
            plan = rollout_engine.decide(rollout_snapshot(rollout), snapshot(session, rollout), now)
            if plan.empty and plan.state == rollout.state and plan.stage_ready_at == rollout.stage_ready_at:
                return
            outbox = self._apply(session, rollout, plan, now)
            session.commit()
        for device_id, payload in outbox:
            self.publish(device_id, payload)

    def _apply(
        self, session: Session, rollout: Rollout, plan: rollout_engine.Plan, now: datetime
    ) -> list[tuple[str, bytes]]:
        rds = {
            rd.device_id: rd
            for rd in session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)).all()
        }
        outbox: list[tuple[str, bytes]] = []
        new_model = session.get(Model, rollout.model_id)
        for ch in plan.changes:
            rd = rds[ch.device_id]
            rd.state, rd.reason, rd.updated_at = ch.state, ch.reason, now
            session.add(rd)
        for ch in plan.notify:
            rd = rds[ch.device_id]
            device = session.get(Device, ch.device_id)
            if device is None or new_model is None:
                continue
            rd.previous_sha256 = device.running_sha256
            rd.previous_model_id = _model_id_for(session, device.running_sha256)
            rd.stage, rd.state, rd.notified_at, rd.updated_at = ch.stage, ch.state, now, now
            rd.seq = self._next_seq(session, device)
            outbox.append((device.id, self._signed(device.id, rd.seq, new_model, rollout.id, now)))
            session.add(rd)
        for device_id in plan.roll_back:
            rd = rds[device_id]
            device = session.get(Device, device_id)
            if device is None:
                continue
            previous = session.get(Model, rd.previous_model_id) if rd.previous_model_id else None
            seq = self._next_seq(session, device)
            outbox.append((device.id, self._signed(device.id, seq, previous, rollout.id, now)))
        for d in plan.decisions:
            session.add(
                RolloutDecision(
                    rollout_id=rollout.id, ts=now, action=d.action, reason=d.reason, figures=d.figures
                )
            )
            log.info("rollout %s: %s: %s", rollout.id, d.action, d.reason)
        rollout.state, rollout.current_stage = plan.state, plan.current_stage
        rollout.stage_ready_at, rollout.updated_at = plan.stage_ready_at, now
        session.add(rollout)
        return outbox

    @staticmethod
    def _next_seq(session: Session, device: Device) -> int:
        device.desired_seq += 1
        session.add(device)
        return device.desired_seq

    def _signed(self, device_id: str, seq: int, model: Model | None, rollout_id: str, now: datetime) -> bytes:
        directive = build_directive(
            device_id,
            seq,
            model,
            public_url=self.settings.public_url,
            ttl_seconds=self.settings.directive_ttl_seconds,
            now=now,
            rollout_id=rollout_id,
        )
        return sign_directive(directive, self.fleet_key)


def _model_id_for(session: Session, sha256: str | None) -> int | None:
    """The stored model a device runs (newest if several bundles share the file), if we know it."""
    if sha256 is None:
        return None
    return session.exec(
        select(Model.id).where(Model.sha256 == sha256).order_by(col(Model.created_at).desc())
    ).first()
