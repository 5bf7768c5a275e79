"""The console's reads that the API has no single call for (fleet counts, a page of rollouts
with their device counts, a model's delivery status), each one query or a few, and the pure
shaping of rows for the templates.

The fleet counts are GROUP BYs in the database (one per dimension), so the fleet page costs the
same few queries at 10,000 devices as at 10; the device table is the API's keyset page.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select as sa_select
from sqlmodel import Session, col, func, select

from fleet_server.audit import AuditFilter
from fleet_server.context import ServerContext
from fleet_server.lifecycle import DeviceRolloutState as DS
from fleet_server.models import AuditEntry, Device, Model, Rollout, RolloutDevice, Slo, TelemetryBatchRow
from signing.targets import FLOORS_TARGET, parse_floors


@dataclass(frozen=True)
class FleetCounts:
    total: int
    online: int
    by_state: list[tuple[str, int]]
    by_hardware: list[tuple[str, int]]
    by_model: list[tuple[str, int]]


def _ranked(counts: Mapping[str, int]) -> list[tuple[str, int]]:
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def fleet_counts(session: Session) -> FleetCounts:
    """Every count of the fleet page from one GROUP BY: one scan of the device table, however
    many devices, and at most (classes x states x models x 2) groups to add up here."""
    rows = session.execute(
        sa_select(
            col(Device.hardware_id),
            col(Device.deployment_state),
            col(Device.online),
            col(Device.running_name),
            col(Device.running_version),
            func.count(),
        ).group_by(
            col(Device.hardware_id),
            col(Device.deployment_state),
            col(Device.online),
            col(Device.running_name),
            col(Device.running_version),
        )
    ).all()
    total = online = 0
    by_state: Counter[str] = Counter()
    by_hardware: Counter[str] = Counter()
    by_model: Counter[str] = Counter()
    for hw, state, is_online, name, version, n in rows:
        total += n
        online += n if is_online else 0
        by_state[state or "none"] += n
        by_hardware[hw] += n
        by_model[f"{name}:{version}" if name else "none"] += n
    return FleetCounts(total, online, _ranked(by_state), _ranked(by_hardware), _ranked(by_model))


@dataclass(frozen=True)
class DeviceRow:
    id: str
    hardware_id: str
    tags: str
    online: bool
    state: str
    model: str
    agent_version: str
    last_seen: datetime | None


def device_row(d: Device) -> DeviceRow:
    return DeviceRow(
        d.id,
        d.hardware_id,
        ", ".join(f"{k}={v}" for k, v in sorted(d.tags.items())),
        d.online,
        d.deployment_state or "-",
        f"{d.running_name}:{d.running_version}" if d.running_name else "-",
        d.agent_version or "-",
        d.last_seen,
    )


def shas_in(d: Device, batches: Iterable[TelemetryBatchRow]) -> set[str]:
    shas = {str(sha) for sha in ((d.reported or {}).get("slots") or {}).values() if sha}
    for b in batches:
        shas.update(b.models)
    return shas


def model_names(session: Session, shas: Iterable[str]) -> dict[str, str]:
    wanted = sorted(set(shas))
    if not wanted:
        return {}
    rows = session.exec(select(Model).where(col(Model.sha256).in_(wanted))).all()
    return {m.sha256: f"{m.name}:{m.version}" for m in rows}


def slots(d: Device, names: Mapping[str, str]) -> list[dict[str, Any]]:
    """The device's model slots as it last reported them (slot name -> model hash)."""
    reported = d.reported or {}
    active = reported.get("active_slot")
    return [
        {
            "name": name,
            "active": name == active,
            "model": names.get(str(sha), "-") if sha else "empty",
            "sha256": str(sha)[:12] if sha else "-",
        }
        for name, sha in sorted((reported.get("slots") or {}).items())
    ]


def telemetry_row(b: TelemetryBatchRow, names: Mapping[str, str]) -> dict[str, Any]:
    return {
        "window_end": b.window_end,
        "inferences": b.inferences,
        "errors": b.errors,
        "models": ", ".join(names.get(sha, sha[:12]) for sha in sorted(b.models)),
    }


@dataclass(frozen=True)
class RolloutRow:
    id: str
    model: str
    state: str
    stage_text: str
    devices: int
    done: int
    failed: int
    in_flight: int
    created_at: datetime
    updated_at: datetime


def rollout_rows(session: Session, rollouts: Sequence[Rollout]) -> list[RolloutRow]:
    """A page of rollouts with their devices per state: one GROUP BY for the whole page."""
    ids = [r.id for r in rollouts]
    counts: dict[str, dict[str, int]] = {i: {} for i in ids}
    if ids:
        rows = session.exec(
            select(col(RolloutDevice.rollout_id), col(RolloutDevice.state), func.count())
            .where(col(RolloutDevice.rollout_id).in_(ids))
            .group_by(col(RolloutDevice.rollout_id), col(RolloutDevice.state))
        ).all()
        for rid, state, n in rows:
            counts[rid][str(state)] = int(n)
    out = []
    for r in rollouts:
        c = counts[r.id]
        out.append(
            RolloutRow(
                r.id,
                r.model_ref,
                str(r.state),
                f"{min(r.current_stage + 1, len(r.stages))}/{len(r.stages)}",
                sum(c.values()),
                c.get(DS.DONE, 0),
                c.get(DS.FAILED, 0) + c.get(DS.TIMED_OUT, 0),
                sum(c.get(s, 0) for s in DS.IN_FLIGHT),
                r.created_at,
                r.updated_at,
            )
        )
    return out


