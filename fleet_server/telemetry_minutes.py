"""Telemetry summed per (model hash, hardware cohort, minute) as it is ingested: what the
observability charts read.

Summing the raw batches on every page view cost hundreds of milliseconds at fleet scale (one
batch per device a minute is 600,000 an hour for 10,000 devices). A chart needs only per-cohort
sums over time, so the ingest adds each flush's sums (already computed per device and model for
``ModelAggregate``) to a row per model, cohort and minute of the server's receive time, in the
same transaction as the batches: a chart of a day reads at most 1,440 rows per cohort.

The rows are locked in key order after the aggregates (the ingest's one lock order); a flush
touches a handful of them (models x cohorts), written last so the locks are held briefly.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from itertools import zip_longest
from typing import Any, Protocol

from sqlalchemy import bindparam, select, tuple_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from fleet_server.models import TelemetryMinute

MINUTE = 60
MAX_BINS = 128  # a device's histograms longer than any protocol bounds are cut, not trusted


class ModelDelta(Protocol):
    """What a flush summed for one (device, model): ``telemetry_store``'s per-aggregate delta."""

    inferences: int
    errors: int
    labels: int
    labels_correct: int
    latency: list[list[int]]
    output: list[list[int]]
    in_models: bool


@dataclass
class MinuteSum:
    inferences: int = 0
    errors: int = 0
    labels: int = 0
    labels_correct: int = 0
    latency: list[Sequence[int]] = field(default_factory=list)
    output: list[Sequence[int]] = field(default_factory=list)


def columns(rows: Iterable[Sequence[int]]) -> list[int]:
    """Histograms of any lengths added bin by bin."""
    present = [r for r in rows if r]
    return [sum(c) for c in zip_longest(*present, fillvalue=0)] if present else []


def minute_of(t: datetime) -> int:
    return int(t.timestamp()) // MINUTE * MINUTE


def cohort_sums(
    deltas: Mapping[tuple[str, str], ModelDelta], hardware: Mapping[str, str]
) -> dict[tuple[str, str], MinuteSum]:
    """Per (device, model) deltas summed per (model, hardware id); pure. Devices of unknown hardware
    and models only seen in shadow figures are left out (the charts show neither)."""
    out: dict[tuple[str, str], MinuteSum] = {}
    for (device_id, sha), d in deltas.items():
        hw = hardware.get(device_id)
        if hw is None or not d.in_models:
            continue
        s = out.get((sha, hw))
        if s is None:
            s = out[(sha, hw)] = MinuteSum()
        s.inferences += d.inferences
        s.errors += d.errors
        s.labels += d.labels
        s.labels_correct += d.labels_correct
        s.latency.extend(d.latency)
        s.output.extend(d.output)
    return out


def add_minutes(
    session: Session, deltas: Mapping[tuple[str, str], ModelDelta], hardware: Mapping[str, str], now: datetime
) -> None:
    """Add a flush's sums to the rows of the minute of ``now`` (created when missing)."""
    sums = cohort_sums(deltas, hardware)
    if not sums:
        return
    minute = minute_of(now)
    keys = sorted(sums)
    table = TelemetryMinute.__table__  # type: ignore[attr-defined]
    conn = session.connection()
    dialect = conn.dialect.name
    insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    conn.execute(
        insert.on_conflict_do_nothing(index_elements=["sha256", "hardware_id", "minute"]),
        [
            {"sha256": sha, "hardware_id": hw, "minute": minute, "latency_buckets": [], "output_hist": []}
            for sha, hw in keys
        ],
    )
    query = (
        select(table)
        .where(
            table.c.minute == minute,
            tuple_(table.c.sha256, table.c.hardware_id).in_(keys),
        )
        .order_by(table.c.sha256, table.c.hardware_id)
    )
    if dialect == "postgresql":
        query = query.with_for_update()
    params = []
    for row in conn.execute(query).mappings():
        s = sums[(row["sha256"], row["hardware_id"])]
        params.append(
            {
                "k_sha": row["sha256"],
                "k_hw": row["hardware_id"],
                "inferences": row["inferences"] + s.inferences,
                "errors": row["errors"] + s.errors,
                "labels": row["labels"] + s.labels,
                "labels_correct": row["labels_correct"] + s.labels_correct,
                "latency_buckets": columns([row["latency_buckets"] or [], *s.latency]),
                "output_hist": columns([row["output_hist"] or [], *s.output]),
            }
        )
    conn.execute(
        update(table)
        .where(
            table.c.sha256 == bindparam("k_sha"),
            table.c.hardware_id == bindparam("k_hw"),
            table.c.minute == minute,
        )
        .execution_options(synchronize_session=False),
        params,
    )


def batch_sums(
    batches: Iterable[tuple[datetime, str, Mapping[str, Any]]],
) -> dict[tuple[str, str, int], MinuteSum]:
    """Stored batches (receive time, sender's hardware id, ``models`` as stored) summed per (model,
    hardware id, minute), trusting what a device counts within the ingest's bounds (no negative
    count, no more correct labels than labels); pure. Sums the batches stored before these rows
    were kept."""
    out: dict[tuple[str, str, int], MinuteSum] = {}
    for received, hw, models in batches:
        minute = minute_of(received)
        for sha, stats in (models or {}).items():
            if not isinstance(stats, Mapping):
                continue
            s = out.get((sha, hw, minute))
            if s is None:
                s = out[(sha, hw, minute)] = MinuteSum()
            s.inferences += max(int(stats.get("inferences") or 0), 0)
            s.errors += sum(max(int(v), 0) for v in (stats.get("errors") or {}).values())
            labels = max(int(stats.get("labels") or 0), 0)
            s.labels += labels
            s.labels_correct += min(max(int(stats.get("labels_correct") or 0), 0), labels)
            s.latency.append([max(int(v), 0) for v in (stats.get("latency_buckets") or [])[:MAX_BINS]])
            s.output.append([max(int(v), 0) for v in (stats.get("output_hist") or [])[:MAX_BINS]])
    return out


def minutes_since(session: Session, sha256: str, start: datetime) -> list[tuple[float, str, dict[str, Any]]]:
    """(minute, hardware id, {sha256: its summed stats}) of the model's minutes from the one holding
    ``start`` on, in the shape the charts read a batch's (``console.obs_view.bucketed``)."""
    table = TelemetryMinute.__table__  # type: ignore[attr-defined]
    rows = session.connection().execute(
        select(
            table.c.minute,
            table.c.hardware_id,
            table.c.inferences,
            table.c.errors,
            table.c.labels,
            table.c.labels_correct,
            table.c.latency_buckets,
            table.c.output_hist,
        ).where(table.c.sha256 == sha256, table.c.minute >= minute_of(start))
    )
    return [
        (
            float(minute),
            hw,
            {
                sha256: {
                    "inferences": inferences,
                    "errors": {"all": errors},
                    "labels": labels,
                    "labels_correct": correct,
                    "latency_buckets": latency or [],
                    "output_hist": output or [],
                }
            },
        )
        for minute, hw, inferences, errors, labels, correct, latency, output in rows
    ]


__all__ = [
    "MINUTE",
    "MinuteSum",
    "add_minutes",
    "batch_sums",
    "cohort_sums",
    "columns",
    "minute_of",
    "minutes_since",
]
