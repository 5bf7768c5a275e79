"""Where a rollout's wall time went, read back from the fleet server's database after the run.

Everything needed is already stored: the engine's decisions (``assign`` per stage,
``stage_finished``, ``next_stage``, ``completed``) with their times, each rollout device's
``notified_at`` and the time the engine last wrote its row (``updated_at``: when it was marked
``done``), every deployment event a device sent (its own ``ts`` and the server's ``received_at``),
and each device's last reported snapshot (its ``ts``: the report that proved it serves the new
model, the last a device sends in a rollout without a later directive).

Per stage this gives the critical path: the device whose proof came last, split into

- ``directive``: from the engine's assign decision to the device's first event (publish, broker,
  the agent judging the signed directive);
- ``fetch_verify``: first event to ``warming`` (TUF refresh, envelope, download, verify, slot write);
- ``load_swap``: ``warming`` to the swap's event (session load, acceptance check, swap);
- ``proof_wait``: swap to the report of its first successful inference with the new model (the
  workload's period: a device is done only once it served the model);
- ``engine_wait``: that report to the engine marking the device done (the next tick);
- ``next_stage``: the last device done to the next stage's assign decision (zero when one tick
  does both, as with zero soak).

All times are seconds from the rollout's creation. Clocks: the devices are simulated on this
machine, so their ``ts`` and the server's times share one clock.
"""

from __future__ import annotations

import json
import statistics
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Engine, text

SWAP_STATES = ("probation", "serving")


def _json(value: Any) -> dict[str, Any]:
    """A JSON column read through ``text()``: a dict on PostgreSQL, a string on SQLite."""
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else {}


