"""Store a flush of telemetry batches in a few set-based statements (the ingest hot path).

Done per message, a device lookup, a duplicate lookup and a read-modify-write
of the aggregate, each behind an ORM autoflush, came to about 100 batches/s.
So for the N batches of one flush:

0. ``prepare``, before the transaction opens: dedupe within the flush, each
   batch's row (SQLite: a tuple with its times already in SQLAlchemy's text
   format; PostgreSQL: a JSON record, the validated batch as pydantic writes
   it), and the figures summed per (device, model hash), histograms column by
   column (``zip_longest`` in C), assuming every batch is new;
1. ``store_prepared``, in the transaction: the dedupe. Every batch gets a row
   keyed unique on (device_id, batch_id), so a redelivered batch counts once.
   PostgreSQL: one ``INSERT ... SELECT FROM json_to_recordset(:rows) ON
   CONFLICT DO NOTHING RETURNING`` (a fixed statement whatever the flush
   size, prepared once by psycopg; no per-row SQL and no per-element array
   escaping); SQLite: the keys already present read with one query under the
   write lock the caller's first UPDATE took, then one raw ``executemany``;
2. the aggregate rows created if missing, then read ``FOR UPDATE`` in key
   order (PostgreSQL: two workers or replicas adding to the same device's
   aggregate serialise instead of losing an update), and written back in one
   statement: one row per (device, model) per flush, however many batches.
   The sums of step 0 are used as they are when every batch was new and from
   a registered device (the common case), recomputed otherwise;
3. only for the few devices whose batches counted something for the device
   as a whole (labels that matched no prediction, evicted captures, batches
   dropped offline): their ``DeviceTotals`` row, the same way, after the
   aggregates (one lock order for every worker: no deadlock);
4. the flush's sums per model and hardware cohort added to the rows of the current minute
   (``fleet_server.telemetry_minutes``, what the console's charts read), last: those few rows
   are shared by every worker, so they stay locked the shortest time.

What a device counts is trusted only within bounds: negative counts are
zero, a correct-label count above the label count is cut to it, non-finite
sums are ignored, and named counts (classes, confusion cells, error kinds,
inputs) are cut in number and name length, per batch and per aggregate.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice, zip_longest
from typing import Any

from pydantic import TypeAdapter
from sqlalchemy import bindparam, select, text, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlmodel import Session, col

from device_agent import protocol
from fleet_server.gates import add_counts
from fleet_server.models import Device, DeviceTotals, ModelAggregate
from fleet_server.outcomes import add_outcomes
from fleet_server.telemetry_minutes import MAX_BINS, add_minutes

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
MAX_CLASSES = 1000
MAX_NAME = 64  # a class, error kind or input name; longer ones are cut
# confusion cells "true:predicted": the device keeps MAX_LABEL_CLASSES classes and OTHER_CLASS
MAX_CONFUSION = (protocol.MAX_LABEL_CLASSES + 1) ** 2
CONFUSION_OVERFLOW = f"{protocol.OTHER_CLASS}:{protocol.OTHER_CLASS}"
MAX_KINDS = 32  # request error kinds, unmatched-label reasons
MAX_INPUTS = 64  # inputs with feature checks
_INF = math.inf  # a device's sums (CPU time, absolute error) are added when 0 < sum < inf
_MODELS_JSON = TypeAdapter(dict[str, protocol.ModelStats])

# PostgreSQL statements with a fixed text whatever the flush size (prepared once by psycopg),
# the rows passed as one JSON document: no per-row SQL, no per-element array escaping.
_PG_INSERT_BATCHES = text(
    "INSERT INTO telemetrybatchrow"
    " (device_id, batch_id, window_start, window_end, inferences, errors, models, received_at)"
    " SELECT r.device_id, r.batch_id, r.window_start, r.window_end, r.i, r.e, r.models, :now"
    " FROM json_to_recordset(CAST(:rows AS json)) AS r(i bigint, e bigint, device_id varchar,"
    " batch_id varchar, window_start timestamptz, window_end timestamptz, models json)"
    " ON CONFLICT (device_id, batch_id) DO NOTHING RETURNING device_id, batch_id"
)
_PG_KEYS = "SELECT * FROM unnest(CAST(:d AS varchar[]), CAST(:s AS varchar[]))"
_PG_CREATE_AGGREGATES = text(
    "INSERT INTO modelaggregate (device_id, sha256, served_ok, inferences, errors, latency_buckets,"
    " output_hist, class_hist, shadow_samples, shadow_agree, labels, labels_correct, confusion,"
    " label_delay_buckets, label_abs_error_sum, requests, request_errors, input_checks, cpu_ms, captured,"
    " input_buckets, updated_at)"
    " SELECT k.d, k.s, 0, 0, 0, '[]', '[]', '{}', 0, 0,"
    " 0, 0, '{}', '[]', 0, 0, '{}', '{}', 0, 0, '{}', :now"
    f" FROM ({_PG_KEYS}) AS k(d, s) ON CONFLICT (device_id, sha256) DO NOTHING"
)
# one record per aggregate: the column values after the flush (``_sum``), keyed by ``_PG_FIELDS``
_PG_FIELDS = {
    "inferences": ("i", "bigint"),
    "errors": ("e", "bigint"),
    "latency_buckets": ("l", "json"),
    "output_hist": ("o", "json"),
    "class_hist": ("c", "json"),
    "shadow_samples": ("ss", "bigint"),
    "shadow_agree": ("sa", "bigint"),
    "labels": ("lb", "bigint"),
    "labels_correct": ("lc", "bigint"),
    "confusion": ("cf", "json"),
    "label_delay_buckets": ("ld", "json"),
    "label_abs_error_sum": ("la", "double precision"),
    "requests": ("rq", "bigint"),
    "request_errors": ("re", "json"),
    "input_checks": ("ic", "json"),
    "cpu_ms": ("cpu", "double precision"),
    "captured": ("cap", "bigint"),
    "input_buckets": ("ib", "json"),
}
_PG_UPDATE_AGGREGATES = text(
    "UPDATE modelaggregate AS a SET "
    + ", ".join(f"{column} = r.{key}" for column, (key, _) in _PG_FIELDS.items())
    + ", updated_at = :now FROM json_to_recordset(CAST(:rows AS json)) AS r(d varchar, s varchar, "
    + ", ".join(f"{key} {kind}" for key, kind in _PG_FIELDS.values())
    + ") WHERE a.device_id = r.d AND a.sha256 = r.s"
)
_AGGREGATE_COLUMNS = ", ".join(_PG_FIELDS)
_JSON_COLUMNS = tuple(column for column, (_, kind) in _PG_FIELDS.items() if kind == "json")


def counts(values: Sequence[int]) -> list[int]:
    """A device's histogram as the gates may trust it: at most MAX_BINS bins, no negative counts."""
    cut = list(values[:MAX_BINS])
    return cut if not cut or min(cut) >= 0 else [max(int(v), 0) for v in cut]


