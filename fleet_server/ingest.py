"""Store what devices send (reported, events, telemetry, status), one batch per transaction.

Called by the MQTT bridge's ingest worker, never by the paho network thread, so a
slow database cannot stall MQTT keepalives. Anything malformed or from an
unregistered device is counted and dropped: one bad device must not stop ingest.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from device_agent import protocol
from fleet_server.counters import Counters
from fleet_server.models import Device, EventRow, ModelAggregate, utcnow
from fleet_server.store import new_session
from fleet_server.telemetry_store import SHA256_RE, store_telemetry

log = logging.getLogger(__name__)

MAX_BATCH_ID = 128

Decoded = protocol.Reported | protocol.Event | protocol.TelemetryBatch | protocol.Status


@dataclass(frozen=True)
class Inbound:
    topic: str
    payload: bytes


def decode(msg: Inbound) -> tuple[str, protocol.Channel, Decoded] | None:
    """Decode one message; None for an empty payload (a cleared retained topic)."""
    device_id, channel = protocol.parse_topic(msg.topic)
    if not msg.payload:
        return None
    decoded: Decoded
    if channel is protocol.Channel.REPORTED:
        decoded = protocol.decode_reported(msg.payload, device_id)
    elif channel is protocol.Channel.EVENTS:
        decoded = protocol.decode_event(msg.payload, device_id)
    elif channel is protocol.Channel.TELEMETRY:
        decoded = protocol.decode_telemetry(msg.payload, device_id)
        if not 0 < len(decoded.batch_id) <= MAX_BATCH_ID:
            raise protocol.ProtocolError(f"telemetry batch_id must be 1..{MAX_BATCH_ID} characters")
    elif channel is protocol.Channel.STATUS:
        decoded = protocol.decode_status(msg.payload, device_id)
    else:
        raise protocol.ProtocolError(f"devices do not publish on {channel.value}")
    return device_id, channel, decoded


def ingest_batch(engine: Engine, messages: Sequence[Inbound], counters: Counters) -> None:
    """Decode and store a batch in one transaction; on a database error retry one by one."""
    items: list[tuple[str, Decoded]] = []
    for msg in messages:
        try:
            got = decode(msg)
        except protocol.ProtocolError as exc:
            counters.add("malformed_messages")
            log.warning("malformed message on %s: %s", msg.topic, str(exc)[:300])
            continue
        if got is not None:
            items.append((got[0], got[2]))
    if not items:
        return
    try:
        _store(engine, items, counters)
    except SQLAlchemyError:
        log.exception("batch of %d messages failed; storing one by one", len(items))
        for item in items:
            try:
                _store(engine, [item], counters)
            except SQLAlchemyError:
                log.exception("dropping a message from %s", item[0])


def _store(engine: Engine, items: Sequence[tuple[str, Decoded]], counters: Counters) -> None:
    """Snapshots and events one by one (few); telemetry set-based (telemetry_store.py)."""
    pending = Counters()
    now = utcnow()
    with new_session(engine) as session:
        ids = sorted({device_id for device_id, _ in items})
        devices = {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(ids))).all()}
        telemetry: list[protocol.TelemetryBatch] = []
        for device_id, msg in items:
            device = devices.get(device_id)
            if device is None:
                pending.add("unregistered_messages")
                continue
            device.last_seen = now
            if isinstance(msg, protocol.Reported):
                _apply_reported(session, device, msg, now)
                pending.add("reported")
            elif isinstance(msg, protocol.Event):
                session.add(_event_row(msg, now))
                pending.add("events")
            elif isinstance(msg, protocol.TelemetryBatch):
                telemetry.append(msg)
            else:
                device.online = msg.state == "online"
                pending.add("status")
            session.add(device)
        session.flush()
        stored = store_telemetry(session, telemetry, now)
        pending.add("telemetry_batches", stored)
        pending.add("duplicate_batches", len(telemetry) - stored)
        session.commit()
    for name, value in pending.snapshot().items():
        if value:
            counters.add(name, value)


def _apply_reported(session: Session, device: Device, msg: protocol.Reported, now: datetime) -> None:
    device.reported = msg.model_dump(mode="json")
    device.online = True
    device.agent_version = msg.agent_version
    device.deployment_state = msg.deployment_state.value
    device.deployment_seq = msg.deployment_seq
    running = msg.running
    device.running_sha256 = running.sha256 if running else None
    device.running_name = running.name if running else None
    device.running_version = running.version if running else None
    for sha, served in msg.served_ok.items():
        if not SHA256_RE.match(sha):
            continue
        agg = _aggregate(session, device.id, sha)
        agg.served_ok = max(agg.served_ok, served)
        agg.updated_at = now
        session.add(agg)


def _event_row(msg: protocol.Event, now: datetime) -> EventRow:
    return EventRow(
        device_id=msg.device_id,
        seq=msg.seq,
        state=msg.state.value,
        reason=msg.reason,
        detail=(msg.detail or None) and msg.detail[:2000],
        model_sha256=msg.model_sha256,
        ts=msg.ts,
        received_at=now,
    )


def _aggregate(session: Session, device_id: str, sha: str) -> ModelAggregate:
    """The aggregate row, created once per transaction (pending rows are cached in ``session.info``)."""
    cache: dict[tuple[str, str], ModelAggregate] = session.info.setdefault("aggregates", {})
    key = (device_id, sha)
    agg = cache.get(key) or session.get(ModelAggregate, key)
    if agg is None:
        agg = ModelAggregate(device_id=device_id, sha256=sha)
        session.add(agg)
    cache[key] = agg
    return agg
