"""The per-minute telemetry sums the ingest keeps give the observability charts the same figures as
summing the raw batches, on SQLite and PostgreSQL."""

from __future__ import annotations

import random
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, select
from sqlmodel import col

from device_agent import protocol
from fleet_server.console import obs_view
from fleet_server.counters import Counters
from fleet_server.ingest import Inbound, ingest_batch
from fleet_server.models import Device, TelemetryBatchRow
from fleet_server.settings import ServerSettings
from fleet_server.store import make_engine, new_session
from fleet_server.telemetry_minutes import MINUTE, columns, minute_of, minutes_since
from fleet_server.telemetry_store import prepare, store_prepared

T0 = datetime(2026, 3, 1, 12, 0, 17, tzinfo=UTC)


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    url = None if request.param == "sqlite" else request.getfixturevalue("pg_url")
    settings = ServerSettings(data_dir=tmp_path, **({"database_url": url} if url else {}))
    e = make_engine(settings)
    yield e
    e.dispose()


def stats(rng: random.Random) -> protocol.ModelStats:
    n = rng.randint(0, 400)
    labels = rng.randint(0, n // 4)
    return protocol.ModelStats(
        inferences=n,
        errors={"non_finite": rng.randint(0, 5), "timeout": rng.randint(0, 2)} if rng.random() < 0.5 else {},
        # histograms of differing lengths: a shorter one is padded with zeros when added
        latency_buckets=[
            rng.randint(0, 50) for _ in range(rng.randint(0, len(protocol.LATENCY_BOUNDS_US) + 1))
        ],
        output_hist=[rng.randint(0, 30) for _ in range(rng.randint(0, 12))],
        labels=labels,
        labels_correct=rng.randint(0, labels),
    )


def ingest(engine: Engine, sha: str, other: str, devices: dict[str, str]) -> int:
    """Flushes over 12 minutes, a few a minute, from devices on two cohorts (and one unregistered),
    a redelivered batch among them; returns how many batches were stored."""
    rng = random.Random(7)
    sent: list[protocol.TelemetryBatch] = []
    stored = 0
    for flush in range(30):
        now = T0 + timedelta(seconds=flush * 23 + rng.randint(0, 20))
        batches = []
        for device_id in [*devices, "stranger"]:
            models = {sha: stats(rng)}
            if rng.random() < 0.3:
                models[other] = stats(rng)
            batches.append(
                protocol.TelemetryBatch(
                    device_id=device_id,
                    batch_id=uuid.uuid4().hex,
                    window_start=now - timedelta(seconds=60),
                    window_end=now,
                    models=models,
                )
            )
        if sent:
            batches.append(sent[-2])  # redelivered: counted once
        sent += batches
        with new_session(engine) as session:
            stored += store_prepared(session, prepare(engine.dialect.name, batches), now, devices)
            session.commit()
    return stored


def raw_rows(engine: Engine, sha: str, start: datetime) -> list[tuple[float, str, dict[str, Any]]]:
    """What the charts summed before: every raw batch, placed at its minute."""
    batches = TelemetryBatchRow.__table__  # type: ignore[attr-defined]
    with new_session(engine) as session:
        rows = session.connection().execute(
            select(batches.c.received_at, col(Device.hardware_id), batches.c.models)
            .join(Device, col(Device.id) == batches.c.device_id)
            .where(batches.c.received_at >= datetime.fromtimestamp(minute_of(start), UTC))
        )
        return [(float(minute_of(t)), hw, models) for t, hw, models in rows if sha in models]


def test_charts_from_the_minute_sums_equal_those_from_the_raw_batches(engine: Engine) -> None:
    sha, other = uuid.uuid4().hex * 2, uuid.uuid4().hex * 2  # unique: the PostgreSQL database is shared
    devices = {f"m-{sha[:8]}-{i}": ("rpi4" if i % 3 else "jetson") for i in range(6)}
    with new_session(engine) as session:
        session.add_all(Device(id=d, hardware_id=hw) for d, hw in devices.items())
        session.commit()
    assert ingest(engine, sha, other, devices) == 30 * 6  # the stranger's and the redelivered left out
    end = (T0 + timedelta(minutes=15)).timestamp()
    for start in (T0 - timedelta(minutes=5), T0 + timedelta(minutes=5, seconds=30)):
        with new_session(engine) as session:
            minutes = minutes_since(session, sha, start)
        raw = raw_rows(engine, sha, start)
        assert len(raw) > 3 * len(minutes) / 2 > 0  # the sums are fewer rows than the batches
        for n, resolution in ((24, 0.0), (7, 0.0), (24, MINUTE)):
            expected = obs_view.charts(obs_view.bucketed(raw, sha, minute_of(start), end, n, resolution))
            got = obs_view.charts(obs_view.bucketed(minutes, sha, minute_of(start), end, n, resolution))
            assert got == expected
            assert sorted(s.name for s in got["Error rate"]) == ["jetson", "rpi4"]
            assert any(v is not None and v > 0 for s in got["Latency (ms)"] for _, v in s.points)
            assert any(v is not None and v > 0 for s in got["Output PSI vs the window"] for _, v in s.points)
    with new_session(engine) as session:
        rows = minutes_since(session, sha, T0)
    assert all(t % MINUTE == 0 for t, _, _ in rows)
    total = sum(part[sha]["inferences"] for _, _, part in rows)
    assert total == sum(m[sha]["inferences"] for _, _, m in raw_rows(engine, sha, T0))


def test_the_ingest_keeps_the_sums_by_the_senders_hardware(engine: Engine) -> None:
    sha = uuid.uuid4().hex * 2
    devices = {f"i-{sha[:8]}-a": "rpi4", f"i-{sha[:8]}-b": "jetson", f"i-{sha[:8]}-c": "rpi4"}
    with new_session(engine) as session:
        session.add_all(Device(id=d, hardware_id=hw) for d, hw in devices.items())
        session.commit()
    now = datetime.now(UTC)
    items = []
    for i, device_id in enumerate([*devices, "i-unregistered"]):
        stats = protocol.ModelStats(inferences=10 * (i + 1), latency_buckets=[i, 1])
        batch = protocol.TelemetryBatch(
            device_id=device_id, batch_id="b1", window_start=now, window_end=now, models={sha: stats}
        )
        topic = protocol.topic(device_id, protocol.Channel.TELEMETRY)
        items.append(Inbound(topic, protocol.encode_telemetry(batch), now.timestamp()))
    ingest_batch(engine, items, Counters())
    ingest_batch(engine, items[:1], Counters())  # redelivered: counted once
    with new_session(engine) as session:
        rows = minutes_since(session, sha, now - timedelta(minutes=2))
    by_hw: dict[str, tuple[int, list[int]]] = {}
    for _, hw, part in rows:  # summed: the two flushes may fall on two minutes
        n, latency = by_hw.get(hw, (0, []))
        by_hw[hw] = (n + part[sha]["inferences"], columns([latency, part[sha]["latency_buckets"]]))
    assert by_hw == {"rpi4": (10 + 30, [0 + 2, 2]), "jetson": (20, [1, 1])}