def _add_named(
    into: dict[str, int], counted: dict[str, int], limit: int, name_length: int = MAX_NAME
) -> None:
    """Add a device's named counts: at most ``limit`` names, each cut to ``name_length``, no negatives."""
    for name, n in counted.items() if len(counted) <= limit else islice(counted.items(), limit):
        if len(name) > name_length:
            name = name[:name_length]
        into[name] = into.get(name, 0) + (n if n > 0 else 0)


def _merged(
    current: dict[str, int] | None, delta: dict[str, int], limit: int, overflow: str
) -> dict[str, int]:
    """``current`` plus ``delta``, at most ``limit`` names: further new names count under ``overflow``."""
    out = dict(current or {})
    for name, n in delta.items():
        if name not in out and len(out) >= limit:
            name = overflow
        out[name] = out.get(name, 0) + n
    return out


@dataclass
class _Delta:
    inferences: int = 0
    errors: int = 0
    latency: list[list[int]] = field(default_factory=list)
    output: list[list[int]] = field(default_factory=list)
    classes: dict[str, int] = field(default_factory=dict)
    shadow_samples: int = 0
    shadow_agree: int = 0
    labels: int = 0
    labels_correct: int = 0
    confusion: dict[str, int] = field(default_factory=dict)
    label_delay: list[list[int]] = field(default_factory=list)
    label_abs_error: float = 0.0
    requests: int = 0
    request_errors: dict[str, int] = field(default_factory=dict)
    input_checks: dict[str, list[list[int]]] = field(default_factory=dict)  # per input: the batches' rows
    cpu_ms: float = 0.0
    captured: int = 0
    in_models: bool = False  # a batch listed the model (not only its shadow figures)
    input_buckets: dict[str, list[list[int]]] = field(default_factory=dict)  # likewise


