"""The leader's SLO loop: sample the telemetry totals, evaluate every SLO, step the alerts, deliver.

Runs on its own thread next to the rollout ticker, and only while this replica
leads (the ticker's leader lock), so one replica samples and notifies. Samples
are cached in memory while leading (only the leader writes them) and read back
from the store when it starts leading. The last evaluation's figures are kept
for ``/metrics``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx
from sqlalchemy import Engine
from sqlmodel import select

from fleet_server.alert_delivery import deliver_due, enqueue, receivers, resend_firing
from fleet_server.debug_series import Detail
from fleet_server.models import Slo, utcnow
from fleet_server.settings import ServerSettings
from fleet_server.slo.alerts import AlertKey, AlertState, step_alerts
from fleet_server.slo.burn import SloStatus, evaluate
from fleet_server.slo.series import Sample, Totals, next_sample, thin
from fleet_server.slo.spec import Sli
from fleet_server.slo_store import (
    Cohort,
    VersionName,
    cohort_figures,
    drop_samples,
    epoch,
    load_alerts,
    load_samples,
    sample_row,
    save_alerts,
    silences,
    spec_of,
    totals_of,
    version_names,
)
from fleet_server.store import new_session
from fleet_server.tls_context import default_verify_context

log = logging.getLogger(__name__)

THIN_EVERY = 10  # evaluations between thinning each SLO's samples


@dataclass
class Evaluation:
    """What the last evaluation saw and decided (read by /metrics)."""

    at: float = 0.0
    statuses: list[SloStatus] = field(default_factory=list)
    cohorts: dict[Cohort, Totals] = field(default_factory=dict)
    details: dict[Cohort, Detail] = field(default_factory=dict)  # per input and per class
    names: dict[str, VersionName] = field(default_factory=dict)
    alerts: dict[AlertKey, AlertState] = field(default_factory=dict)
    seconds: float = 0.0  # how long it took
    # each SLO's samples as this evaluation left them: /metrics reads them with ``statuses`` from
    # here, not from the evaluator's cache, which the loop thread empties and refills meanwhile
    # (a change of leader, the thinning)
    samples: dict[str, tuple[Sample, ...]] = field(default_factory=dict)


class SloEvaluator:
    def __init__(self, engine: Engine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self._samples: dict[str, list[Sample]] = {}
        self._runs = 0
        self._latest = datetime.min.replace(tzinfo=UTC)
        self.last = Evaluation()
        # one evaluation at a time: the loop's, or a caller's beside it (an operator's tool, a test)
        self._lock = threading.Lock()

    def samples(self, slo: str) -> list[Sample]:
        """The cached samples of ``slo`` (empty before its first evaluation here)."""
        return self._samples.get(slo, [])

    def reset(self) -> None:
        """Forget the cached samples (another replica may write them while this one does not lead)."""
        with self._lock:
            self._samples.clear()

    def run(self, now: datetime | None = None) -> Evaluation:
        with self._lock:
            return self._run(now)

    def _run(self, now: datetime | None) -> Evaluation:
        started = time.perf_counter()
        # never back in time: samples and alert times only move forward, whatever the clock does
        now = max(now or utcnow(), self._latest)
        self._latest = now
        t = epoch(now)
        self._runs += 1
        with new_session(self.engine) as session:
            slos = session.exec(select(Slo)).all()
            cohorts, details = cohort_figures(session)
            names = version_names(session, {sha for sha, _ in cohorts})
            statuses = []
            for row in slos:
                spec = spec_of(row)
                samples = self._samples.get(row.name)
                if samples is None:
                    samples = self._samples[row.name] = load_samples(session, row.name)
                drift = spec.objective(Sli.DRIFT_PSI)
                sample = next_sample(
                    samples[-1] if samples else None,
                    t,
                    totals_of(spec, cohorts, names),
                    drift.threshold if drift else None,
                )
                if not samples or sample.t > samples[-1].t:
                    samples.append(sample)
                    session.add(sample_row(row.name, sample))
                if self._runs % THIN_EVERY == 0:
                    keep_s = max([o.window_s for o in spec.objectives] + [r.long_s for r in spec.rules])
                    kept = thin(samples, t, keep_s)
                    kept_t = {s.t for s in kept}
                    drop_samples(session, row.name, [s.t for s in samples if s.t not in kept_t])
                    samples[:] = kept
                statuses.append(evaluate(spec, samples, t))
            step = step_alerts(
                load_alerts(session),
                statuses,
                silences(session, now),
                t,
                pending_s=self.settings.slo_pending_seconds,
                resolve_s=self.settings.slo_resolve_seconds,
            )
            save_alerts(session, step.alerts, now)
            enqueue(session, step.notifications, receivers(self.settings), utcnow())  # sent by the wall clock
            session.commit()
        for n in step.notifications:
            log.warning("alert %s %s: %s", n.alert.key.id, n.status, "; ".join(n.alert.causes))
        self.last = Evaluation(
            t,
            statuses,
            cohorts,
            details,
            names,
            {k: a.state for k, a in step.alerts.items()},
            time.perf_counter() - started,
            {row.name: tuple(self._samples.get(row.name, ())) for row in slos},
        )
        return self.last


class SloRunner:
    """The thread: evaluate every ``slo_interval``, deliver due notifications every second."""

    def __init__(self, engine: Engine, settings: ServerSettings, is_leader: Callable[[], bool]) -> None:
        self.evaluator = SloEvaluator(engine, settings)
        self.engine = engine
        self.settings = settings
        self.is_leader = is_leader
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._next_eval = 0.0
        self._next_resend = 0.0
        self._led = False

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ef-slo", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)

    def _run(self) -> None:
        with httpx.Client(
            timeout=self.settings.alert_timeout_seconds, verify=default_verify_context()
        ) as http:
            while not self._stop.wait(1.0):
                try:
                    self.step(http)
                except Exception:  # the loop must outlive a DB hiccup or a bad SLO row
                    log.exception("SLO evaluation failed")

    def step(self, http: httpx.Client, now: datetime | None = None) -> None:
        leading = self.is_leader()
        if leading != self._led:
            self.evaluator.reset()
            self._led = leading
        if not leading:
            return
        clock = time.monotonic()
        if clock >= self._next_eval:
            self._next_eval = clock + self.settings.slo_interval
            self.evaluator.run(now)
        now = now or utcnow()
        deliver_due(self.engine, http, self.settings, now)
        if clock >= self._next_resend:
            self._next_resend = clock + self.settings.alertmanager_resend_seconds
            resend_firing(self.engine, http, self.settings, now)
