"""What the engine's snapshot reads from each device's reported snapshot (a rejection or a wait
for the seq it was sent, the deployment error), on SQLite and PostgreSQL, whatever the snapshot
holds: fields missing, null, or about another seq."""

from __future__ import annotations

import random
from typing import Any

from sqlalchemy import Engine, insert

from fleet_server.engine import assignment_order
from fleet_server.models import Device, EventRow, Model, ModelAggregate, Rollout, RolloutDevice, utcnow
from fleet_server.store import new_session
from fleet_server.ticker import snapshot

REASONS = [None, "", "checksum_mismatch", "wartet auf das Fenster: ü", 'a "quoted" reason']


def _reported(rng: random.Random, seq: int | None) -> dict[str, Any] | None:
    """A reported snapshot with any of the engine's fields missing, null, or about this or another seq."""
    if rng.random() < 0.1:
        return None
    out: dict[str, Any] = {"deployment_state": rng.choice(["serving", "failed", "downloading"])}

    def about() -> dict[str, Any] | None:
        kind = rng.randrange(4)
        if kind == 0:
            return None
        near = seq if seq is not None and kind == 1 else rng.randrange(1, 9)
        item: dict[str, Any] = {"seq": near}
        if rng.random() < 0.8:
            item["reason"] = rng.choice(REASONS)
        return item

    for key in ("last_rejection", "waiting"):
        if rng.random() < 0.8:
            out[key] = about()
    if rng.random() < 0.7:
        out["deployment_error"] = rng.choice(REASONS)
    return out


def _expected(reported: dict[str, Any] | None, seq: int | None) -> tuple[str | None, str | None, str | None]:
    """What the engine reads from it: (failure by rejection, waiting reason, deployment error)."""
    reported = reported or {}
    rejection = reported.get("last_rejection") or {}
    failure = None
    if seq is not None and rejection.get("seq") == seq:
        failure = str(rejection.get("reason") or "rejected")
    waits = reported.get("waiting") or {}
    waiting = str(waits.get("reason") or "waiting") if seq is not None and waits.get("seq") == seq else None
    return failure, waiting, reported.get("deployment_error")


def test_snapshot_reads_the_reported_fields_as_python_would(store: Engine) -> None:
    rng = random.Random(20)
    now = utcnow()
    devices, expected = [], {}
    for i in range(400):
        seq = rng.choice([None, 1, 2, 3])
        reported = _reported(rng, seq)
        device_id = f"d{i:03d}"
        devices.append((device_id, seq, reported))
        expected[device_id] = _expected(reported, seq)
    with store.begin() as c:
        c.execute(insert(Model.__table__), [{  # type: ignore[attr-defined]
            "id": 1, "name": "m", "version": "1", "release": 1, "target": "arm64-cpu",
            "hardware_ids": ["hw"], "sha256": "a" * 64, "length": 1, "manifest": {}, "storage_path": "/x",
            "created_at": now}])  # fmt: skip
        c.execute(insert(Device.__table__), [{  # type: ignore[attr-defined]
            "id": d, "hardware_id": "hw", "tags": {}, "registered_at": now, "reported": reported}
            for d, _, reported in devices])  # fmt: skip
        c.execute(insert(Rollout.__table__), [{  # type: ignore[attr-defined]
            "id": "r", "model_id": 1, "model_ref": "m:1", "model_sha256": "a" * 64, "selector": {},
            "stages": [100], "soak_seconds": 0, "device_timeout_seconds": 3600, "max_error_rate": 0.05,
            "min_inferences": 1, "max_failure_rate": 0.0, "state": "running", "current_stage": 0,
            "stage_unit": "percent", "policy": {}, "approved_through": -1, "rollback_requested": False,
            "created_at": now, "updated_at": now}])  # fmt: skip
        c.execute(insert(RolloutDevice.__table__), [{  # type: ignore[attr-defined]
            "rollout_id": "r", "device_id": d, "order_key": assignment_order("r", d), "stage": 0,
            "state": "notified", "seq": seq, "notified_at": now, "attempts": 1, "updated_at": now}
            for d, seq, _ in devices])  # fmt: skip
    with new_session(store) as session:
        rollout = session.get_one(Rollout, "r")
        snap, _ = snapshot(session, rollout)
    got = {d.device_id: (d.event_failure, d.waiting, d.reported_error) for d in snap}
    assert got == expected
    kinds = {(f is not None, w is not None, e is not None) for f, w, e in expected.values()}
    assert len(kinds) >= 6, kinds  # the table covers failures, waits and errors in many combinations


