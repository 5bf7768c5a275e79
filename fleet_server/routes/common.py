"""What every route module shares: the context and session dependencies and the two router kinds.

Handlers are plain ``def`` (FastAPI runs them in its thread pool) and open one
short session each, so no session is shared between threads. Every router is
made here with ``GuardedRoute`` (auth before the body, bounded bodies) and the
error responses it can give, so the OpenAPI document is complete and no route
can be added without the guard.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from sqlmodel import Session

from fleet_server.auth import require
from fleet_server.context import ServerContext
from fleet_server.routes.errors import error_responses
from fleet_server.routes.guard import GuardedRoute
from fleet_server.store import new_session

API = "/api/v1"


def ctx(request: Request) -> ServerContext:
    context: ServerContext = request.app.state.ctx
    return context


def db(c: Annotated[ServerContext, Depends(ctx)]) -> Iterator[Session]:
    with new_session(c.engine) as session:
        yield session


Ctx = Annotated[ServerContext, Depends(ctx)]
Db = Annotated[Session, Depends(db)]
OPERATOR = [Depends(require("operator"))]
ADMIN = [Depends(require("admin"))]


def admin_router(prefix: str = API, *, tags: list[str]) -> APIRouter:
    """Admin API routes: every one needs at least ``viewer``; mutating ones add ``OPERATOR``/``ADMIN``."""
    return APIRouter(
        prefix=prefix,
        tags=list(tags),
        route_class=GuardedRoute,
        dependencies=[Depends(require("viewer"))],
        responses=error_responses(400, 401, 403),
    )


def public_router(prefix: str, *, tags: list[str]) -> APIRouter:
    """Routes anyone may read: signed delivery data and health (docs/contracts.md, who reads what)."""
    return APIRouter(prefix=prefix, tags=list(tags), route_class=GuardedRoute, responses=error_responses(400))


__all__ = ["ADMIN", "API", "OPERATOR", "Ctx", "Db", "admin_router", "ctx", "db", "public_router"]
