"""Events are stored as plain rows beside the snapshots and status of the same flush: in the order
they came, with the same fields, counted the same way, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from sqlalchemy import Engine
from sqlmodel import col, select

from device_agent import protocol
from fleet_server.counters import Counters
from fleet_server.ingest import Inbound, ingest_batch
from fleet_server.models import Device, EventRow, ModelAggregate
from fleet_server.store import new_session

from .test_mqtt import reported

SHA = "9e" * 32
TS = datetime(2026, 2, 1, 12, 0, tzinfo=UTC)


@pytest.fixture
def engine(store: Engine) -> Iterator[Engine]:
    with new_session(store) as session:
        session.add_all(Device(id=d, hardware_id="rpi4") for d in ("ev-1", "ev-2"))
        session.commit()
    yield store


def event(device: str, state: str, received: float, **over: object) -> Inbound:
    msg = protocol.Event(device_id=device, seq=2, state=protocol.DeploymentState(state), ts=TS, **over)  # type: ignore[arg-type]
    return Inbound(protocol.topic(device, protocol.Channel.EVENTS), protocol.encode(msg), received)


def snapshot(device: str, state: str, served: int, received: float) -> Inbound:
    running = protocol.RunningModel(name="det", version="2", sha256=SHA)
    payload = reported(
        device, deployment_seq=2, deployment_state=state, running=running, served_ok={SHA: served}, ts=TS
    )
    return Inbound(protocol.topic(device, protocol.Channel.REPORTED), payload, received)


def status(device: str, state: str, received: float) -> Inbound:
    payload = protocol.encode(protocol.Status(device_id=device, state=state, ts=TS))  # type: ignore[arg-type]
    return Inbound(protocol.topic(device, protocol.Channel.STATUS), payload, received)


def test_events_keep_their_order_and_fields_beside_snapshots_and_status_of_one_flush(engine: Engine) -> None:
    t = time.time()
    counters = Counters()
    observed = ingest_batch(
        engine,
        [
            event("ev-1", "downloading", t),
            snapshot("ev-1", "downloading", 3, t + 1),
            snapshot("ev-2", "serving", 4, t + 2),
            event("ev-2", "serving", t + 3),
            event("ev-1", "verifying", t + 4, detail="x" * 3000, bytes_fetched=1234, model_sha256=SHA),
            status("ev-1", "offline", t + 5),
            snapshot("ev-1", "serving", 9, t + 6),  # the last snapshot of ev-1 wins, and brings it online
            status("ev-2", "offline", t + 7),  # after ev-2's snapshot: offline
            event("ev-1", "serving", t + 8, reason="ok"),
        ],
        counters,
    )
    assert [(o.device_id, o.reported.state) for o in observed] == [
        ("ev-1", "downloading"),
        ("ev-2", "serving"),
        ("ev-1", "serving"),
    ]
    got = counters.snapshot()
    assert (got["events"], got["reported"], got["status"], got["unregistered_messages"]) == (4, 3, 2, 0)
    with new_session(engine) as session:
        rows = session.exec(select(EventRow).order_by(col(EventRow.id))).all()
        assert [(r.device_id, r.state) for r in rows] == [
            ("ev-1", "downloading"),
            ("ev-2", "serving"),
            ("ev-1", "verifying"),
            ("ev-1", "serving"),
        ]
        verifying = rows[2]
        assert verifying.detail == "x" * 2000 and verifying.bytes_fetched == 1234
        assert verifying.model_sha256 == SHA and verifying.seq == 2 and verifying.reason is None
        assert verifying.ts == TS
        assert abs(verifying.received_at.timestamp() - (t + 4)) < 0.001  # the server's receive time
        assert rows[3].reason == "ok" and rows[0].detail is None and rows[0].bytes_fetched is None
        one, two = session.get(Device, "ev-1"), session.get(Device, "ev-2")
        assert one is not None and two is not None
        assert (one.deployment_state, one.online, one.running_sha256) == ("serving", True, SHA)
        assert one.reported is not None and one.reported["deployment_state"] == "serving"
        assert (two.deployment_state, two.online) == ("serving", False)
        assert one.last_seen is not None and two.last_seen is not None
        assert one.clock_offset_at is not None and abs(one.clock_offset_at.timestamp() - (t + 6)) < 0.001
        served = {a.device_id: a.served_ok for a in session.exec(select(ModelAggregate)).all()}
        assert served == {"ev-1": 9, "ev-2": 4}


def test_a_snapshot_raises_an_existing_aggregate_and_never_lowers_it(engine: Engine) -> None:
    t = time.time()
    ingest_batch(engine, [snapshot("ev-1", "serving", 50, t)], Counters())
    ingest_batch(
        engine, [snapshot("ev-1", "serving", 20, t + 1), snapshot("ev-2", "serving", 7, t + 1)], Counters()
    )
    ingest_batch(engine, [snapshot("ev-1", "serving", 60, t + 2)], Counters())
    with new_session(engine) as session:
        served = {a.device_id: a.served_ok for a in session.exec(select(ModelAggregate)).all()}
    assert served == {"ev-1": 60, "ev-2": 7}


def test_messages_of_an_unregistered_device_are_counted_and_dropped_beside_registered_ones(
    engine: Engine,
) -> None:
    t = time.time()
    counters = Counters()
    ingest_batch(
        engine,
        [
            event("stranger-1", "downloading", t),
            event("ev-1", "downloading", t),
            snapshot("stranger-1", "downloading", 1, t),
            status("stranger-1", "online", t),
            event("stranger-1", "serving", t),
        ],
        counters,
    )
    got = counters.snapshot()
    assert (got["unregistered_messages"], got["events"], got["reported"], got["status"]) == (4, 1, 0, 0)
    with new_session(engine) as session:
        assert [r.device_id for r in session.exec(select(EventRow)).all()] == ["ev-1"]
        assert session.get(Device, "stranger-1") is None
        assert session.exec(select(ModelAggregate)).all() == []


def test_a_flush_refused_for_one_events_data_is_stored_one_by_one(engine: Engine) -> None:
    """PostgreSQL refuses a NUL character in text: the flush fails for that one event, and every
    other message of the flush is stored on the one-by-one retry."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite stores a NUL character")
    t = time.time()
    bad = json.loads(event("ev-1", "failed", t).payload)
    bad["reason"] = "nul\u0000"
    counters = Counters()
    ingest_batch(
        engine,
        [
            event("ev-1", "downloading", t),
            Inbound(protocol.topic("ev-1", protocol.Channel.EVENTS), json.dumps(bad).encode(), t),
            snapshot("ev-2", "serving", 4, t),
            event("ev-2", "serving", t),
        ],
        counters,
    )
    got = counters.snapshot()
    assert (got["dropped_messages"], got["events"], got["reported"]) == (1, 2, 1)
    with new_session(engine) as session:
        rows = session.exec(select(EventRow).order_by(col(EventRow.id))).all()
        assert [(r.device_id, r.state) for r in rows] == [("ev-1", "downloading"), ("ev-2", "serving")]