def test_snapshot_reads_reports_of_in_flight_devices_and_sketches_for_relative_gates(store: Engine) -> None:
    """What the engine reads only in flight (reports, events for the seq) is read only in flight, and
    the sketches only when a relative gate compares them; the counters always."""
    now = utcnow()
    states = {"d-done": "done", "d-pending": "pending", "d-flight": "installing", "d-wait": "waiting"}
    rejected = {"last_rejection": {"seq": 1, "reason": "checksum_mismatch"}, "waiting": {"seq": 1}}
    with store.begin() as c:
        c.execute(insert(Model.__table__), [{  # type: ignore[attr-defined]
            "id": 1, "name": "m", "version": "1", "release": 1, "target": "arm64-cpu",
            "hardware_ids": ["hw"], "sha256": "a" * 64, "length": 1, "manifest": {}, "storage_path": "/x",
            "created_at": now}])  # fmt: skip
        c.execute(insert(Device.__table__), [{  # type: ignore[attr-defined]
            "id": d, "hardware_id": "hw", "tags": {}, "registered_at": now, "reported": rejected}
            for d in states])  # fmt: skip
        c.execute(insert(Rollout.__table__), [{  # type: ignore[attr-defined]
            "id": "r", "model_id": 1, "model_ref": "m:1", "model_sha256": "a" * 64, "selector": {},
            "stages": [100], "soak_seconds": 0, "device_timeout_seconds": 3600, "max_error_rate": 0.05,
            "min_inferences": 1, "max_failure_rate": 0.0, "state": "running", "current_stage": 0,
            "stage_unit": "percent", "policy": {}, "approved_through": -1, "rollback_requested": False,
            "created_at": now, "updated_at": now}])  # fmt: skip
        c.execute(insert(RolloutDevice.__table__), [{  # type: ignore[attr-defined]
            "rollout_id": "r", "device_id": d, "order_key": assignment_order("r", d),
            "stage": None if s == "pending" else 0, "state": s, "seq": None if s == "pending" else 1,
            "notified_at": now, "attempts": 1, "updated_at": now} for d, s in states.items()])  # fmt: skip
        c.execute(insert(EventRow.__table__), [{  # type: ignore[attr-defined]
            "device_id": d, "seq": 1, "state": "failed", "reason": "oom", "ts": now}
            for d in states])  # fmt: skip
        c.execute(insert(ModelAggregate.__table__), [{  # type: ignore[attr-defined]
            "device_id": d, "sha256": "a" * 64, "inferences": 7, "latency_buckets": [1, 2],
            "output_hist": [3]} for d in states])  # fmt: skip
    with new_session(store) as session:
        rollout = session.get_one(Rollout, "r")
        snap = {d.device_id: d for d in snapshot(session, rollout)[0]}
        assert {d: (s.event_failure, s.event_progress, s.waiting) for d, s in snap.items()} == {
            "d-done": (None, False, None),
            "d-pending": (None, False, None),
            "d-flight": ("oom", True, "waiting"),
            "d-wait": ("oom", True, "waiting"),
        }
        assert {s.inferences for s in snap.values()} == {7}
        assert {s.latency_buckets for s in snap.values()} == {()}
        rollout.policy = {"max_latency_ratio": 1.5}
        snap = {d.device_id: d for d in snapshot(session, rollout)[0]}
        assert {(s.latency_buckets, s.output_hist) for s in snap.values()} == {((1, 2), (3,))}
