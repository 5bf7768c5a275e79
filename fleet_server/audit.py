"""The audit log: one append-only row per mutating admin call, and reading it back.

``AuditMiddleware`` (pure ASGI, so streamed artifact downloads are not
buffered) appends an entry for each POST/PUT/PATCH/DELETE under ``/api/v1/``
or the console's ``/ui/`` (its sign-ins and actions)
as its answer starts (so the caller's next read of the log finds it),
whatever its outcome: who (the principal the route guard or the
auth dependency put on the request), what (method, path), when, and the result
(status and the error code the exception handler recorded). Nothing ever
updates or deletes a row. Reading pages by entry id (the primary key), with
the filters in SQL.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import ColumnElement, Engine
from sqlmodel import col, select

from fleet_server.auth import Principal
from fleet_server.models import AuditEntry, utcnow
from fleet_server.paging import DEFAULT_LIMIT, Page, select_page
from fleet_server.store import new_session

log = logging.getLogger(__name__)

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
AUDITED_PREFIXES = ("/api/v1/", "/ui/")


def record_audit(engine: Engine, entry: AuditEntry) -> None:
    with new_session(engine) as session:
        session.add(entry)
        session.commit()


@dataclass(frozen=True)
class AuditFilter:
    """Which entries a reader wants: every criterion given must hold (AND).

    ``path`` is a prefix (``/api/v1/rollouts`` keeps every rollout call); ``since`` is
    inclusive and ``until`` exclusive; ``after_id`` keeps entries with a larger id.
    """

    actor: str | None = None
    method: str | None = None
    path: str | None = None
    result: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_id: int = 0

    def sql(self) -> list[ColumnElement[bool]]:
        clauses = [col(AuditEntry.id) > self.after_id] if self.after_id else []
        for column, value in (
            (col(AuditEntry.actor), self.actor),
            (col(AuditEntry.method), self.method),
            (col(AuditEntry.result), self.result),
        ):
            if value is not None:
                clauses.append(column == value)
        if self.path is not None:
            clauses.append(col(AuditEntry.path).startswith(self.path, autoescape=True))
        if self.since is not None:
            clauses.append(col(AuditEntry.ts) >= _utc(self.since))
        if self.until is not None:
            clauses.append(col(AuditEntry.ts) < _utc(self.until))
        return clauses


def _utc(value: datetime) -> datetime:
    """``value`` in UTC, clamped to what a datetime holds (an offset can push year 1 or 9999 past it)."""
    try:
        return value.astimezone(UTC)
    except OverflowError:
        return datetime.min.replace(tzinfo=UTC) if value.year == 1 else datetime.max.replace(tzinfo=UTC)


def audit_entries(
    engine: Engine, where: AuditFilter | None = None, *, cursor: str | None = None, limit: int = DEFAULT_LIMIT
) -> Page[AuditEntry]:
    """One page of the entries ``where`` keeps, oldest first."""
    query = select(AuditEntry).where(*(where or AuditFilter()).sql())
    with new_session(engine) as session:
        return select_page(session, query, [col(AuditEntry.id)], "audit", cursor, limit)


class AuditMiddleware:
    """Append one AuditEntry per mutating ``/api/v1/`` call, whatever its outcome."""

    def __init__(self, app: Any, engine: Engine) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in MUTATING
            or not str(scope["path"]).startswith(AUDITED_PREFIXES)
        ):
            await self.app(scope, receive, send)
            return
        recorded = False

        async def send_status(message: Any) -> None:
            nonlocal recorded
            if message["type"] == "http.response.start":
                # written before the answer leaves: a caller that reads the log next finds its call
                recorded = True
                await self._record(scope, int(message["status"]))
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            if not recorded:  # no answer was started here (an unexpected error: the 500 comes later)
                await self._record(scope, 500)

    async def _record(self, scope: Any, status: int) -> None:
        state = scope.get("state") or {}
        principal = state.get("principal")
        code = state.get("error_code") or ("ok" if status < 400 else f"http_{status}")
        entry = AuditEntry(
            ts=utcnow(),
            actor=principal.actor if isinstance(principal, Principal) else "anonymous",
            role=principal.role if isinstance(principal, Principal) else "",
            method=str(scope["method"]),
            path=str(scope["path"])[:512],
            status=status,
            result=str(code)[:64],
            detail=str(state.get("audit_detail", ""))[:512],
        )
        try:
            await asyncio.to_thread(record_audit, self.engine, entry)
        except Exception:  # the call itself happened; losing its record must be loud
            log.exception("could not write the audit entry for %s %s", entry.method, entry.path)


__all__ = ["AuditFilter", "AuditMiddleware", "audit_entries", "record_audit"]
