"""What every route module shares: the context and session dependencies, the two router kinds,
and the paging parameters (``Limit``, ``Cursor``) and page body (``page_out``) of every list.

Handlers are plain ``def`` (FastAPI runs them in its thread pool) and open one
short session each, so no session is shared between threads. Every router is
made here with ``GuardedRoute`` (auth before the body, bounded bodies) and the
error responses it can give, so the OpenAPI document is complete and no route
can be added without the guard.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Annotated, TypeVar

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel
from sqlmodel import Session

from fleet_server.auth import require
from fleet_server.context import ServerContext
from fleet_server.paging import DEFAULT_LIMIT, MAX_CURSOR_LENGTH, MAX_LIMIT, Page
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


Limit = Annotated[
    int,
    Query(
        ge=1,
        le=MAX_LIMIT,
        description=f"most entries on this page, 1 to {MAX_LIMIT} (default {DEFAULT_LIMIT}); a page holds"
        " fewer only when it is the last",
    ),
]
Cursor = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=MAX_CURSOR_LENGTH,
        pattern="^[A-Za-z0-9_-]+$",
        description="where this page starts: the 'next' of the previous page, passed back unchanged with"
        " the same filters; omit it for the first page. Anything else is a 400 invalid_cursor",
    ),
]

Row = TypeVar("Row")
Out = TypeVar("Out", bound=BaseModel)


def page_out(page_type: type[Out], rows: Page[Row], out: Callable[[Row], BaseModel]) -> Out:
    """The response body of a list: its rows as their response models, and the next cursor."""
    return page_type.model_validate({"items": [out(r) for r in rows.items], "next": rows.next})


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


__all__ = [
    "ADMIN",
    "API",
    "OPERATOR",
    "Ctx",
    "Cursor",
    "Db",
    "Limit",
    "admin_router",
    "ctx",
    "db",
    "page_out",
    "public_router",
]