def _naive_utc(value: Any) -> datetime:
    """A stored or reported time as naive UTC (SQLite gives naive strings, reports carry an offset)."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    assert isinstance(value, datetime)
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def _t(value: Any, origin: datetime) -> float:
    return round((_naive_utc(value) - origin).total_seconds(), 3)


def _created(engine: Engine, rollout_id: str) -> datetime:
    with engine.connect() as conn:
        created = conn.execute(
            text("SELECT created_at FROM rollout WHERE id = :r"), {"r": rollout_id}
        ).scalar()
    return _naive_utc(created)


def _gap(a: float | None, b: float | None) -> float | None:
    return round(b - a, 3) if a is not None and b is not None else None


def _median(rows: list[dict[str, float | None]], key_a: str, key_b: str) -> float | None:
    gaps = []
    for r in rows:
        a, b = r[key_a], r[key_b]
        if a is not None and b is not None:
            gaps.append(b - a)
    return round(statistics.median(gaps), 3) if gaps else None


END_ACTIONS = ("completed", "roll_back", "pause")


def timeline(engine: Engine, rollout_id: str) -> dict[str, Any]:
    """The rollout's stages, each with its decisions' times and its critical path (see the module)."""
    origin = _created(engine, rollout_id)
    with engine.connect() as conn:
        decisions = conn.execute(
            text("SELECT ts, action, reason, figures FROM rolloutdecision WHERE rollout_id = :r ORDER BY id"),
            {"r": rollout_id},
        ).all()
        devices = conn.execute(
            text(
                "SELECT rd.device_id, rd.stage, rd.seq, rd.notified_at, rd.updated_at, rd.state, rd.reason,"
                " d.reported "
                "FROM rolloutdevice rd JOIN device d ON d.id = rd.device_id WHERE rd.rollout_id = :r"
            ),
            {"r": rollout_id},
        ).all()
        events = conn.execute(
            text(
                "SELECT e.device_id, e.state, e.reason, e.detail, e.ts, e.received_at FROM eventrow e"
                " JOIN rolloutdevice rd "
                "ON rd.device_id = e.device_id AND rd.seq = e.seq WHERE rd.rollout_id = :r ORDER BY e.id"
            ),
            {"r": rollout_id},
        ).all()
    first: dict[tuple[str, str], float] = {}
    first_event: dict[str, float] = {}
    for ev in events:
        ts = _t(ev.ts, origin)
        first.setdefault((ev.device_id, ev.state), ts)
        first_event.setdefault(ev.device_id, ts)
    marks: list[tuple[float, str, Any]] = []
    for d in decisions:
        figures = _json(d.figures)
        marks.append((_t(d.ts, origin), d.action, figures.get("stage")))
    per_stage: dict[int, list[dict[str, float | None]]] = {}
    for d in devices:
        if d.stage is None:
            continue
        reported = _json(d.reported)
        proof = _t(reported["ts"], origin) if reported.get("ts") else None
        swap = next((first[(d.device_id, s)] for s in SWAP_STATES if (d.device_id, s) in first), None)
        per_stage.setdefault(d.stage, []).append(
            {
                "notified": _t(d.notified_at, origin) if d.notified_at else None,
                "first_event": first_event.get(d.device_id),
                "warming": first.get((d.device_id, "warming")),
                "swap": swap,
                "proof": proof,
                "done": _t(d.updated_at, origin) if d.state == "done" else None,
            }
        )
    assigns = {stage: t for t, action, stage in marks if action == "assign"}
    end_marks = [t for t, action, _ in marks if action in END_ACTIONS]
    stages = []
    for k in sorted(per_stage):
        rows = per_stage[k]
        start = assigns.get(k, min(r["notified"] or 0.0 for r in rows))
        end = assigns.get(k + 1) or (end_marks[0] if end_marks else None)
        last = max(rows, key=lambda r: r["proof"] or 0.0)

        phases = {
            "directive": _gap(start, last["first_event"]),
            "fetch_verify": _gap(last["first_event"], last["warming"]),
            "load_swap": _gap(last["warming"], last["swap"]),
            "proof_wait": _gap(last["swap"], last["proof"]),
            "engine_wait": _gap(last["proof"], last["done"]),
        }
        last_done = max((r["done"] or 0.0) for r in rows)
        phases["next_stage"] = _gap(last_done, end)

        stages.append(
            {
                "stage": k,
                "devices": len(rows),
                "start": start,
                "end": end,
                "wall": _gap(start, end),
                "critical_path": phases,
                "median": {
                    "directive": _median(rows, "notified", "first_event"),
                    "fetch_verify": _median(rows, "first_event", "warming"),
                    "load_swap": _median(rows, "warming", "swap"),
                    "proof_wait": _median(rows, "swap", "proof"),
                    "engine_wait": _median(rows, "proof", "done"),
                },
            }
        )
    # Why it ended, and why its devices failed (a rollback's cause, which the times alone do not
    # tell): the final decision's reason and the devices' reasons, counted by their first words.
    ended = next(
        ({"action": d.action, "reason": d.reason} for d in reversed(decisions) if d.action in END_ACTIONS),
        None,
    )
    failed = Counter(
        " ".join(str(d.reason).split()[:6])
        for d in devices
        if d.state not in ("done", "pending", "notified") and d.reason
    )
    return {
        "rollout": rollout_id,
        "stages": stages,
        "decisions": marks,
        "ended": ended,
        "device_reasons": dict(failed.most_common(8)),
        "failures": _failures(events, devices, origin),
    }


def _failures(events: Any, devices: Any, origin: datetime) -> dict[str, Any]:
    """Per stage, the devices' failure events by reason, with when they came (the median and the
    range, seconds from the rollout's creation) and up to three details each: which stage's devices
    failed how, and what they said, which the final counts alone do not tell."""
    stage_of = {d.device_id: d.stage for d in devices}
    seen: dict[tuple[Any, str], list[float]] = {}
    samples: dict[tuple[Any, str], list[str]] = {}
    for ev in events:
        if ev.state not in ("failed", "rejected"):  # not a wait's reason (not_before, deferred)
            continue
        key = (stage_of.get(ev.device_id), f"{ev.state}:{ev.reason}")
        seen.setdefault(key, []).append(_t(ev.ts, origin))
        if ev.detail and len(samples.setdefault(key, [])) < 3:
            samples[key].append(str(ev.detail)[:300])
    out: dict[str, Any] = {}
    for (stage, what), times in sorted(seen.items(), key=lambda kv: (str(kv[0][0]), kv[0][1])):
        out.setdefault(f"stage {stage}", {})[what] = {
            "count": len(times),
            "at_median": round(statistics.median(times), 1),
            "at_range": [min(times), max(times)],
            "details": samples.get((stage, what), []),
        }
    return out


def totals(tl: dict[str, Any]) -> dict[str, float]:
    """The critical path's phases summed over the stages (seconds)."""
    out: dict[str, float] = {}
    for s in tl["stages"]:
        for phase, v in s["critical_path"].items():
            out[phase] = round(out.get(phase, 0.0) + (v or 0.0), 3)
    return out
