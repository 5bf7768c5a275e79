"""Apps' outcome metrics from telemetry: each batch's per-model ``outcomes`` (metric -> count, sum,
sum of squares, joined on the device to the model that made the prediction) added to the
per-(device, model, metric) totals, which experiments compare per arm.

Ingest calls :func:`add_outcomes` with the batches that were new, in the telemetry transaction, so
a batch sent twice is counted once (the batch key decides, as for every other figure). Entries
that cannot be an outcome (a metric name outside the device's rule, a negative or fractional
count, a sum that is not finite, more metrics than a device sends) are dropped, not stored.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session

from device_agent import protocol
from device_agent.outcomes import MAX_METRICS, METRIC_RE
from fleet_server.models import OutcomeAggregate

Key = tuple[str, str, str]  # (device, model sha256, metric)


def tally(batches: Iterable[protocol.TelemetryBatch]) -> dict[Key, tuple[int, float, float]]:
    """The batches' valid outcome entries summed per (device, model, metric) (pure)."""
    out: dict[Key, tuple[int, float, float]] = {}
    for b in batches:
        for sha, stats in b.models.items():
            for metric, acc in list(stats.outcomes.items())[:MAX_METRICS]:
                if not METRIC_RE.match(metric) or len(acc) != 3:
                    continue
                n, total, total_sq = acc
                if not (
                    n >= 1 and float(n).is_integer() and math.isfinite(total) and math.isfinite(total_sq)
                ):
                    continue
                if total_sq < 0:
                    continue
                key = (b.device_id, sha, metric)
                cn, ct, cq = out.get(key, (0, 0.0, 0.0))
                out[key] = (cn + int(n), ct + total, cq + total_sq)
    return out


def add_outcomes(session: Session, batches: Iterable[protocol.TelemetryBatch], now: datetime) -> int:
    """Add the batches' outcomes to the stored totals (one upsert, keys in order); returns the rows."""
    sums = tally(batches)
    if not sums:
        return 0
    table: Any = OutcomeAggregate.__table__  # type: ignore[attr-defined]
    dialect: Any = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    rows = [
        {"device_id": d, "sha256": sha, "metric": m, "n": n, "total": t, "total_sq": q, "updated_at": now}
        for (d, sha, m), (n, t, q) in sorted(sums.items())
    ]
    stmt = dialect.insert(table).values(rows)
    session.connection().execute(
        stmt.on_conflict_do_update(
            index_elements=["device_id", "sha256", "metric"],
            set_={
                "n": table.c.n + stmt.excluded.n,
                "total": table.c.total + stmt.excluded.total,
                "total_sq": table.c.total_sq + stmt.excluded.total_sq,
                "updated_at": stmt.excluded.updated_at,
            },
        )
    )
    return len(rows)


__all__ = ["add_outcomes", "tally"]