@dataclass
class _DeviceDelta:
    labels_unmatched: dict[str, int] = field(default_factory=dict)
    capture_evicted: int = 0
    dropped_batches: int = 0


Deltas = tuple[dict[tuple[str, str], _Delta], dict[str, _DeviceDelta]]


def _insert(session: Session, table: Any) -> postgresql.Insert | sqlite.Insert:
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise RuntimeError(f"unsupported database {dialect}")


@dataclass
class Prepared:
    """A flush's telemetry made ready before its transaction opens (decoded, deduped within the flush,
    rows and per-(device, model) sums computed), so the transaction, which on SQLite holds the one
    write lock and on PostgreSQL the aggregate row locks, only runs the statements."""

    dialect: str
    batches: dict[tuple[str, str], protocol.TelemetryBatch]
    rows: dict[tuple[str, str], Any]  # per batch: the SQLite row tuple or the PostgreSQL JSON record
    deltas: Deltas  # summed over every batch, assuming all are new: per (device, model), per device


def prepare(dialect: str, batches: Sequence[protocol.TelemetryBatch]) -> Prepared:
    unique: dict[tuple[str, str], protocol.TelemetryBatch] = {}
    for b in batches:
        unique.setdefault((b.device_id, b.batch_id), b)
    rows: dict[tuple[str, str], Any] = {}
    for key, b in unique.items():
        models = b.models.values()
        inferences = sum(s.inferences for s in models)
        errors = sum(sum(s.errors.values()) for s in models)
        if dialect == "postgresql":
            # the validated batch as pydantic writes it (an object: "{..."), the two sums in front
            rows[key] = f'{{"i":{inferences},"e":{errors},{b.model_dump_json()[1:]}'
        else:
            models_json = _MODELS_JSON.dump_json(b.models).decode()
            ws, we = _sqlite_time(b.window_start), _sqlite_time(b.window_end)
            rows[key] = (key[0], key[1], ws, we, inferences, errors, models_json)
    return Prepared(dialect, unique, rows, _deltas(unique.values()))


def _deltas(batches: Iterable[protocol.TelemetryBatch]) -> Deltas:
    deltas: dict[tuple[str, str], _Delta] = {}
    devices: dict[str, _DeviceDelta] = {}
    shas: dict[str, bool] = {}
    for b in batches:
        _add(deltas, b, shas)
        if b.labels_unmatched or b.capture_evicted > 0 or b.dropped_batches > 0:
            dd = devices.get(b.device_id)
            if dd is None:
                dd = devices[b.device_id] = _DeviceDelta()
            _add_named(dd.labels_unmatched, b.labels_unmatched, MAX_KINDS)
            dd.capture_evicted += max(b.capture_evicted, 0)
            dd.dropped_batches += max(b.dropped_batches, 0)
    return deltas, devices


