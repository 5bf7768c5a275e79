"""The audit log: one append-only row per mutating admin call, and reading it back.

``AuditMiddleware`` (pure ASGI, so streamed artifact downloads are not
buffered) appends an entry after each POST/PUT/PATCH/DELETE under
``/api/v1/``, whatever its outcome: who (the principal the route guard or the
auth dependency put on the request), what (method, path), when, and the result
(status and the error code the exception handler recorded). Nothing ever
updates or deletes a row.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Engine
from sqlmodel import col, select

from fleet_server.auth import Principal
from fleet_server.models import AuditEntry, utcnow
from fleet_server.store import new_session

log = logging.getLogger(__name__)

MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
AUDITED_PREFIX = "/api/v1/"


def record_audit(engine: Engine, entry: AuditEntry) -> None:
    with new_session(engine) as session:
        session.add(entry)
        session.commit()


def audit_entries(engine: Engine, *, after_id: int, limit: int, actor: str | None) -> Sequence[AuditEntry]:
    """Oldest first from ``after_id`` (a client pages with the last id it saw)."""
    query = select(AuditEntry).where(col(AuditEntry.id) > after_id)
    if actor:
        query = query.where(AuditEntry.actor == actor)
    with new_session(engine) as session:
        return session.exec(query.order_by(col(AuditEntry.id)).limit(limit)).all()


class AuditMiddleware:
    """Append one AuditEntry per mutating ``/api/v1/`` call, whatever its outcome."""

    def __init__(self, app: Any, engine: Engine) -> None:
        self.app = app
        self.engine = engine

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] not in MUTATING
            or not str(scope["path"]).startswith(AUDITED_PREFIX)
        ):
            await self.app(scope, receive, send)
            return
        status = 500

        async def send_status(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
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
            except Exception:  # the call itself already happened; losing its record must be loud
                log.exception("could not write the audit entry for %s %s", entry.method, entry.path)


__all__ = ["AuditMiddleware", "audit_entries", "record_audit"]
