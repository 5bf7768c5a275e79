"""Labels posted to the server, scored against their captured predictions and counted per cohort.

A label posted to ``/api/v1/labels`` says what an inference should have been; the capture of
that inference (``CaptureItem.predicted``, the top-1 of its first output row) says what the
model answered. Either may arrive first, so each side counts when it meets the other: the label
store counts the new labels whose capture is there, the capture store the new captures whose
labels are there. Each stored label (one per source) is counted once, under the capture's model
hash and hardware cohort, in ``ServerLabelCount``; the accuracy SLI adds those counts to the ones
devices report (``fleet_server.slo_store.cohort_totals``).

A label and its capture stored by two transactions at the same instant may each miss the other
(neither sees the other's uncommitted row) and go uncounted: a capture is uploaded in batches
long after its inference, and a label usually comes later still, so the window is small and the
SLI undercounts rather than counting twice.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any

from sqlalchemy import Connection
from sqlalchemy.dialects import postgresql, sqlite

from fleet_server.models import ServerLabelCount

Cohort = tuple[str, str]  # (model sha256, hardware id)


def verdict(label: Any, predicted: str | None) -> bool | None:
    """Whether ``label`` says the captured top-1 ``predicted`` was right; None when it cannot be
    scored: no prediction captured, or a label that is no class (a value, a boolean). A label list
    (one per row of a multi-row inference) is scored on its first row, as ``predicted`` is."""
    if predicted is None:
        return None
    first = label[0] if isinstance(label, list) and label else label
    if isinstance(first, bool) or not isinstance(first, int | str):
        return None
    return str(first) == predicted


def tally(rows: Iterable[tuple[str, str, Any, str | None]]) -> dict[Cohort, tuple[int, int]]:
    """(labels, right ones) per cohort from ``(model sha256, hardware id, label, predicted)``; labels
    that cannot be scored are left out."""
    out: dict[Cohort, tuple[int, int]] = {}
    for sha, hw, label, predicted in rows:
        right = verdict(label, predicted)
        if right is None:
            continue
        n, correct = out.get((sha, hw), (0, 0))
        out[(sha, hw)] = (n + 1, correct + right)
    return out


def add_counts(conn: Connection, counts: Mapping[Cohort, tuple[int, int]], now: datetime) -> None:
    """Add ``counts`` to the stored ones in the caller's transaction (one upsert; cohorts in key
    order, so two transactions adding to the same rows lock them in the same order)."""
    if not counts:
        return
    table = ServerLabelCount.__table__  # type: ignore[attr-defined]
    dialect: Any = postgresql if conn.dialect.name == "postgresql" else sqlite
    rows = [
        {"model_sha256": sha, "hardware_id": hw, "labels": n, "labels_correct": c, "updated_at": now}
        for (sha, hw), (n, c) in sorted(counts.items())
    ]
    stmt = dialect.insert(table).values(rows)
    conn.execute(
        stmt.on_conflict_do_update(
            index_elements=["model_sha256", "hardware_id"],
            set_={
                "labels": table.c.labels + stmt.excluded.labels,
                "labels_correct": table.c.labels_correct + stmt.excluded.labels_correct,
                "updated_at": stmt.excluded.updated_at,
            },
        )
    )


__all__ = ["Cohort", "add_counts", "tally", "verdict"]