def store_prepared(
    session: Session, prep: Prepared, now: datetime, hardware: Mapping[str, str] | None = None
) -> int:
    """``prepare``'s rows in (only those of the devices in ``hardware`` when given: the registered ones,
    with their hardware ids), the aggregates and the per-minute sums updated with the batches that
    were new; returns how many were."""
    if hardware is None:
        ids = sorted({k[0] for k in prep.rows})
        query = select(col(Device.id), col(Device.hardware_id)).where(col(Device.id).in_(ids))
        hardware = {d: hw for d, hw in session.connection().execute(query)}
    keys = [k for k in prep.rows if k[0] in hardware]
    if not keys:
        return 0
    if prep.dialect == "postgresql":
        new_keys = _insert_new_pg(session, [prep.rows[k] for k in keys], now)
    else:
        new_keys = _insert_new_sqlite(session, prep, keys, now)
    # the common case: every batch of the flush was new and from a registered device
    all_new = len(new_keys) == len(prep.batches)
    deltas, device_deltas = prep.deltas if all_new else _deltas(prep.batches[k] for k in new_keys)
    if deltas:
        _apply(session, deltas, now)
        add_outcomes(session, prep.batches.values() if all_new else (prep.batches[k] for k in new_keys), now)
    if device_deltas:
        _apply_devices(session, device_deltas, now)
    if deltas:
        add_minutes(session, deltas, hardware, now)  # last: its few shared rows stay locked briefly
    return len(new_keys)


def _insert_new_pg(session: Session, records: list[str], now: datetime) -> set[tuple[str, str]]:
    rows = session.connection().execute(_PG_INSERT_BATCHES, {"rows": f"[{','.join(records)}]", "now": now})
    return {(r[0], r[1]) for r in rows}


_SQLITE_INSERT_BATCH = (
    "INSERT INTO telemetrybatchrow"
    " (device_id, batch_id, window_start, window_end, inferences, errors, models, received_at)"
    " VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
)


def _sqlite_time(t: datetime) -> str:
    """What ``UTCDateTime`` stores on SQLite (UTC, SQLAlchemy's text format), without its per-value
    bind processing: the batch rows go in with one raw ``executemany``."""
    if t.tzinfo is None:
        raise ValueError("naive datetime in a telemetry batch")
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")


def _sqlite_chunks(keys: list[tuple[str, str]]) -> Iterator[tuple[list[tuple[str, str]], str]]:
    """Key pairs in chunks (SQLite binds at most 32,766 parameters) with their ``VALUES`` marks.

    Looked up as a join on the VALUES list: SQLite plans ``(a, b) IN (VALUES ...)`` as a scan of
    the whole index (a flush got slower as the table grew), the join as one index search per key."""
    for i in range(0, len(keys), 400):
        chunk = keys[i : i + 400]
        yield chunk, ",".join(["(?,?)"] * len(chunk))


def _insert_new_sqlite(
    session: Session, prep: Prepared, keys: list[tuple[str, str]], now: datetime
) -> set[tuple[str, str]]:
    conn = session.connection()
    seen: set[tuple[str, str]] = set()
    for chunk, marks in _sqlite_chunks(keys):
        seen.update(
            (r[0], r[1])
            for r in conn.exec_driver_sql(
                f"SELECT t.device_id, t.batch_id FROM (VALUES {marks}) AS k"
                " JOIN telemetrybatchrow AS t ON t.device_id = k.column1 AND t.batch_id = k.column2",
                tuple(v for k in chunk for v in k),
            )
        )
    new = [k for k in keys if k not in seen]
    received = _sqlite_time(now)
    if new:
        conn.exec_driver_sql(_SQLITE_INSERT_BATCH, [(*prep.rows[k], received) for k in new])
    return set(new)


