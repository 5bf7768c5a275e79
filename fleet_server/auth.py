"""Admin API authentication, roles, and the audit log of every mutating call.

Bearer tokens (``Authorization: Bearer ef_...``) with one of three roles,
ordered: ``viewer`` (read), ``operator`` (devices, models, rollouts),
``admin`` (tokens). Only a token's SHA-256 is stored. The bootstrap admin token
comes from ``ServerSettings.admin_token`` or is generated once into
``<data_dir>/admin.token`` (0600) and is compared in memory, never stored in the
database. Without a token the answer is 401 when ``auth_required`` is on;
with it off, a call without a token passes as ``anonymous`` (a token that is
sent is still checked, so a wrong one is always 401). A known token with too
small a role is 403.

The audit log is written by ``AuditMiddleware`` (pure ASGI, so streamed
artifact downloads are not buffered) after each POST/PUT/PATCH/DELETE under
``/api/v1/``: who (from the auth dependency), what (method, path), when, and
the result (status and error code). Nothing ever updates or deletes a row.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import Request
from sqlalchemy import Engine
from sqlmodel import select

from fleet_server.errors import ApiError
from fleet_server.models import ApiToken, AuditEntry, utcnow
from fleet_server.settings import ServerSettings
from fleet_server.store import new_session

log = logging.getLogger(__name__)

ROLES = ("viewer", "operator", "admin")
RANK = {role: i for i, role in enumerate(ROLES)}
TOKEN_FILE = "admin.token"
MUTATING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
AUDITED_PREFIX = "/api/v1/"


@dataclass(frozen=True)
class Principal:
    actor: str
    role: str


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    return "ef_" + secrets.token_urlsafe(32)


def bootstrap_admin_token(settings: ServerSettings) -> str:
    """The configured admin token, else the one in ``<data_dir>/admin.token`` (created 0600 once)."""
    if settings.admin_token:
        return settings.admin_token
    path = Path(settings.data_dir) / TOKEN_FILE
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    token = new_token()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    log.warning("generated the bootstrap admin token in %s", path)
    return token


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization")
    if header is None:
        return None
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        raise ApiError(401, "invalid_token", "Authorization must be 'Bearer <token>'", _CHALLENGE)
    return value.strip()


_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def authenticate(request: Request) -> Principal:
    """Who is calling (cached on the request); 401 for a bad token, or a missing one when required."""
    cached = getattr(request.state, "principal", None)
    if isinstance(cached, Principal):
        return cached
    ctx = request.app.state.ctx
    token = _bearer(request)
    principal: Principal
    if token is None:
        if ctx.settings.auth_required:
            request.state.principal = Principal("unauthenticated", "")
            raise ApiError(401, "unauthenticated", "this route needs an API token (Bearer)", _CHALLENGE)
        principal = Principal("anonymous", "admin")
    elif hmac.compare_digest(hash_token(token), ctx.admin_token_hash):
        principal = Principal("bootstrap-admin", "admin")
    else:
        with new_session(ctx.engine) as session:
            row = session.exec(select(ApiToken).where(ApiToken.token_hash == hash_token(token))).first()
        if row is None or row.revoked_at is not None:
            request.state.principal = Principal("invalid-token", "")
            raise ApiError(401, "invalid_token", "unknown or revoked API token", _CHALLENGE)
        principal = Principal(f"{row.id}:{row.name}", row.role)
    request.state.principal = principal
    return principal


def require(role: str) -> Callable[[Request], Principal]:
    """A route dependency: the caller must hold ``role`` or a higher one."""
    if role not in RANK:
        raise ValueError(f"unknown role {role!r}")

    def dependency(request: Request) -> Principal:
        principal = authenticate(request)
        if RANK.get(principal.role, -1) < RANK[role]:
            raise ApiError(
                403, "forbidden", f"{principal.actor} ({principal.role}) may not do this: needs {role}"
            )
        return principal

    dependency.__name__ = f"require_{role}"
    return dependency


def record_audit(engine: Engine, entry: AuditEntry) -> None:
    with new_session(engine) as session:
        session.add(entry)
        session.commit()


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


__all__ = [
    "ROLES",
    "AuditMiddleware",
    "Principal",
    "authenticate",
    "bootstrap_admin_token",
    "hash_token",
    "new_token",
    "require",
]
