"""Telemetry aggregated per model version, rollout stage and device class (hardware id), for the API.

Reads the per (device, model hash) totals the ingest keeps (``ModelAggregate``)
and sums them by group in Python: the groups are few, and the latency
histograms must be added bin by bin before taking a percentile.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlmodel import Session, col, select

from fleet_server import model_metrics as mm
from fleet_server.errors import NotFound
from fleet_server.gates import add_counts, p95_us
from fleet_server.models import CaptureItem, Device, Label, Model, ModelAggregate, Rollout, RolloutDevice
from fleet_server.schemas import AggregateOut, MetricsGroupOut, ModelMetricsOut

Key = tuple[str, str, int | None]  # (sha256, hardware_id, stage)


@dataclass
class _Sum:
    devices: int = 0
    inferences: int = 0
    errors: int = 0
    served_ok: int = 0
    shadow_samples: int = 0
    shadow_agree: int = 0
    latency: tuple[int, ...] = field(default_factory=tuple)


def telemetry_aggregates(
    session: Session,
    *,
    model: str | None = None,
    hardware_id: str | None = None,
    rollout: Rollout | None = None,
) -> list[AggregateOut]:
    stmt = select(ModelAggregate, Device).join(Device, col(Device.id) == col(ModelAggregate.device_id))
    stages: dict[str, int | None] = {}
    if rollout is not None:
        rds = session.exec(select(RolloutDevice).where(RolloutDevice.rollout_id == rollout.id)).all()
        stages = {rd.device_id: rd.stage for rd in rds}
        stmt = stmt.where(col(ModelAggregate.device_id).in_(list(stages)))
    if model is not None:
        stmt = stmt.where(ModelAggregate.sha256 == _sha_of(session, model))
    if hardware_id is not None:
        stmt = stmt.where(Device.hardware_id == hardware_id)
    sums: dict[Key, _Sum] = {}
    for agg, dev in session.exec(stmt).all():
        key = (agg.sha256, dev.hardware_id, stages.get(dev.id))
        s = sums.setdefault(key, _Sum())
        s.devices += 1
        s.inferences += agg.inferences
        s.errors += agg.errors
        s.served_ok += agg.served_ok
        s.shadow_samples += agg.shadow_samples
        s.shadow_agree += agg.shadow_agree
        s.latency = add_counts(s.latency, agg.latency_buckets)
    names = _names(session, {k[0] for k in sums})
    return [
        AggregateOut(
            sha256=sha,
            model=names.get(sha),
            hardware_id=hw,
            stage=stage,
            devices=s.devices,
            inferences=s.inferences,
            errors=s.errors,
            error_rate=s.errors / s.inferences if s.inferences else 0.0,
            latency_p95_us=p95_us(s.latency),
            served_ok=s.served_ok,
            shadow_samples=s.shadow_samples,
            shadow_agreement=s.shadow_agree / s.shadow_samples if s.shadow_samples else None,
        )
        for (sha, hw, stage), s in sorted(sums.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or -1))
    ]


def _sha_of(session: Session, model: str) -> str:
    if ":" not in model:
        return model
    name, version = model.split(":", 1)
    found = session.exec(select(Model.sha256).where(Model.name == name, Model.version == version)).first()
    if found is None:
        raise NotFound("model_not_found", f"no model {model}")
    return found


def _names(session: Session, shas: set[str]) -> dict[str, str]:
    if not shas:
        return {}
    rows = session.exec(select(Model).where(col(Model.sha256).in_(shas))).all()
    return {m.sha256: f"{m.name}:{m.version}" for m in rows}


def model_metrics(session: Session, name: str, version: str) -> ModelMetricsOut:
    """The model's field figures (``fleet_server.model_metrics``) per hardware cohort and stage of its
    latest rollout, and in total; server-side labels join its captured predictions."""
    found = session.exec(select(Model).where(Model.name == name, Model.version == version)).first()
    if found is None:
        raise NotFound("model_not_found", f"no model {name}:{version}")
    latest = session.exec(
        select(Rollout).where(Rollout.model_sha256 == found.sha256).order_by(col(Rollout.created_at).desc())
    ).first()
    stages: dict[str, int | None] = {}
    if latest is not None:
        rows = session.exec(
            select(RolloutDevice.device_id, RolloutDevice.stage).where(RolloutDevice.rollout_id == latest.id)
        ).all()
        stages = {d: s for d, s in rows}
    stmt = (
        select(ModelAggregate, Device.hardware_id)
        .join(Device, col(Device.id) == col(ModelAggregate.device_id))
        .where(ModelAggregate.sha256 == found.sha256)
    )
    groups: dict[tuple[str, int | None], mm.Counts] = {}
    total = mm.Counts()
    for agg, hw in session.exec(stmt).all():
        groups.setdefault((hw, stages.get(agg.device_id)), mm.Counts()).add(agg)
        total.add(agg)
    joined: dict[tuple[str, int | None], list[tuple[Any, str | None]]] = {}
    pairs = session.exec(
        select(Label.label, CaptureItem.predicted, CaptureItem.hardware_id, CaptureItem.device_id)
        .join(CaptureItem, col(CaptureItem.inference_id) == col(Label.inference_id))
        .where(CaptureItem.model_sha256 == found.sha256)
    ).all()
    for label, predicted, hw, device in pairs:
        joined.setdefault((hw, stages.get(device)), []).append((label, predicted))
    for key in joined:
        groups.setdefault(key, mm.Counts())

    def group(
        hw: str | None, stage: int | None, c: mm.Counts, j: list[tuple[Any, str | None]]
    ) -> MetricsGroupOut:
        return MetricsGroupOut.model_validate({"hardware_id": hw, "stage": stage, **mm.metrics(c, j)})

    ordered = sorted(groups.items(), key=lambda kv: (kv[0][0], -1 if kv[0][1] is None else kv[0][1]))
    return ModelMetricsOut(
        model=f"{name}:{version}",
        sha256=found.sha256,
        rollout_id=latest.id if latest is not None else None,
        groups=[group(hw, st, c, joined.get((hw, st), [])) for (hw, st), c in ordered],
        total=group(None, None, total, [p for ps in joined.values() for p in ps]),
    )
