"""The SLO core's edge: telemetry totals read from the store, samples, alerts and windows kept in it.

The ingest keeps running totals per (device, model hash) (``ModelAggregate``);
one pass sums them per (model hash, hardware id), adds the server-side label
counts (``ServerLabelCount``), and each SLO takes the sum of its model's
versions on its cohort. Samples, alerts, planned-rollout windows and
overrides are rows; the decisions on them are ``fleet_server.slo``'s.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import zip_longest
from typing import Any

from sqlalchemy import delete
from sqlalchemy import select as sa_select
from sqlmodel import Session, col, select

from fleet_server.debug_series import Detail, pooled
from fleet_server.models import (
    Device,
    Model,
    ModelAggregate,
    PlannedWindow,
    ServerLabelCount,
    Slo,
    SloAlert,
    SloSample,
)
from fleet_server.slo.alerts import Alert, AlertKey, AlertState, Silence
from fleet_server.slo.series import Sample, Totals
from fleet_server.slo.spec import Severity, SloSpec, spec_from

Cohort = tuple[str, str]  # (model sha256, hardware id)


def epoch(t: datetime) -> float:
    return t.timestamp()


def at(t: float) -> datetime:
    return datetime.fromtimestamp(t, UTC)


@dataclass(frozen=True)
class VersionName:
    name: str
    version: str


def cohort_totals(session: Session) -> dict[Cohort, Totals]:
    """Every model hash's running totals per hardware id, summed over the devices (one pass), with the
    labels posted to the server that met a captured prediction added to the ones devices matched."""
    return cohort_figures(session)[0]


def cohort_figures(session: Session) -> tuple[dict[Cohort, Totals], dict[Cohort, Detail]]:
    """``cohort_totals``, and from the same rows the per-input and per-class figures of each cohort
    (``fleet_server.debug_series``)."""
    totals, details = _device_totals(session)
    for sha, hw, n, correct in session.execute(
        sa_select(
            col(ServerLabelCount.model_sha256),
            col(ServerLabelCount.hardware_id),
            col(ServerLabelCount.labels),
            col(ServerLabelCount.labels_correct),
        )
    ):
        totals[(sha, hw)] = totals.get((sha, hw), Totals()) + Totals(labels=n, labels_correct=correct)
    return totals, details


def _device_totals(session: Session) -> tuple[dict[Cohort, Totals], dict[Cohort, Detail]]:
    rows = session.execute(
        sa_select(
            col(ModelAggregate.sha256),
            col(Device.hardware_id),
            col(ModelAggregate.inferences),
            col(ModelAggregate.errors),
            col(ModelAggregate.requests),
            col(ModelAggregate.request_errors),
            col(ModelAggregate.latency_buckets),
            col(ModelAggregate.output_hist),
            col(ModelAggregate.labels),
            col(ModelAggregate.labels_correct),
            col(ModelAggregate.cpu_ms),
            col(ModelAggregate.input_checks),
            col(ModelAggregate.class_hist),
            col(ModelAggregate.confusion),
            col(ModelAggregate.input_buckets),
        ).join(Device, col(Device.id) == col(ModelAggregate.device_id))
    ).all()
    groups: dict[Cohort, list[Any]] = {}
    for r in rows:
        groups.setdefault((r.sha256, r.hardware_id), []).append(r)
    details = {
        key: pooled((r.input_checks, r.class_hist, r.confusion, r.input_buckets) for r in rs)
        for key, rs in groups.items()
    }
    return {
        key: Totals(
            sum(r.inferences for r in rs),
            sum(r.errors for r in rs),
            sum(r.requests for r in rs),
            sum(sum(r.request_errors.values()) for r in rs if r.request_errors),
            _columns(r.latency_buckets for r in rs),
            _columns(r.output_hist for r in rs),
            sum(r.labels for r in rs),
            sum(r.labels_correct for r in rs),
            sum(r.cpu_ms for r in rs),
            _columns(c for r in rs if r.input_checks for c in r.input_checks.values()),
        )
        for key, rs in groups.items()
    }, details


def _columns(histograms: Iterable[Sequence[int] | None]) -> tuple[int, ...]:
    """Bin-wise sum of histograms of any lengths, column by column in C (a device-by-device sum of
    10,000 histograms in Python was most of an SLO pass)."""
    present = [h for h in histograms if h]
    return tuple(sum(c) for c in zip_longest(*present, fillvalue=0)) if present else ()


def version_names(session: Session, shas: Iterable[str]) -> dict[str, VersionName]:
    wanted = set(shas)
    if not wanted:
        return {}
    rows = session.exec(select(Model.sha256, Model.name, Model.version).where(col(Model.sha256).in_(wanted)))
    return {sha: VersionName(name, version) for sha, name, version in rows}


def totals_of(spec: SloSpec, cohorts: Mapping[Cohort, Totals], names: Mapping[str, VersionName]) -> Totals:
    """The SLO's model (every version) on its cohort, or on every cohort."""
    total = Totals()
    for (sha, hw), t in cohorts.items():
        named = names.get(sha)
        if named is not None and named.name == spec.model and spec.hardware_id in (None, hw):
            total = total + t
    return total


