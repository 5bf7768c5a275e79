"""Ground-truth, availability and capture counts from telemetry are summed into the aggregates exactly
once per batch (redelivered, or twice in one flush), on SQLite and PostgreSQL, within bounds."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import Engine

from device_agent import protocol
from fleet_server.counters import Counters
from fleet_server.ingest import Inbound, ingest_batch
from fleet_server.models import Device, DeviceTotals, ModelAggregate
from fleet_server.settings import ServerSettings
from fleet_server.store import make_engine, new_session

SHA = "ab" * 32
NOW = datetime(2026, 3, 1, tzinfo=UTC)


def _stats(**over: object) -> protocol.ModelStats:
    values: dict[str, object] = {
        "inferences": 50,
        "labels": 10,
        "labels_correct": 8,
        "confusion": {"cat:cat": 5, "dog:dog": 3, "dog:cat": 2},
        "label_delay_buckets": [0, 4, 6],
        "label_abs_error_sum": 1.5,
        "requests": 52,
        "request_errors": {"timeout": 1, "bad_input": 1},
        "input_checks": {"image": [50, 1, 0, 3]},
        "input_buckets": {"image": [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]},
        "cpu_ms": 12.5,
        "captured": 4,
    }
    values.update(over)
    return protocol.ModelStats.model_validate(values)


def _batch(device: str, batch_id: str, stats: protocol.ModelStats, **over: object) -> Inbound:
    batch = protocol.TelemetryBatch.model_validate(
        {
            "device_id": device,
            "batch_id": batch_id,
            "window_start": NOW,
            "window_end": NOW,
            "models": {SHA: stats},
            "labels_unmatched": {"unknown": 2, "expired": 1},
            "capture_evicted": 3,
            **over,
        }
    )
    return Inbound(
        protocol.topic(device, protocol.Channel.TELEMETRY), protocol.encode_telemetry(batch), time.time()
    )


def _engine(tmp_path: Path, url: str | None, devices: list[str]) -> Engine:
    engine = make_engine(ServerSettings(data_dir=tmp_path, database_url=url))
    with new_session(engine) as session:
        for d in devices:
            session.add(Device(id=d, hardware_id="rpi4"))
        session.commit()
    return engine


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    url = None if request.param == "sqlite" else request.getfixturevalue("fresh_pg")
    made = _engine(tmp_path, url, ["lc-1", "lc-2"])
    request.addfinalizer(made.dispose)
    return made


def test_label_counts_are_summed_once_per_batch_even_when_redelivered(engine: Engine) -> None:
    counters = Counters()
    first = _batch("lc-1", "b1", _stats())
    second = _batch("lc-1", "b2", _stats(confusion={"cat:dog": 1}, input_checks={"extra": [5, 0, 5, 0]}))
    other = _batch("lc-2", "b1", _stats(labels=1, labels_correct=1, confusion={"cat:cat": 1}))
    # one flush with a batch twice, then the whole flush redelivered (a worker died before its ack)
    ingest_batch(engine, [first, first, second, other], counters)
    ingest_batch(engine, [second, first, other], counters)
    assert counters.snapshot()["telemetry_batches"] == 3
    with new_session(engine) as session:
        agg = session.get(ModelAggregate, ("lc-1", SHA))
        lone = session.get(ModelAggregate, ("lc-2", SHA))
        totals = session.get(DeviceTotals, "lc-1")
    assert agg is not None and lone is not None and totals is not None
    assert (agg.labels, agg.labels_correct, agg.requests, agg.captured) == (20, 16, 104, 8)
    assert agg.confusion == {"cat:cat": 5, "dog:dog": 3, "dog:cat": 2, "cat:dog": 1}
    assert agg.label_delay_buckets == [0, 8, 12]
    assert agg.request_errors == {"timeout": 2, "bad_input": 2}
    assert agg.input_checks == {"image": [50, 1, 0, 3], "extra": [5, 0, 5, 0]}
    assert agg.input_buckets == {"image": [2 * n for n in range(1, 13)]}  # bucket by bucket, each batch once
    assert agg.label_abs_error_sum == pytest.approx(3.0) and agg.cpu_ms == pytest.approx(25.0)
    assert agg.inferences == 100  # the figures that were there before still add up alike
    assert (lone.labels, lone.labels_correct, lone.confusion) == (1, 1, {"cat:cat": 1})
    assert totals.labels_unmatched == {"unknown": 4, "expired": 2} and totals.capture_evicted == 6
    # a later batch adds to what is stored
    ingest_batch(engine, [_batch("lc-1", "b3", _stats(), capture_evicted=0, labels_unmatched={})], counters)
    with new_session(engine) as session:
        agg = session.get(ModelAggregate, ("lc-1", SHA))
        totals = session.get(DeviceTotals, "lc-1")
    assert agg is not None and totals is not None
    assert (agg.labels, agg.labels_correct, agg.confusion["cat:cat"]) == (30, 24, 10)
    assert agg.input_buckets == {"image": [3 * n for n in range(1, 13)]}
    assert totals.labels_unmatched == {"unknown": 4, "expired": 2} and totals.capture_evicted == 6


def test_a_device_is_trusted_only_within_bounds(engine: Engine) -> None:
    """Negative counts, more correct labels than labels, non-finite sums and unbounded names are cut,
    not stored as sent: the metrics and gates read these rows."""
    bad = _stats(
        labels=4,
        labels_correct=9,
        requests=-5,
        request_errors={"timeout": -3, "x" * 500: 2},
        cpu_ms=-3.0,
        label_abs_error_sum=-2.0,
        captured=-1,
        label_delay_buckets=[-4, 2],
        input_checks={"image": [10, 1, 0, 2, 99, 99]},
        input_buckets={"image": [-4, 2] + [0] * 10 + [99, 99], **{f"in{i}": [1] for i in range(100)}},
        confusion={f"{i}:{i}": 1 for i in range(5000)},
    )
    ingest_batch(engine, [_batch("lc-2", "bad", bad, capture_evicted=-7, dropped_batches=2)], Counters())
    with new_session(engine) as session:
        agg = session.get(ModelAggregate, ("lc-2", SHA))
        totals = session.get(DeviceTotals, "lc-2")
    assert agg is not None and totals is not None
    assert (agg.labels, agg.labels_correct, agg.requests, agg.captured) == (4, 4, 0, 0)
    assert agg.request_errors == {}  # with no valid request count, no error kinds either
    assert agg.cpu_ms == 0.0 and agg.label_abs_error_sum == 0.0
    assert agg.label_delay_buckets == [0, 2]
    assert agg.input_checks == {"image": [10, 1, 0, 2]}
    # no negative counts, 12 buckets at most, a bounded number of inputs
    assert agg.input_buckets["image"] == [0, 2] + [0] * 10 and len(agg.input_buckets) == 64
    assert len(agg.confusion) == (protocol.MAX_LABEL_CLASSES + 1) ** 2
    assert (totals.capture_evicted, totals.dropped_batches) == (0, 2)


def test_batches_without_device_level_counts_write_no_device_totals(engine: Engine) -> None:
    ingest_batch(
        engine, [_batch("lc-1", "quiet", _stats(), labels_unmatched={}, capture_evicted=0)], Counters()
    )
    with new_session(engine) as session:
        assert session.get(DeviceTotals, "lc-1") is None
        agg = session.get(ModelAggregate, ("lc-1", SHA))
        assert agg is not None and agg.labels == 10