def _add(deltas: dict[tuple[str, str], _Delta], b: protocol.TelemetryBatch, shas: dict[str, bool]) -> None:
    for sha, s in b.models.items():
        ok = shas.get(sha)
        if ok is None:
            ok = shas[sha] = SHA256_RE.match(sha) is not None
        if not ok:
            continue
        key = (b.device_id, sha)
        d = deltas.get(key)
        if d is None:
            d = deltas[key] = _Delta()
        d.in_models = True
        if s.inferences > 0:
            d.inferences += s.inferences
        if s.errors:
            d.errors += sum(v for v in s.errors.values() if v > 0)
        if s.latency_buckets:
            d.latency.append(counts(s.latency_buckets))
        if s.output_hist:
            d.output.append(counts(s.output_hist))
        if s.class_hist:
            _add_named(d.classes, s.class_hist, MAX_CLASSES)
        n = s.labels
        if n > 0:
            d.labels += n
            correct = s.labels_correct
            d.labels_correct += n if correct > n else correct if correct > 0 else 0
            if s.confusion:
                _add_named(d.confusion, s.confusion, MAX_CONFUSION, 2 * MAX_NAME + 1)
            if s.label_delay_buckets:
                d.label_delay.append(counts(s.label_delay_buckets))
            if 0 < s.label_abs_error_sum < _INF:
                d.label_abs_error += s.label_abs_error_sum
        if s.requests > 0:
            d.requests += s.requests
            if s.request_errors:
                _add_named(d.request_errors, s.request_errors, MAX_KINDS)
        if s.input_checks:  # summed per input when applied (``_sum``), like the histograms
            checks = d.input_checks
            for name, row in islice(s.input_checks.items(), MAX_INPUTS):
                rows = checks.get(name)
                if rows is None:
                    rows = checks[name[:MAX_NAME]] = []
                rows.append(row)
        if s.input_buckets:
            _add_rows(d.input_buckets, s.input_buckets)
        if 0 < s.cpu_ms < _INF:
            d.cpu_ms += s.cpu_ms
        if s.captured > 0:
            d.captured += s.captured
    if b.shadow:
        for sha, sh in b.shadow.items():
            if not SHA256_RE.match(sha) or sh.samples < 0 or not 0 <= sh.top1_agree <= sh.samples:
                continue
            d = deltas.setdefault((b.device_id, sha), _Delta())
            d.shadow_samples += sh.samples
            d.shadow_agree += sh.top1_agree


def _add_rows(into: dict[str, list[list[int]]], per_input: dict[str, list[int]]) -> None:
    """Keep a batch's per-input rows to sum when applied: at most MAX_INPUTS inputs, names cut."""
    for name, row in islice(per_input.items(), MAX_INPUTS):
        into.setdefault(name[:MAX_NAME], []).append(row)


def _summed_inputs(current: Any, rows: dict[str, list[list[int]]], width: int) -> dict[str, list[int]]:
    """A stored per-input column plus a flush's rows, ``width`` counts per input, MAX_INPUTS inputs."""
    out = dict(current or {})
    for name, batch_rows in rows.items():
        if name in out or len(out) < MAX_INPUTS:
            added = _columns([counts(r[:width]) for r in batch_rows])
            out[name] = list(add_counts(out.get(name) or [], added))
    return out


def _columns(rows: list[list[int]]) -> tuple[int, ...]:
    return tuple(sum(c) for c in zip_longest(*rows, fillvalue=0)) if rows else ()


def _apply(session: Session, deltas: dict[tuple[str, str], _Delta], now: datetime) -> None:
    if session.get_bind().dialect.name == "postgresql":
        _apply_pg(session, deltas, now)
        return
    keys = sorted(deltas)
    table = ModelAggregate.__table__  # type: ignore[attr-defined]
    session.execute(
        _insert(session, table).on_conflict_do_nothing(index_elements=["device_id", "sha256"]),
        [{"device_id": k[0], "sha256": k[1], "updated_at": now} for k in keys],
    )
    current = []
    for chunk, marks in _sqlite_chunks(keys):
        for r in session.connection().exec_driver_sql(
            f"SELECT a.device_id, a.sha256, {_AGGREGATE_COLUMNS} FROM (VALUES {marks}) AS k"
            " JOIN modelaggregate AS a ON a.device_id = k.column1 AND a.sha256 = k.column2",
            tuple(v for k in chunk for v in k),
        ):
            row = dict(r._mapping)
            for name in _JSON_COLUMNS:
                row[name] = json.loads(row[name]) if row[name] else None
            current.append(row)
    params = []
    for row in current:
        new = _sum(row, deltas[(row["device_id"], row["sha256"])])
        params.append({"k_device": row["device_id"], "k_sha": row["sha256"], **new, "updated_at": now})
    stmt = (
        update(table)
        .where(table.c.device_id == bindparam("k_device"), table.c.sha256 == bindparam("k_sha"))
        .execution_options(synchronize_session=False)
    )
    session.connection().execute(stmt, params)


