"""Store what devices send (reported, events, telemetry, status), one flush per transaction.

Called by an ingest pipeline's store thread (``fleet_server/ingest_worker.py``),
never by a paho network thread, so a slow database cannot stall MQTT keepalives.
Anything malformed or from an unregistered device is counted and dropped (and
acknowledged): one bad device must not stop ingest. A database that is
unreachable or busy (``OperationalError``/``InterfaceError``) is different: the
error propagates, the pipeline retries the same flush and acknowledges nothing
meanwhile, so the broker keeps (and, after a crash, redelivers) those messages.

Time: every decision-relevant timestamp written here (``last_seen``, event and
batch ``received_at``) is the server's. Device timestamps are stored as sent
(``EventRow.ts``, batch windows) and only used to record each device's clock
offset (device ``ts`` minus server receive time) from live reported/online
status messages.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import Connection, Engine, Table, event, func, or_, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import InterfaceError, OperationalError, SQLAlchemyError
from sqlmodel import Session, col, select

from device_agent import protocol
from fleet_server import reconcile
from fleet_server.counters import Counters
from fleet_server.models import Device, EventRow, ModelAggregate, utcnow
from fleet_server.store import new_session
from fleet_server.telemetry_store import SHA256_RE, prepare, store_prepared

log = logging.getLogger(__name__)

MAX_BATCH_ID = 128
TRANSIENT_ERRORS = (OperationalError, InterfaceError)  # retry the flush; anything else: bad data
LAST_SEEN_RESOLUTION = timedelta(seconds=1)

Decoded = protocol.Reported | protocol.Event | protocol.TelemetryBatch | protocol.Status


@dataclass(frozen=True, slots=True)
class Inbound:
    """One MQTT message as received: ``received_at`` is the server's clock (epoch seconds) when paho
    delivered it; ``mid``/``qos`` acknowledge it once stored; ``retain`` marks a retained snapshot
    delivered on subscribing (possibly old: no clock offset is measured from those)."""

    topic: str
    payload: bytes
    received_at: float = 0.0
    retain: bool = False
    mid: int = 0
    qos: int = 0


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
        if decoded.window_start.tzinfo is None or decoded.window_end.tzinfo is None:
            raise protocol.ProtocolError("telemetry window times need a UTC offset")
    elif channel is protocol.Channel.STATUS:
        decoded = protocol.decode_status(msg.payload, device_id)
    else:
        raise protocol.ProtocolError(f"devices do not publish on {channel.value}")
    return device_id, channel, decoded


Item = tuple[str, Decoded, Inbound]


def ingest_batch(
    engine: Engine, messages: Sequence[Inbound], counters: Counters
) -> list[reconcile.Observation]:
    """Decode and store a flush in one transaction; on a data error retry one by one.

    Returns the live reported snapshots stored, each with the seq last published to its device,
    for the reconciler (retained ones, delivered on subscribing, may be old: not judged).
    Raises the ``TRANSIENT_ERRORS`` (database down or locked): nothing of the flush is
    committed then, and the caller must retry it before acknowledging any of it."""
    items: list[Item] = []
    for msg in messages:
        try:
            got = decode(msg)
        except protocol.ProtocolError as exc:
            counters.add("malformed_messages")
            log.warning("malformed message on %s: %s", msg.topic, str(exc)[:300])
            continue
        if got is not None:
            items.append((got[0], got[2], msg))
    if not items:
        return []
    try:
        return _store(engine, items, counters)
    except TRANSIENT_ERRORS:
        raise
    except SQLAlchemyError:
        log.exception("flush of %d messages failed; storing one by one", len(items))
    observed: list[reconcile.Observation] = []
    for item in items:
        try:
            observed += _store(engine, [item], counters)
        except TRANSIENT_ERRORS:
            raise
        except SQLAlchemyError:
            counters.add("dropped_messages")
            log.exception("dropping a message from %s", item[0])
    return observed


def _store(engine: Engine, items: Sequence[Item], counters: Counters) -> list[reconcile.Observation]:
    """Events and telemetry set-based; only the devices whose row a message changes through the ORM.

    Events are the most numerous messages of a rollout and never change the device row: they are
    inserted as plain rows in one statement, in the order they came (the ticker reads a device's
    events by ``id``). Reported snapshots and status change the row, so only their senders are
    loaded as ``Device`` objects, and applied in order (the last one of a device wins)."""
    pending = Counters()
    observed: list[reconcile.Observation] = []
    telemetry = [msg for _, msg, _ in items if isinstance(msg, protocol.TelemetryBatch)]
    prepared = prepare(engine.dialect.name, telemetry) if telemetry else None  # before the transaction
    with _sqlite_writer(engine), new_session(engine) as session:
        now = utcnow()
        ids = sorted({device_id for device_id, _, _ in items})
        conn = session.connection()
        # The first statement writes: it marks the registered senders seen (to the second: rows
        # seen less than LAST_SEEN_RESOLUTION ago are left alone, so concurrent workers rarely
        # wait on each other's device row locks), and on SQLite it takes the (single) write lock
        # for the whole transaction, whether or not it changes a row.
        conn.execute(
            update(Device)
            .where(col(Device.id).in_(ids))
            .where(or_(col(Device.last_seen).is_(None), col(Device.last_seen) < now - LAST_SEEN_RESOLUTION))
            .values(last_seen=now)
        )
        query = select(col(Device.id), col(Device.hardware_id)).where(col(Device.id).in_(ids))
        hardware: dict[str, str] = {device_id: hw for device_id, hw in conn.execute(query)}
        changing = sorted({d for d, msg, _ in items if isinstance(msg, _CHANGES_DEVICE) and d in hardware})
        devices: dict[str, Device] = {}
        if changing:
            devices = {
                d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(changing))).all()
            }
        events: list[dict[str, object]] = []
        served: dict[tuple[str, str], int] = {}
        registered_telemetry = 0
        for device_id, msg, inbound in items:
            if device_id not in hardware:
                pending.add("unregistered_messages")
                continue
            if isinstance(msg, protocol.TelemetryBatch):
                registered_telemetry += 1
                continue
            received = datetime.fromtimestamp(inbound.received_at, UTC) if inbound.received_at else now
            if isinstance(msg, protocol.Event):
                events.append(_event_values(msg, received))
                continue
            device = devices.get(device_id)
            if device is None:  # deleted between the two reads
                pending.add("unregistered_messages")
                continue
            if isinstance(msg, protocol.Reported):
                _apply_reported(device, msg, served)
                _clock_offset(device, msg.ts, received, inbound)
                pending.add("reported")
                if not inbound.retain:
                    observed.append(reconcile.Observation(device_id, device.desired_seq, _reported_view(msg)))
            else:
                device.online = msg.state == "online"
                if device.online:
                    _clock_offset(device, msg.ts, received, inbound)
                pending.add("status")
        if events:
            _insert_events(conn, events)
            pending.add("events", len(events))
        session.flush()  # the device rows before the aggregates: the lock order of every writer
        if served:
            _raise_served(session, served, now)
        stored = store_prepared(session, prepared, now, hardware) if prepared is not None else 0
        pending.add("telemetry_batches", stored)
        pending.add("duplicate_batches", registered_telemetry - stored)
        session.commit()
    for name, value in pending.snapshot().items():
        if value:
            counters.add(name, value)
    return observed


_CHANGES_DEVICE = (protocol.Reported, protocol.Status)
_EVENTS: Table = EventRow.__table__  # type: ignore[attr-defined]


_writer_locks: weakref.WeakKeyDictionary[Engine, int] = weakref.WeakKeyDictionary()
_writer_locks_guard = threading.Lock()


def _writer_lock(engine: Engine, path: str) -> int:
    """The engine's lock file descriptor, opened once; closed when the engine is disposed (opened again
    if it is used after that) or garbage collected, so stopped servers do not keep it."""
    with _writer_locks_guard:
        fd = _writer_locks.get(engine)
        if fd is None:
            fd = _writer_locks[engine] = os.open(f"{path}.ingest-lock", os.O_RDWR | os.O_CREAT, 0o600)
            closer = weakref.finalize(engine, os.close, fd)
            event.listen(engine, "engine_disposed", lambda e: _close_writer_lock(e, closer), once=True)
        return fd


def _close_writer_lock(engine: Engine, closer: Callable[[], object]) -> None:
    with _writer_locks_guard:
        _writer_locks.pop(engine, None)
        closer()


@contextlib.contextmanager
def _sqlite_writer(engine: Engine) -> Iterator[None]:
    """SQLite has one writer: the ingest processes of a server queue for it on an ``flock``, which
    hands over as soon as it is released, instead of SQLite's busy handler, which polls with sleeps
    of up to 100 ms. (Other writers, the API and the ticker, still meet the busy timeout.)"""
    path = engine.url.database if engine.dialect.name == "sqlite" else None
    if not path or path == ":memory:":
        yield
        return
    fd = _writer_lock(engine, path)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _clock_offset(device: Device, device_ts: datetime, received: datetime, inbound: Inbound) -> None:
    """Record device clock minus server receive time, from live messages only: a retained snapshot
    (delivered on subscribing) may be hours old, and a broker-sent will carries its connect time."""
    if inbound.retain or not inbound.received_at:
        return
    ts = device_ts if device_ts.tzinfo is not None else device_ts.replace(tzinfo=UTC)
    device.clock_offset_seconds = round((ts - received).total_seconds(), 3)
    device.clock_offset_at = received


def _apply_reported(device: Device, msg: protocol.Reported, served: dict[tuple[str, str], int]) -> None:
    device.reported = msg.model_dump(mode="json")
    device.online = True
    device.agent_version = msg.agent_version
    device.deployment_state = msg.deployment_state.value
    device.deployment_seq = msg.deployment_seq
    running = msg.running
    device.running_sha256 = running.sha256 if running else None
    device.running_name = running.name if running else None
    device.running_version = running.version if running else None
    for sha, count in msg.served_ok.items():
        if SHA256_RE.match(sha):
            key = (device.id, sha)
            served[key] = max(served.get(key, 0), count)


def _reported_view(msg: protocol.Reported) -> reconcile.Reported:
    return reconcile.Reported(
        seq=msg.deployment_seq,
        state=msg.deployment_state.value,
        running_sha256=msg.running.sha256 if msg.running else None,
        rejected_seq=msg.last_rejection.seq if msg.last_rejection else None,
        waiting_seq=msg.waiting.seq if msg.waiting else None,
    )


def _insert_events(conn: Connection, events: Sequence[dict[str, object]]) -> None:
    """Store ``events`` in order, each (device, event id) once: an agent resends what it is not
    sure the broker took. (How many were copies is not counted: PostgreSQL's driver reports no
    row count for a batched insert, and asking it to return the new rows cost half again the
    CPU of storing a rollout's events.)"""
    pg = conn.dialect.name == "postgresql"
    stmt = (postgresql.insert(_EVENTS) if pg else sqlite.insert(_EVENTS)).on_conflict_do_nothing(
        index_elements=["device_id", "event_id"]
    )
    conn.execute(stmt, list(events))


def _event_values(msg: protocol.Event, received: datetime) -> dict[str, object]:
    return {
        "device_id": msg.device_id,
        "seq": msg.seq,
        "state": msg.state.value,
        "reason": msg.reason,
        "detail": (msg.detail or None) and msg.detail[:2000],
        "model_sha256": msg.model_sha256,
        "ts": msg.ts,
        "received_at": received,
        "bytes_fetched": msg.bytes_fetched,
        "event_id": msg.event_id,
    }


def _raise_served(session: Session, served: Mapping[tuple[str, str], int], now: datetime) -> None:
    """``served_ok`` of each (device, model) raised to the highest count the flush's snapshots
    reported, never lowered (an older snapshot, retained or redelivered, may come after a newer
    one), the rows created where missing: one statement, in key order (the order telemetry workers
    lock them in)."""
    table: Table = ModelAggregate.__table__  # type: ignore[attr-defined]
    pg = session.get_bind().dialect.name == "postgresql"
    stmt = postgresql.insert(table) if pg else sqlite.insert(table)
    higher = (func.greatest if pg else func.max)(table.c.served_ok, stmt.excluded.served_ok)
    session.connection().execute(
        stmt.on_conflict_do_update(
            index_elements=["device_id", "sha256"],
            set_={"served_ok": higher, "updated_at": stmt.excluded.updated_at},
        ),
        [
            {"device_id": d, "sha256": sha, "served_ok": n, "updated_at": now}
            for (d, sha), n in sorted(served.items())
        ],
    )
