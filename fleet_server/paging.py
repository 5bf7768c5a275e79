"""Cursor paging for every list of the admin API: opaque cursors over a keyset, never OFFSET.

A list is read in a fixed order on a unique key (a device's id; a rollout's
``(created_at, id)``; ...), and a page is "the first ``limit`` rows whose key
comes after the cursor's". So the database walks an index from the cursor's
position (an OFFSET would read and discard every row before it), and a row
inserted between two page requests moves no other row: every row that existed
for the whole walk is returned exactly once, wherever the insert lands.

The cursor is the last returned row's key with the name of the list it belongs
to, as URL-safe base64 of compact JSON. It is opaque to clients (they pass back
what ``next`` said) and not secret (it holds only ids and times the page
already showed). Anything that is not a cursor this list gave out is a 400
``invalid_cursor`` naming what is wrong, never a 500 or a silent first page.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar, cast

from sqlalchemy import ColumnElement, Select, bindparam, tuple_
from sqlalchemy.orm import Mapped, QueryableAttribute
from sqlmodel import Session
from sqlmodel.sql.expression import SelectOfScalar

from fleet_server.errors import Rejected

DEFAULT_LIMIT = 100
"""Rows per page when the request gives no ``limit``: one screen of an admin console."""
MAX_LIMIT = 1000
"""The most rows one page may hold: bounds the work of one request (and the client follows ``next``)."""
MAX_CURSOR_LENGTH = 1024
"""Longer than any cursor this server makes (keys are ids and timestamps)."""

KeyPart = str | int | datetime
Key = tuple[KeyPart, ...]
R = TypeVar("R")


@dataclass(frozen=True)
class Page(Generic[R]):
    """Up to ``limit`` rows, and the cursor of the next page (None when these are the last)."""

    items: list[R]
    next: str | None


def encode_cursor(kind: str, key: Key) -> str:
    """The opaque cursor of the position just after ``key`` in list ``kind``."""
    parts = [p.isoformat() if isinstance(p, datetime) else p for p in key]
    raw = json.dumps([kind, *parts], separators=(",", ":"), ensure_ascii=False).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str, kind: str, shape: Sequence[type[KeyPart]]) -> Key:
    """The key ``encode_cursor(kind, key)`` encoded, checked against the list's key ``shape``.

    Raises ``Rejected("invalid_cursor")`` for anything else: not base64, not JSON, another
    list's cursor, or a key of the wrong arity or types.
    """

    def refuse(why: str) -> Rejected:
        return Rejected("invalid_cursor", f"cursor: {why}; pass back the 'next' of a page of this list")

    if len(cursor) > MAX_CURSOR_LENGTH:
        raise refuse(f"longer than {MAX_CURSOR_LENGTH} characters")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        decoded = json.loads(raw)
    except (binascii.Error, ValueError):
        raise refuse("not a cursor this server made (not base64 of JSON)") from None
    if not isinstance(decoded, list) or not decoded or not isinstance(decoded[0], str):
        raise refuse("not a cursor this server made")
    if decoded[0] != kind:
        raise refuse(f"a cursor of the {decoded[0]!r} list, not of {kind!r}")
    values = decoded[1:]
    if len(values) != len(shape):
        raise refuse(f"holds {len(values)} key part(s), this list's key has {len(shape)}")
    return tuple(_part(v, t, refuse) for v, t in zip(values, shape, strict=True))


def _part(value: object, expected: type[KeyPart], refuse: Callable[[str], Rejected]) -> KeyPart:
    if expected is datetime:
        try:
            parsed = datetime.fromisoformat(value) if isinstance(value, str) else None
        except ValueError:
            parsed = None
        if parsed is None or parsed.tzinfo is None:
            raise refuse(f"{value!r} is not a timezone-aware ISO 8601 time")
        try:
            return parsed.astimezone(UTC)
        except OverflowError:  # an offset pushed year 1 or 9999 out of range
            raise refuse(f"{value!r} is out of range") from None
    # bool is an int to isinstance, and never a key part
    if not isinstance(value, expected) or isinstance(value, bool):
        raise refuse(f"{value!r} is not a {expected.__name__}")
    return value


def after_key(cursor: str | None, kind: str, shape: Sequence[type[KeyPart]]) -> Key | None:
    """The key a page starts after: None for the first page."""
    return None if cursor is None else decode_cursor(cursor, kind, shape)


def keyset(order: Sequence[Mapped[Any]], key: Key) -> ColumnElement[bool]:
    """``(columns) > key`` as one row comparison, which PostgreSQL and SQLite answer from an index
    on the same columns in the same order (the list's ``ORDER BY``)."""
    columns = _attributes(order)
    if len(columns) == 1:
        return columns[0] > bindparam(None, key[0], type_=columns[0].type)
    values = [bindparam(None, v, type_=c.type) for c, v in zip(columns, key, strict=True)]
    return tuple_(*columns) > tuple_(*values)


def collect(
    fetch: Callable[[Key | None, int], Sequence[R]],
    key: Callable[[R], Key],
    after: Key | None,
    limit: int,
    keep: Callable[[R], bool] | None = None,
    batch: int = 500,
) -> tuple[list[R], Key | None]:
    """Up to ``limit`` rows after ``after`` and the key to continue after (None: no more rows).

    ``fetch(after, n)`` returns at most ``n`` rows in key order whose key is after ``after``.
    Without ``keep`` one fetch of ``limit + 1`` rows tells whether another page exists. With
    ``keep`` (a criterion SQL cannot express, applied here), rows are fetched in batches until
    ``limit + 1`` are kept or the list ends, so a page is full unless it is the last.
    """
    size = limit + 1 if keep is None else max(limit + 1, batch)
    kept: list[R] = []
    position = after
    while len(kept) <= limit:
        rows = fetch(position, size)
        kept += rows if keep is None else [r for r in rows if keep(r)]
        if len(rows) < size:
            break
        position = key(rows[-1])
    if len(kept) > limit:
        return kept[:limit], key(kept[limit - 1])
    return kept, None


def page(kind: str, rows: list[R], next_key: Key | None) -> Page[R]:
    return Page(rows, None if next_key is None else encode_cursor(kind, next_key))


def _attributes(order: Sequence[Mapped[Any]]) -> list[QueryableAttribute[Any]]:
    """``col(Model.field)`` is typed ``Mapped``; at run time it is the attribute with a key and a type."""
    return [cast("QueryableAttribute[Any]", c) for c in order]


def _key_type(attribute: QueryableAttribute[Any]) -> type[KeyPart]:
    """The Python type of a key column, which a cursor's part must have (a type decorator,
    such as ``UTCDateTime``, says ``object``: ask the type it decorates)."""
    column_type = getattr(attribute.type, "impl_instance", attribute.type)
    python_type = column_type.python_type
    if python_type not in (str, int, datetime):
        raise TypeError(f"{attribute.key}: a list key must be str, int or datetime, not {python_type}")
    return cast("type[KeyPart]", python_type)


def select_page(
    session: Session,
    query: SelectOfScalar[R] | Select[*tuple[Any, ...]],
    order: Sequence[Mapped[Any]],
    kind: str,
    cursor: str | None,
    limit: int,
    keep: Callable[[R], bool] | None = None,
) -> Page[R]:
    """One page of ``query``'s rows in ``order`` (a unique key; an index on it in the same order
    makes each page an index range scan), after ``cursor``; ``keep`` as for :func:`collect`."""
    names = [c.key for c in _attributes(order)]
    shape = [_key_type(c) for c in _attributes(order)]

    def fetch(after: Key | None, n: int) -> Sequence[R]:
        q = query if after is None else query.where(keyset(order, after))
        # rows of R: model instances, or Row tuples when the query selects columns
        return session.exec(cast("SelectOfScalar[R]", q.order_by(*order).limit(n))).all()

    def key(row: R) -> Key:
        return tuple(getattr(row, n) for n in names)

    rows, next_key = collect(fetch, key, after_key(cursor, kind, shape), limit, keep)
    return page(kind, rows, next_key)


def list_page(
    kind: str,
    rows: Sequence[R],
    key: Callable[[R], Key],
    shape: Sequence[type[KeyPart]],
    cursor: str | None,
    limit: int,
) -> Page[R]:
    """One page of a list computed in memory (telemetry groups), sorted here by ``key``."""
    after = after_key(cursor, kind, shape)
    ordered = sorted(rows, key=key)  # keys of one list have one shape, so they compare
    rest = [r for r in ordered if after is None or key(r) > after]
    if len(rest) > limit:
        return page(kind, rest[:limit], key(rest[limit - 1]))
    return page(kind, rest, None)


__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "Key",
    "Page",
    "after_key",
    "collect",
    "decode_cursor",
    "encode_cursor",
    "keyset",
    "list_page",
    "page",
    "select_page",
]