# --- models ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeliveryTargets:
    """What the served TUF targets metadata says: which model hashes it lists, the floors, expiry."""

    shas: frozenset[str]
    floors: dict[str, int]
    expires: str
    version: int


def parse_targets(raw: bytes) -> DeliveryTargets:
    signed = json.loads(raw).get("signed") or {}
    shas: set[str] = set()
    floors: dict[str, int] = {}
    for path, info in (signed.get("targets") or {}).items():
        if path == FLOORS_TARGET:
            floors = parse_floors(info.get("custom"))
            continue
        sha = (info.get("hashes") or {}).get("sha256")
        if isinstance(sha, str):
            shas.add(sha)
    return DeliveryTargets(
        frozenset(shas), floors, str(signed.get("expires", "")), int(signed.get("version", 0))
    )


def delivery_targets(c: ServerContext) -> DeliveryTargets | None:
    if c.tuf is None:
        return None
    raw = c.tuf.targets_bytes()
    return None if raw is None else parse_targets(raw)


def running_counts(session: Session, sha256: str | None = None) -> dict[str, int]:
    """Devices running each model hash (only ``sha256``'s when given: one model's page need not
    group the whole device table)."""
    query = select(col(Device.running_sha256), func.count()).group_by(col(Device.running_sha256))
    if sha256 is not None:
        query = query.where(col(Device.running_sha256) == sha256)
    return {str(s): int(n) for s, n in session.exec(query).all() if s}


@dataclass(frozen=True)
class ModelRow:
    name: str
    version: str
    release: int
    target: str
    hardware_ids: str
    sha256: str
    length: int
    created_at: datetime
    running: int
    signed: bool
    in_tuf: bool | None  # None: this server has no TUF repository
    floor: int | None
    revoked: bool


def model_row(m: Model, targets: DeliveryTargets | None, running: int) -> ModelRow:
    floor = targets.floors.get(m.name) if targets else None
    return ModelRow(
        m.name,
        m.version,
        m.release,
        m.target,
        ", ".join(m.hardware_ids),
        m.sha256,
        m.length,
        m.created_at,
        running,
        # the server stores a bundle only after its DSSE signature verified against the release keys
        signed=True,
        in_tuf=None if targets is None else m.sha256 in targets.shas,
        floor=floor,
        revoked=floor is not None and m.release < floor,
    )


def _flat(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and len(prefix) < 40:
            out += _flat(v, key + ".")
        elif isinstance(v, float):
            out.append((key, f"{v:.6g}"))
        elif isinstance(v, list) and len(v) > 8:
            out.append((key, f"[{len(v)} values]"))
        else:
            out.append((key, json.dumps(v) if not isinstance(v, str) else v))
    return out


def model_detail(m: Model) -> dict[str, list[tuple[str, str]]]:
    """The manifest's sections as (key, value) rows: the compile report, provenance, io, files."""
    manifest = m.manifest or {}
    return {
        "Compile report": _flat(manifest.get("quantization") or {}),
        "Provenance": _flat(manifest.get("provenance") or {}),
        "IO signature": _flat(manifest.get("io") or manifest.get("io_signature") or {}),
        "Files": [
            (str(f.get("path")), f"{f.get('length')} bytes, sha256 {str(f.get('sha256'))[:16]}...")
            for f in manifest.get("files") or []
            if isinstance(f, Mapping)
        ],
    }


# --- audit ---------------------------------------------------------------------------------------


def audit_newest_first(
    session: Session, where: AuditFilter, before: int | None, limit: int
) -> tuple[list[AuditEntry], int | None]:
    """One page of the audit entries ``where`` keeps, newest first (the API lists oldest first),
    before entry ``before``; and the id to continue before (None: no older entries)."""
    query = select(AuditEntry).where(*where.sql())
    if before is not None:
        query = query.where(col(AuditEntry.id) < before)
    rows = list(session.exec(query.order_by(col(AuditEntry.id).desc()).limit(limit + 1)).all())
    if len(rows) > limit:
        return rows[:limit], rows[limit - 1].id
    return rows, None


# --- observability -----------------------------------------------------------------------------


def slos_of(session: Session, model: str) -> list[Slo]:
    return list(session.exec(select(Slo).where(col(Slo.model) == model).order_by(col(Slo.name))).all())


__all__ = [
    "DeliveryTargets",
    "DeviceRow",
    "FleetCounts",
    "ModelRow",
    "RolloutRow",
    "audit_newest_first",
    "delivery_targets",
    "device_row",
    "fleet_counts",
    "model_detail",
    "model_names",
    "model_row",
    "parse_targets",
    "rollout_rows",
    "running_counts",
    "shas_in",
    "slos_of",
    "slots",
    "telemetry_row",
]