def spec_of(row: Slo) -> SloSpec:
    return spec_from(row.spec)


def sample_of(row: SloSample) -> Sample:
    t = row.totals
    return Sample(
        epoch(row.t),
        Totals(
            int(t.get("inferences", 0)),
            int(t.get("errors", 0)),
            int(t.get("requests", 0)),
            int(t.get("request_errors", 0)),
            tuple(t.get("latency", ())),
            tuple(t.get("output", ())),
            int(t.get("labels", 0)),
            int(t.get("labels_correct", 0)),
            float(t.get("cpu_ms", 0.0)),
        ),
        row.drift_bad,
        row.drift_steps,
    )


def sample_row(slo: str, s: Sample) -> SloSample:
    t = s.totals
    totals = {
        "inferences": t.inferences,
        "errors": t.errors,
        "requests": t.requests,
        "request_errors": t.request_errors,
        "latency": list(t.latency),
        "output": list(t.output),
        "labels": t.labels,
        "labels_correct": t.labels_correct,
        "cpu_ms": t.cpu_ms,
    }
    return SloSample(slo=slo, t=at(s.t), totals=totals, drift_bad=s.drift_bad, drift_steps=s.drift_steps)


def load_samples(session: Session, slo: str) -> list[Sample]:
    rows = session.exec(select(SloSample).where(SloSample.slo == slo).order_by(col(SloSample.t))).all()
    return [sample_of(r) for r in rows]


def drop_samples(session: Session, slo: str, times: Sequence[float]) -> None:
    for i in range(0, len(times), 500):
        part = [at(t) for t in times[i : i + 500]]
        session.execute(delete(SloSample).where(col(SloSample.slo) == slo, col(SloSample.t).in_(part)))


def alert_of(row: SloAlert) -> Alert:
    return Alert(
        AlertKey(row.model, row.hardware_id, Severity(row.severity)),
        AlertState(row.state),
        epoch(row.since),
        epoch(row.fired_at) if row.fired_at else None,
        epoch(row.resolved_at) if row.resolved_at else None,
        tuple(row.causes),
        row.silenced,
        row.notified,
        epoch(row.clear_since) if row.clear_since else None,
        row.quiet_s,
    )


def load_alerts(session: Session) -> dict[AlertKey, Alert]:
    return {a.key: a for a in (alert_of(r) for r in session.exec(select(SloAlert)).all())}


def save_alerts(session: Session, alerts: Mapping[AlertKey, Alert], now: datetime) -> None:
    """Write the alerts as they are now; alerts no longer kept are deleted."""
    rows = {r.id: r for r in session.exec(select(SloAlert)).all()}
    for key, a in alerts.items():
        row = rows.pop(key.id, None) or SloAlert(
            id=key.id,
            model=key.model,
            hardware_id=key.hardware_id,
            severity=str(key.severity),
            state="",
            since=now,
        )
        row.state, row.since = str(a.state), at(a.since)
        row.fired_at = at(a.fired_at) if a.fired_at is not None else None
        row.resolved_at = at(a.resolved_at) if a.resolved_at is not None else None
        row.causes, row.silenced, row.notified, row.updated_at = list(a.causes), a.silenced, a.notified, now
        row.clear_since = at(a.clear_since) if a.clear_since is not None else None
        row.quiet_s = a.quiet_s
        session.add(row)
    for row in rows.values():
        session.delete(row)


def silences(session: Session, now: datetime) -> list[Silence]:
    rows = session.exec(select(PlannedWindow).where(col(PlannedWindow.ends) > now)).all()
    return [Silence(r.model, epoch(r.starts), epoch(r.ends), r.hardware_id, r.reason) for r in rows]
