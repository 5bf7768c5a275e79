"""Labels from the field: check a batch item by item, store the valid ones once, say what each became.

A batch is ``[{inference_id, label, label_time?, source}]``. Each item is judged on its
own (:func:`check`, pure): an invalid one is reported with its reason and the valid rest
is stored. Storing is idempotent on (inference_id, source): the first label a source gives
an inference stands, a repeat (in the same batch or a later one) is ``duplicate``. A
label for an inference the server holds no capture of is stored all the same (the
capture may come later, or the inference was not sampled) and reported ``matched:
false``: it is never an error.

Ingest is set-based, one statement per batch (chunked on SQLite). On PostgreSQL a batch is
first tried optimistically: ``COPY`` straight into the table inside a savepoint, then one
keyed lookup of the captures. Labels are almost never sent twice (ids are fresh UUIDv7s), and
``COPY`` costs about half an ``INSERT ... ON CONFLICT`` per row, whose speculative insertion
writes extra WAL for every row to guard against the rare repeat. When a key exists already
(a resend, or another batch racing for the same key: ``COPY`` waits for it and then fails on
the unique key) the savepoint is rolled back and the batch goes through the exact path: the
rows from one JSON document (``json_to_recordset``, a fixed statement psycopg prepares once)
with ``ON CONFLICT DO NOTHING RETURNING`` the keys it inserted. Either way the unique key
decides, so the outcome is the same. SQLite does a multi-row ``INSERT ... ON CONFLICT DO
NOTHING RETURNING``. Then one keyed lookup of the captures per batch: the new labels of
captured inferences are scored against their predictions and counted for the accuracy SLI
(``fleet_server.server_label_counts``).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from sqlalchemy import Connection, Engine, text

from fleet_server.server_label_counts import add_counts, tally

INFERENCE_ID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$")
SOURCE_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:@/-]{0,63}$")
MAX_ITEMS = 10_000  # per request; the body limit (1 MiB) holds about this many small labels
MAX_LABEL_TEXT = 256
MAX_LABEL_LIST = 1024  # a multi-row inference's labels, one per row
_SOURCE_WHY = "source must be 1 to 64 characters of letters, digits and _.:@/- (first a letter or digit)"
_FIELDS = frozenset({"inference_id", "label", "label_time", "source"})
_SQLITE_CHUNK = 1000  # rows per statement: 5 parameters each, well under SQLite's 32,766


class LabelIn(NamedTuple):
    """A label that passed :func:`check`: what is stored (a tuple: a batch makes thousands)."""

    inference_id: str
    source: str
    label: Any
    label_time: datetime


@dataclass(frozen=True, slots=True)
class Outcome:
    """What became of one item: ``accepted``, ``duplicate`` or ``invalid`` (``detail`` says why);
    ``matched``: the server holds a capture of that inference."""

    status: str
    matched: bool = False
    detail: str | None = None


_ACCEPTED = {m: Outcome("accepted", m) for m in (False, True)}
_DUPLICATE = {m: Outcome("duplicate", m, "this source labelled it before") for m in (False, True)}
_STATUSES = ("accepted", "duplicate", "invalid")


def _label_value(v: Any) -> str | None:
    """Why ``v`` is not a label (None: it is one): a class index or name, a finite number, or a
    flat list of those (one per row of a multi-row inference)."""
    if isinstance(v, bool):
        return "label must be a number, a string or a list of them, not a boolean"
    if isinstance(v, int):
        return None
    if isinstance(v, float):
        return None if math.isfinite(v) else "label must be finite"
    if isinstance(v, str):
        return (
            None if 0 < len(v) <= MAX_LABEL_TEXT else f"label text must be 1 to {MAX_LABEL_TEXT} characters"
        )
    if isinstance(v, list):
        if not 0 < len(v) <= MAX_LABEL_LIST:
            return f"a label list must hold 1 to {MAX_LABEL_LIST} entries"
        for x in v:
            if isinstance(x, list) or (why := _label_value(x)) is not None:
                return "a label list holds numbers or strings only" if isinstance(x, list) else why
        return None
    return "label must be a number, a string or a list of them"


def parse_time(v: Any) -> datetime | str:
    """An ISO 8601 time with an offset (``Z`` allowed), or why not."""
    if not isinstance(v, str) or len(v) > 40:
        return "label_time must be an ISO 8601 time string"
    try:
        t = datetime.fromisoformat(v)
    except ValueError:
        return f"label_time {v!r} is not ISO 8601"
    if t.tzinfo is None:
        return "label_time needs an offset (e.g. Z)"
    return t.astimezone(UTC)


def check(
    item: Any,
    now: datetime,
    times: dict[str, datetime | str] | None = None,
    sources: set[str] | None = None,
) -> LabelIn | str:
    """One batch item as a label, or the reason it is not one (pure). ``times``: label times parsed
    so far in this batch, ``sources``: sources found valid so far (a batch often carries one time
    and one source many times over)."""
    if not isinstance(item, dict):
        return "an item must be an object"
    if not _FIELDS.issuperset(item):
        return f"unknown field(s): {', '.join(sorted(map(str, item.keys() - _FIELDS)))}"
    iid = item.get("inference_id")
    if not isinstance(iid, str) or not INFERENCE_ID_RE.match(iid):
        return "inference_id must be a UUID in canonical lowercase form"
    source = item.get("source")
    if not isinstance(source, str):
        return _SOURCE_WHY
    if sources is None or source not in sources:
        if not SOURCE_RE.match(source):
            return _SOURCE_WHY
        if sources is not None and len(sources) < 1024:
            sources.add(source)
    if "label" not in item:
        return "label is required"
    label = item["label"]
    why = None if type(label) is int else _label_value(label)  # a class index: the common case
    if why is not None:
        return why
    when = now
    raw = item.get("label_time")
    if raw is not None:
        parsed = times.get(raw) if times is not None and isinstance(raw, str) else None
        if parsed is None:
            parsed = parse_time(raw)
            if times is not None and isinstance(raw, str) and len(times) < 1024:
                times[raw] = parsed
        if isinstance(parsed, str):
            return parsed
        when = parsed
    return LabelIn(iid, source, label, when)


def judge(items: Sequence[Any], now: datetime) -> tuple[list[LabelIn], list[Outcome | None]]:
    """Check every item; the distinct valid labels to store, and per item its outcome so far
    (None: valid and first of its key in this batch, decided by the store)."""
    fresh: list[LabelIn] = []
    outcomes: list[Outcome | None] = []
    seen: set[tuple[str, str]] = set()
    times: dict[str, datetime | str] = {}
    sources: set[str] = set()
    for item in items:
        got = check(item, now, times, sources)
        if isinstance(got, str):
            outcomes.append(Outcome("invalid", detail=got))
            continue
        key = (got.inference_id, got.source)
        if key in seen:
            outcomes.append(Outcome("duplicate", detail="repeated in this batch"))
            continue
        seen.add(key)
        fresh.append(got)
        outcomes.append(None)
    return fresh, outcomes


_PG_INSERT = text(
    "INSERT INTO label (inference_id, source, label, label_time, received_at)"
    " SELECT r.i, r.s, r.l, r.t, :now FROM json_to_recordset(CAST(:rows AS json))"
    " AS r(i varchar, s varchar, l json, t timestamptz)"
    " ON CONFLICT (inference_id, source) DO NOTHING RETURNING inference_id, source"
)
# the ids as one comma-joined text split by the server: psycopg adapts a list of 7,000 strings to
# an array element by element in Python (~2.5 us an id, measured), a single string costs nothing
_PG_CAPTURED = text(
    "SELECT inference_id, model_sha256, hardware_id, predicted FROM captureitem"
    " WHERE inference_id = ANY(string_to_array(:ids, ','))"
)


def _insert_pg(conn: Connection, labels: Sequence[LabelIn], now: datetime) -> set[tuple[str, str]]:
    """Insert what is new; the keys inserted (one statement)."""
    iso: dict[datetime, str] = {}
    for x in labels:
        if x.label_time not in iso:
            iso[x.label_time] = x.label_time.isoformat()
    rows = json.dumps(
        [{"i": x.inference_id, "s": x.source, "l": x.label, "t": iso[x.label_time]} for x in labels],
        separators=(",", ":"),
    )
    return {(iid, source) for iid, source in conn.execute(_PG_INSERT, {"rows": rows, "now": now})}


_PG_COPY = "COPY label (inference_id, source, label, label_time, received_at) FROM STDIN"


def _copy_pg(conn: Connection, labels: Sequence[LabelIn], now: datetime) -> bool:
    """``COPY`` every label in a savepoint; False (and nothing stored) when a key exists already."""
    import psycopg  # the PostgreSQL driver: only this dialect gets here

    raw = conn.connection.driver_connection
    assert isinstance(raw, psycopg.Connection)
    iso: dict[datetime, str] = {}
    received = now.isoformat()
    savepoint = conn.begin_nested()
    try:
        with raw.cursor() as cur, cur.copy(_PG_COPY) as copy:
            write = copy.write_row
            for x in labels:
                t = iso.get(x.label_time)
                if t is None:
                    t = iso[x.label_time] = x.label_time.isoformat()
                label = x.label
                write(
                    (
                        x.inference_id,
                        x.source,
                        str(label) if type(label) is int else json.dumps(label),
                        t,
                        received,
                    )
                )
    except psycopg.errors.UniqueViolation:
        savepoint.rollback()
        return False
    savepoint.commit()
    return True


def _insert_sqlite(conn: Connection, labels: Sequence[LabelIn], now: datetime) -> set[tuple[str, str]]:
    inserted: set[tuple[str, str]] = set()
    stamp = now.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
    for start in range(0, len(labels), _SQLITE_CHUNK):
        chunk = labels[start : start + _SQLITE_CHUNK]
        values = ", ".join("(?, ?, ?, ?, ?)" for _ in chunk)
        params: list[Any] = []
        for x in chunk:
            t = x.label_time.strftime("%Y-%m-%d %H:%M:%S.%f")
            params += [x.inference_id, x.source, json.dumps(x.label), t, stamp]
        sql = (
            "INSERT INTO label (inference_id, source, label, label_time, received_at)"
            f" VALUES {values} ON CONFLICT (inference_id, source) DO NOTHING RETURNING inference_id, source"
        )
        inserted.update((r[0], r[1]) for r in conn.exec_driver_sql(sql, tuple(params)))
    return inserted


Capture = tuple[str, str, str | None]  # model sha256, hardware id, predicted top-1


def captures_of(conn: Connection, ids: Iterable[str]) -> dict[str, Capture]:
    """The captures the server holds of ``ids`` (canonical UUIDs: no commas): what each is
    attributed to and predicted."""
    wanted = list(dict.fromkeys(ids))
    if not wanted:
        return {}
    if conn.dialect.name == "postgresql":
        joined = ",".join(wanted)
        return {r[0]: (r[1], r[2], r[3]) for r in conn.execute(_PG_CAPTURED, {"ids": joined})}
    found: dict[str, Capture] = {}
    for start in range(0, len(wanted), _SQLITE_CHUNK):
        chunk = wanted[start : start + _SQLITE_CHUNK]
        marks = ", ".join("?" for _ in chunk)
        sql = (
            "SELECT inference_id, model_sha256, hardware_id, predicted FROM captureitem"
            f" WHERE inference_id IN ({marks})"
        )
        found.update((r[0], (r[1], r[2], r[3])) for r in conn.exec_driver_sql(sql, tuple(chunk)))
    return found


def store(engine: Engine, items: Sequence[Any], now: datetime) -> list[Outcome]:
    """Judge and store one batch; the outcome of every item, in order."""
    fresh, outcomes = judge(items, now)
    inserted: set[tuple[str, str]] = set()
    captures: dict[str, Capture] = {}
    if fresh:
        with engine.begin() as conn:
            if conn.dialect.name != "postgresql":
                inserted = _insert_sqlite(conn, fresh, now)
            elif _copy_pg(conn, fresh, now):
                inserted = {(x.inference_id, x.source) for x in fresh}
            else:
                inserted = _insert_pg(conn, fresh, now)
            captures = captures_of(conn, (x.inference_id for x in fresh))
            if captures:  # new labels of captured inferences feed the accuracy SLI
                met = [
                    (*captures[x.inference_id][:2], x.label, captures[x.inference_id][2])
                    for x in fresh
                    if x.inference_id in captures and (x.inference_id, x.source) in inserted
                ]
                add_counts(conn, tally(met), now)
    matched = captures.keys()
    it = iter(fresh)
    out: list[Outcome] = []
    for o in outcomes:
        if o is not None:
            out.append(o)
            continue
        x = next(it)
        kind = _ACCEPTED if (x.inference_id, x.source) in inserted else _DUPLICATE
        out.append(kind[x.inference_id in matched])  # shared values: nothing made per label
    return out


def answer(outcomes: Sequence[Outcome]) -> tuple[str, dict[str, int]]:
    """The JSON answer to a batch (``{"results": [...], "counts": {...}}``) and its counts.

    Written from one encoded fragment per distinct outcome: a 10,000-item answer made of a dict
    per item costs more than storing the batch, most of it in the garbage collector."""
    counts = dict.fromkeys(_STATUSES, 0)
    counts["matched"] = 0
    fragments: dict[Outcome, str] = {}
    parts: list[str] = []
    for o in outcomes:
        fragment = fragments.get(o)
        if fragment is None:
            fragment = fragments[o] = json.dumps(
                {"status": o.status, "matched": o.matched, "detail": o.detail}, separators=(",", ":")
            )
        parts.append(fragment)
        counts[o.status] += 1
        counts["matched"] += o.matched
    head = '{"results":[' + ",".join(parts) + '],"counts":'
    return head + json.dumps(counts, separators=(",", ":")) + "}", counts


__all__ = [
    "INFERENCE_ID_RE",
    "MAX_ITEMS",
    "LabelIn",
    "Outcome",
    "answer",
    "captures_of",
    "check",
    "judge",
    "store",
]
