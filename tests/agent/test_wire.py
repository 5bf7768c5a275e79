"""The agent's stdlib codec (``device_agent.wire``) against the pydantic contract (``protocol``).

What the device encodes must decode with the server's schemas to the same values,
and the directives the server signs must decode on the device to the same fields;
what the schema refuses, the device refuses too. No broker, no I/O: milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from device_agent import protocol, wire
from tests.support.fresh_imports import imported_by

SHA = "ab" * 32
NOW = datetime(2026, 11, 27, 7, 58, 35, 123456, tzinfo=UTC)


def _ref(**kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "name": "tiny",
        "version": "2",
        "release": 2,
        "target": "arm64-cpu",
        "sha256": SHA,
        "length": 1234,
        "model_url": "http://h/m",
        "envelope_url": "http://h/e",
    }
    doc.update(kw)
    return doc


def _directive(**kw: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "device_id": "dev-1",
        "seq": 7,
        "issued_at": NOW.isoformat(),
        "expires_at": (NOW + timedelta(hours=1)).isoformat(),
        "model": _ref(),
    }
    doc.update(kw)
    return doc


def test_shared_names_are_the_same_objects() -> None:
    assert protocol.DeploymentState is wire.DeploymentState
    assert protocol.ProtocolError is wire.ProtocolError
    assert protocol.LATENCY_BOUNDS_US is wire.LATENCY_BOUNDS_US
    assert protocol.topic("d", "events") == wire.topic("d", wire.Channel.EVENTS) == "ef/v1/d/events"


@pytest.mark.parametrize(
    "doc",
    [
        _directive(),
        _directive(model=None, rollout_id="r1"),
        _directive(
            probation={"seconds": 2.5, "min_inferences": 3, "max_error_rate": 0.1, "max_latency_ratio": 2},
            probation_inferences=4,
            shadow=_ref(sha256="cd" * 32, version="3"),
            shadow_sample_rate=0.5,
            not_before=(NOW + timedelta(minutes=5)).isoformat(),
            unknown_field="ignored",
        ),
        _directive(probation={}),
        _directive(capture={"upload_url": "https://fleet.example/api/v1/captures"}),
        _directive(
            activation={
                "windows": [{"days": ["sat", "sun"], "start": "22:00", "end": "04:00"}],
                "max_deferral_seconds": 600,
            },
            metered={"download": "unmetered_only", "max_bytes_per_day": None},
        ),
        _directive(activation={}, metered={"max_bytes_per_day": 5_000_000}),
        _directive(
            capture={
                "upload_url": "http://127.0.0.1:8080/api/v1/captures",
                "sample_rate": 0.25,
                "keep": "inputs",
                "quota_bytes": 1 << 20,
            }
        ),
    ],
)
def test_directives_decode_like_the_schema(doc: dict[str, Any]) -> None:
    payload = json.dumps(doc).encode()
    mine, theirs = wire.decode_directive(payload), protocol.decode_directive(payload)
    for name in ("device_id", "seq", "issued_at", "expires_at", "rollout_id", "probation_inferences"):
        assert getattr(mine, name) == getattr(theirs, name), name
    assert mine.not_before == theirs.not_before and mine.shadow_sample_rate == theirs.shadow_sample_rate
    for a, b in ((mine.model, theirs.model), (mine.shadow, theirs.shadow)):
        assert (a is None) == (b is None)
        if a is not None and b is not None:
            assert a.to_dict() == b.model_dump() and a.ref == b.ref
    if mine.capture is None:
        assert theirs.capture is None
    else:
        assert theirs.capture is not None and mine.capture.to_dict() == theirs.capture.model_dump()
    if mine.activation is None:
        assert theirs.activation is None
    else:
        assert theirs.activation is not None and mine.activation.to_dict() == theirs.activation.model_dump()
    if mine.metered is None:
        assert theirs.metered is None
    else:
        assert theirs.metered is not None and mine.metered.to_dict() == theirs.metered.model_dump()
    if mine.probation is None:
        assert theirs.probation is None
    else:
        assert theirs.probation is not None and mine.probation.to_dict() == theirs.probation.model_dump()
    # the server's own encoding decodes the same way
    again = wire.decode_directive(theirs.model_dump_json().encode())
    assert again == mine


@pytest.mark.parametrize(
    "doc",
    [
        _directive(seq=0),
        _directive(seq="7x"),
        _directive(model=_ref(sha256="AB" * 32)),
        _directive(model=_ref(length=0)),
        _directive(model=_ref(name=None)),
        _directive(expires_at="tomorrow"),
        _directive(probation={"max_error_rate": 1.5}),
        _directive(probation={"max_latency_ratio": 0}),
        _directive(shadow_sample_rate=-0.1),
        _directive(capture={"sample_rate": 0.5}),
        _directive(capture={"upload_url": "http://x/c", "keep": "everything"}),
        _directive(capture={"upload_url": "http://x/c", "sample_rate": 2}),
        _directive(capture={"upload_url": "http://x/c", "quota_bytes": 0}),
        _directive(capture="yes"),
        _directive(activation={"windows": [{"days": ["someday"], "start": "22:00", "end": "04:00"}]}),
        _directive(activation={"windows": [{"days": ["mon"], "start": "24:00", "end": "04:00"}]}),
        _directive(activation={"windows": [{"days": ["mon"], "start": "2:00", "end": "04:00"}]}),
        _directive(activation={"windows": [{"days": [], "start": "02:00", "end": "04:00"}]}),
        _directive(activation={"windows": [{"days": ["mon"], "start": "02:00"}]}),
        _directive(activation={"max_deferral_seconds": -1}),
        _directive(metered={"download": "sometimes"}),
        _directive(metered={"max_bytes_per_day": 0}),
        {k: v for k, v in _directive().items() if k != "model"},
        {k: v for k, v in _directive().items() if k != "expires_at"},
        [1, 2],
    ],
)
def test_malformed_directives_are_refused_by_both(doc: Any) -> None:
    payload = json.dumps(doc).encode()
    with pytest.raises(protocol.ProtocolError):
        protocol.decode_directive(payload)
    with pytest.raises(wire.ProtocolError):
        wire.decode_directive(payload)


def test_garbage_and_oversize_are_refused() -> None:
    for payload in (b"{not json", b"\xff\xfe", b"x" * (wire.MAX_PAYLOAD + 1)):
        with pytest.raises(wire.ProtocolError):
            wire.decode_directive(payload)


def test_device_messages_decode_with_the_schema() -> None:
    DS = wire.DeploymentState
    rep = wire.Reported(
        device_id="dev-1",
        agent_version="0.1.0",
        hardware_id="rpi4",
        running=wire.RunningModel("tiny", "2", SHA),
        slots={"a": SHA, "b": None},
        active_slot="a",
        deployment_seq=7,
        deployment_state=DS.PROBATION,
        served_ok={SHA: 3},
        served_errors={SHA: 1},
        last_rejection=wire.Rejection(6, "digest_mismatch", "detail é"),
        capabilities={"cores": 2, "runtimes": {"litert": {"version": "2.3.0"}}},
        ts=NOW,
    )
    got = protocol.decode_reported(wire.encode(rep), "dev-1")
    assert got.model_dump(mode="json") == json.loads(wire.encode(rep))
    assert got.ts == NOW and got.deployment_state == DS.PROBATION and got.running is not None
    ev = wire.Event(
        "dev-1", 7, DS.FAILED, reason="disk_full", detail="x", model_sha256=SHA, ts=NOW, event_id="p-1"
    )
    assert protocol.decode_event(wire.encode(ev)).model_dump() == {
        "device_id": "dev-1",
        "seq": 7,
        "state": DS.FAILED,
        "reason": "disk_full",
        "detail": "x",
        "model_sha256": SHA,
        "ts": NOW,
        "bytes_fetched": None,
        "event_id": "p-1",
    }
    fetched = wire.Event("dev-1", 7, DS.STAGED, reason="maintenance_window", ts=NOW, bytes_fetched=1234)
    assert protocol.decode_event(wire.encode(fetched)).bytes_fetched == 1234
    waits = wire.Reported(
        "dev-1",
        "0.1.0",
        "rpi4",
        deployment_state=DS.STAGED,
        timezone="Europe/Berlin",
        link={"class": "metered", "budget_bytes_per_day": 10, "used_bytes_today": 3},
        waiting=wire.Waiting(7, "maintenance_window", "staged", NOW),
        ts=NOW,
    )
    got = protocol.decode_reported(wire.encode(waits), "dev-1")
    assert got.model_dump(mode="json") == json.loads(wire.encode(waits))
    assert got.waiting is not None and got.waiting.until == NOW and got.timezone == "Europe/Berlin"
    st = protocol.decode_status(wire.encode(wire.Status("dev-1", "offline", ts=NOW)))
    assert st.state == "offline" and st.ts == NOW
    # byte-for-byte what the pydantic model would have sent
    assert wire.encode(ev) == protocol.Event.model_validate(ev.to_dict()).model_dump_json().encode()


def test_telemetry_batches_decode_with_the_schema() -> None:
    stats = wire.ModelStats(
        inferences=5,
        errors={"non_finite": 1},
        latency_buckets=[0, 5] + [0] * 39,
        latency_sum_us=51.5,
        class_hist={"3": 4},
        input_count=1,
        input_mean=[0.5, -1.0],
        input_m2=[0.0, 0.0],
        input_hist=[1, 2],
        output_hist=[3],
        labels=4,
        labels_correct=3,
        confusion={"3:3": 3, "1:3": 1},
        label_delay_buckets=[0, 2, 2] + [0] * (wire.LABEL_DELAY_BUCKETS - 3),
        label_abs_error_sum=0.0,
        requests=6,
        request_errors={"timeout": 1},
        input_checks={"x": [5, 1, 0, 2]},
        cpu_ms=1.25,
        captured=2,
        input_buckets={"x": [1, 0, 2, 0, 0, 0, 0, 0, 0, 0, 3, 4]},
    )
    shadow = wire.ShadowStats(samples=2, top1_agree=1, latency_buckets=[2] + [0] * 40, latency_sum_us=9.0)
    batch = wire.TelemetryBatch("dev-1", "b1", NOW, NOW + timedelta(seconds=10), {SHA: stats}, {SHA: shadow})
    batch = dataclasses.replace(batch, labels_unmatched={"unknown": 2, "expired": 1}, capture_evicted=4)
    got = protocol.decode_telemetry(wire.encode_telemetry(batch.with_dropped(3)), "dev-1")
    assert got.dropped_batches == 3 and got.window_end == NOW + timedelta(seconds=10)
    assert got.labels_unmatched == {"unknown": 2, "expired": 1} and got.capture_evicted == 4
    assert got.models[SHA].model_dump() == stats.to_dict()
    assert got.shadow[SHA].model_dump() == shadow.to_dict()


def test_the_agent_does_not_import_pydantic() -> None:
    code = "import device_agent.agent, device_agent.run, device_agent.local_api, device_agent.delivery"
    watched = ("pydantic", "device_agent.protocol", "onnxruntime", "ai_edge_litert", "httpx")
    assert imported_by(code, watched) == []


def test_latency_quantile_reads_bucket_bounds() -> None:
    bounds, n = wire.LATENCY_BOUNDS_US, wire.LATENCY_BUCKETS
    assert protocol.latency_quantile is wire.latency_quantile and n == len(bounds) + 1
    assert wire.latency_quantile([0] * n, 0.95) is None
    counts = [0] * n
    counts[3], counts[10] = 94, 6  # 94% fast, 6% slow: p95 lands in the slow bucket
    assert wire.latency_quantile(counts, 0.95) == bounds[10]
    assert wire.latency_quantile(counts, 0.5) == bounds[3]
    counts[-1] = 1000  # the overflow bucket counts as twice the largest bound
    assert wire.latency_quantile(counts, 0.95) == bounds[-1] * 2
    assert wire.latency_bucket(bounds[5]) == 5 and wire.latency_bucket(bounds[5] + 0.1) == 6
    assert wire.latency_bucket(1e12) == n - 1
