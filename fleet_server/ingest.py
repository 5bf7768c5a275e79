"""Store what devices send (reported, events, telemetry, status), one batch per transaction.

Called by the MQTT bridge's ingest worker, never by the paho network thread, so a
slow database cannot stall MQTT keepalives. Anything malformed or from an
unregistered device is counted and dropped: one bad device must not stop ingest.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, select

from device_agent import protocol
from fleet_server.counters import Counters
from fleet_server.models import Device, EventRow, ModelAggregate, TelemetryBatchRow, utcnow
from fleet_server.store import new_session

log = logging.getLogger(__name__)

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
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
    pending = Counters()
    with new_session(engine) as session:
        seen_batches: set[tuple[str, str]] = set()
        for device_id, msg in items:
            device = session.get(Device, device_id)
            if device is None:
                pending.add("unregistered_messages")
                continue
            now = utcnow()
            device.last_seen = now
            if isinstance(msg, protocol.Reported):
                _apply_reported(session, device, msg, now)
                pending.add("reported")
            elif isinstance(msg, protocol.Event):
                session.add(_event_row(msg, now))
                pending.add("events")
            elif isinstance(msg, protocol.TelemetryBatch):
                key = (device_id, msg.batch_id)
                if key in seen_batches or _batch_exists(session, key):
                    pending.add("duplicate_batches")
                    continue
                seen_batches.add(key)
                _apply_telemetry(session, msg, now)
                pending.add("telemetry_batches")
            else:
                device.online = msg.state == "online"
                pending.add("status")
            session.add(device)
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


def _batch_exists(session: Session, key: tuple[str, str]) -> bool:
    stmt = select(TelemetryBatchRow.id).where(
        TelemetryBatchRow.device_id == key[0], TelemetryBatchRow.batch_id == key[1]
    )
    return session.exec(stmt).first() is not None


def _apply_telemetry(session: Session, msg: protocol.TelemetryBatch, now: datetime) -> None:
    total_inf = total_err = 0
    for sha, stats in msg.models.items():
        if not SHA256_RE.match(sha):
            continue
        errors = sum(stats.errors.values())
        total_inf += stats.inferences
        total_err += errors
        agg = _aggregate(session, msg.device_id, sha)
        agg.inferences += stats.inferences
        agg.errors += errors
        agg.updated_at = now
        session.add(agg)
    session.add(
        TelemetryBatchRow(
            device_id=msg.device_id,
            batch_id=msg.batch_id,
            window_start=msg.window_start,
            window_end=msg.window_end,
            inferences=total_inf,
            errors=total_err,
            models={sha: s.model_dump(mode="json") for sha, s in msg.models.items()},
            received_at=now,
        )
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