def test_an_event_sent_again_is_stored_once_and_events_without_an_id_all_are(engine: Engine) -> None:
    """An agent resends the events the broker may not have taken: the same (device, event id) is
    one row, within one flush and across flushes; the same id on another device is another event;
    events from agents that send no id are all kept."""
    t = time.time()
    counters = Counters()
    ingest_batch(
        engine,
        [
            event("ev-1", "downloading", t, event_id="a1-1"),
            event("ev-1", "downloading", t + 1, event_id="a1-1"),  # resent in the same flush
            event("ev-2", "downloading", t + 1, event_id="a1-1"),  # another device's own id
            event("ev-1", "serving", t + 2),
            event("ev-1", "serving", t + 3),  # no id: an older agent's, kept as sent
        ],
        counters,
    )
    ingest_batch(engine, [event("ev-1", "downloading", t + 4, event_id="a1-1")], counters)  # later
    ingest_batch(engine, [event("ev-1", "verifying", t + 5, event_id="a1-2")], counters)
    assert counters.snapshot()["events"] == 7  # received; stored once each below
    with new_session(engine) as session:
        rows = session.exec(select(EventRow).order_by(col(EventRow.id))).all()
        assert [(r.device_id, r.state, r.event_id) for r in rows] == [
            ("ev-1", "downloading", "a1-1"),
            ("ev-2", "downloading", "a1-1"),
            ("ev-1", "serving", None),
            ("ev-1", "serving", None),
            ("ev-1", "verifying", "a1-2"),
        ]
        assert abs(rows[0].received_at.timestamp() - t) < 0.001  # the first copy is the one kept


@pytest.mark.parametrize("bad_id", ["", "x" * 65, 42])
def test_an_unusable_event_id_loses_the_id_not_the_event(engine: Engine, bad_id: object) -> None:
    payload = json.loads(event("ev-1", "failed", 0).payload)
    payload["event_id"] = bad_id
    counters = Counters()
    topic = protocol.topic("ev-1", protocol.Channel.EVENTS)
    ingest_batch(engine, [Inbound(topic, json.dumps(payload).encode(), time.time())], counters)
    assert (counters.snapshot()["events"], counters.snapshot()["malformed_messages"]) == (1, 0)
    with new_session(engine) as session:
        assert [(r.state, r.event_id) for r in session.exec(select(EventRow)).all()] == [("failed", None)]