def _apply_pg(session: Session, deltas: dict[tuple[str, str], _Delta], now: datetime) -> None:
    keys = sorted(deltas)
    conn = session.connection()
    ks = {"d": [k[0] for k in keys], "s": [k[1] for k in keys]}
    conn.execute(_PG_CREATE_AGGREGATES, {**ks, "now": now})
    current = conn.execute(
        text(
            f"SELECT device_id, sha256, {_AGGREGATE_COLUMNS} FROM modelaggregate"
            f" WHERE (device_id, sha256) IN ({_PG_KEYS}) ORDER BY device_id, sha256 FOR UPDATE"
        ),
        ks,
    ).mappings()
    rows = []
    for row in current:
        new = _sum(row, deltas[(row["device_id"], row["sha256"])])
        record = {"d": row["device_id"], "s": row["sha256"]}
        for column, (key, _) in _PG_FIELDS.items():
            record[key] = new[column]
        rows.append(record)
    conn.execute(_PG_UPDATE_AGGREGATES, {"rows": json.dumps(rows), "now": now})


def _sum(row: Any, d: _Delta) -> dict[str, Any]:
    """An aggregate row plus a flush's delta (histograms bucket by bucket)."""
    classes = dict(row["class_hist"] or {})
    for cls, n in d.classes.items():
        classes[cls] = classes.get(cls, 0) + n
    return {
        "inferences": row["inferences"] + d.inferences,
        "errors": row["errors"] + d.errors,
        "latency_buckets": list(add_counts(row["latency_buckets"] or [], _columns(d.latency))),
        "output_hist": list(add_counts(row["output_hist"] or [], _columns(d.output))),
        "class_hist": classes,
        "shadow_samples": row["shadow_samples"] + d.shadow_samples,
        "shadow_agree": row["shadow_agree"] + d.shadow_agree,
        "labels": row["labels"] + d.labels,
        "labels_correct": row["labels_correct"] + d.labels_correct,
        "confusion": _merged(row["confusion"], d.confusion, MAX_CONFUSION, CONFUSION_OVERFLOW)
        if d.confusion
        else row["confusion"] or {},
        "label_delay_buckets": list(add_counts(row["label_delay_buckets"] or [], _columns(d.label_delay))),
        "label_abs_error_sum": row["label_abs_error_sum"] + d.label_abs_error,
        "requests": row["requests"] + d.requests,
        "request_errors": _merged(row["request_errors"], d.request_errors, MAX_KINDS, "other")
        if d.request_errors
        else row["request_errors"] or {},
        "input_checks": _summed_inputs(row["input_checks"], d.input_checks, len(protocol.INPUT_CHECKS)),
        "cpu_ms": row["cpu_ms"] + d.cpu_ms,
        "captured": row["captured"] + d.captured,
        "input_buckets": _summed_inputs(row["input_buckets"], d.input_buckets, len(protocol.INPUT_BUCKETS)),
    }


def _apply_devices(session: Session, deltas: dict[str, _DeviceDelta], now: datetime) -> None:
    """Add the flush's per-device counts to ``DeviceTotals`` (rows locked in key order, as above)."""
    keys = sorted(deltas)
    table = DeviceTotals.__table__  # type: ignore[attr-defined]
    conn = session.connection()
    conn.execute(
        _insert(session, table).on_conflict_do_nothing(index_elements=["device_id"]),
        [{"device_id": k, "labels_unmatched": {}, "updated_at": now} for k in keys],
    )
    query = select(table).where(table.c.device_id.in_(keys)).order_by(table.c.device_id)
    if conn.dialect.name == "postgresql":
        query = query.with_for_update()
    params = []
    for row in conn.execute(query).mappings():
        d = deltas[row["device_id"]]
        params.append(
            {
                "k_device": row["device_id"],
                "labels_unmatched": _merged(row["labels_unmatched"], d.labels_unmatched, MAX_KINDS, "other"),
                "capture_evicted": row["capture_evicted"] + d.capture_evicted,
                "dropped_batches": row["dropped_batches"] + d.dropped_batches,
                "updated_at": now,
            }
        )
    conn.execute(
        update(table)
        .where(table.c.device_id == bindparam("k_device"))
        .execution_options(synchronize_session=False),
        params,
    )
