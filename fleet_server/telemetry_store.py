"""Store a batch of telemetry messages in a few set-based statements (the ingest hot path).

Per message the skeleton did a device lookup, a duplicate lookup and a
read-modify-write of the aggregate, each behind an ORM autoflush: about 100
batches/s. Here one transaction does, for N messages:

1. one ``INSERT ... ON CONFLICT DO NOTHING RETURNING`` of the batch rows: the
   unique (device_id, batch_id) key both dedupes redelivered batches and tells
   which ones are new (works on SQLite >= 3.35 and PostgreSQL);
2. the new batches' figures summed in Python per (device, model hash);
3. the aggregate rows created if missing, then read ``FOR UPDATE`` in key
   order (PostgreSQL: two replicas adding to the same device's aggregate
   serialise instead of losing an update; SQLite has one writer anyway), and
   written back with one executemany.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import bindparam, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col

from device_agent import protocol
from fleet_server.gates import add_counts
from fleet_server.models import ModelAggregate, TelemetryBatchRow

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_BINS = 128  # histograms longer than any protocol bounds are cut, not trusted
MAX_CLASSES = 1000


def counts(values: Sequence[int]) -> list[int]:
    """A device's histogram as the gates may trust it: at most MAX_BINS bins, no negative counts."""
    return [max(int(v), 0) for v in values[:MAX_BINS]]


@dataclass
class _Delta:
    inferences: int = 0
    errors: int = 0
    latency: tuple[int, ...] = ()
    output: tuple[int, ...] = ()
    classes: dict[str, int] = field(default_factory=dict)
    shadow_samples: int = 0
    shadow_agree: int = 0


def _insert(session: Session, table: Any) -> postgresql.Insert | sqlite.Insert:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise RuntimeError(f"unsupported database {dialect}")


def store_telemetry(session: Session, batches: Sequence[protocol.TelemetryBatch], now: datetime) -> int:
    """Store new batches and add them to the aggregates; returns how many were new (the rest: duplicates)."""
    if not batches:
        return 0
    unique: dict[tuple[str, str], protocol.TelemetryBatch] = {}
    for b in batches:
        unique.setdefault((b.device_id, b.batch_id), b)
    rows = [
        {
            "device_id": b.device_id,
            "batch_id": b.batch_id,
            "window_start": b.window_start,
            "window_end": b.window_end,
            "inferences": sum(s.inferences for s in b.models.values()),
            "errors": sum(sum(s.errors.values()) for s in b.models.values()),
            "models": {sha: s.model_dump(mode="json") for sha, s in b.models.items()},
            "received_at": now,
        }
        for b in unique.values()
    ]
    table = TelemetryBatchRow.__table__  # type: ignore[attr-defined]
    stmt = (
        _insert(session, table)
        .on_conflict_do_nothing(index_elements=["device_id", "batch_id"])
        .returning(table.c.device_id, table.c.batch_id)
    )
    new_keys = {(r[0], r[1]) for r in session.execute(stmt, rows)}
    deltas: dict[tuple[str, str], _Delta] = {}
    for key in new_keys:
        _add(deltas, unique[key])
    if deltas:
        _apply(session, deltas, now)
    return len(new_keys)


def _add(deltas: dict[tuple[str, str], _Delta], b: protocol.TelemetryBatch) -> None:
    for sha, s in b.models.items():
        if not SHA256_RE.match(sha):
            continue
        d = deltas.setdefault((b.device_id, sha), _Delta())
        d.inferences += max(s.inferences, 0)
        d.errors += sum(max(v, 0) for v in s.errors.values())
        if s.latency_buckets:
            d.latency = add_counts(d.latency, counts(s.latency_buckets))
        if s.output_hist:
            d.output = add_counts(d.output, counts(s.output_hist))
        for cls, n in list(s.class_hist.items())[:MAX_CLASSES]:
            d.classes[cls[:64]] = d.classes.get(cls[:64], 0) + max(n, 0)
    for sha, sh in b.shadow.items():
        if not SHA256_RE.match(sha) or sh.samples < 0 or not 0 <= sh.top1_agree <= sh.samples:
            continue
        d = deltas.setdefault((b.device_id, sha), _Delta())
        d.shadow_samples += sh.samples
        d.shadow_agree += sh.top1_agree


def _apply(session: Session, deltas: dict[tuple[str, str], _Delta], now: datetime) -> None:
    keys = sorted(deltas)
    table = ModelAggregate.__table__  # type: ignore[attr-defined]
    session.execute(
        _insert(session, table).on_conflict_do_nothing(index_elements=["device_id", "sha256"]),
        [{"device_id": k[0], "sha256": k[1], "updated_at": now} for k in keys],
    )
    current = session.execute(
        select(table)
        .where(tuple_(col(ModelAggregate.device_id), col(ModelAggregate.sha256)).in_(keys))
        .order_by(table.c.device_id, table.c.sha256)
        .with_for_update()
    ).mappings()
    params = []
    for row in current:
        d = deltas[(row["device_id"], row["sha256"])]
        classes = dict(row["class_hist"] or {})
        for cls, n in d.classes.items():
            classes[cls] = classes.get(cls, 0) + n
        params.append(
            {
                "k_device": row["device_id"],
                "k_sha": row["sha256"],
                "inferences": row["inferences"] + d.inferences,
                "errors": row["errors"] + d.errors,
                "latency_buckets": list(add_counts(row["latency_buckets"] or [], d.latency)),
                "output_hist": list(add_counts(row["output_hist"] or [], d.output)),
                "class_hist": classes,
                "shadow_samples": row["shadow_samples"] + d.shadow_samples,
                "shadow_agree": row["shadow_agree"] + d.shadow_agree,
                "updated_at": now,
            }
        )
    stmt = (
        update(table)
        .where(table.c.device_id == bindparam("k_device"), table.c.sha256 == bindparam("k_sha"))
        .execution_options(synchronize_session=False)
    )
    session.connection().execute(stmt, params)
