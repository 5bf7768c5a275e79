"""``/api/v1/tokens`` (admin) and ``/api/v1/audit`` (viewer): API credentials and the audit trail."""

from __future__ import annotations

import secrets
from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlmodel import col, select

from fleet_server.auth import Principal, hash_token, new_token, require
from fleet_server.context import ServerContext
from fleet_server.errors import ApiError
from fleet_server.models import ApiToken, AuditEntry, utcnow
from fleet_server.schemas import ErrorOut
from fleet_server.store import new_session

_ERRORS: dict[int | str, dict[str, object]] = {c: {"model": ErrorOut} for c in (400, 401, 403, 404)}
tokens_router = APIRouter(prefix="/api/v1/tokens", responses=_ERRORS)
audit_router = APIRouter(prefix="/api/v1/audit", responses=_ERRORS)

Admin = Annotated[Principal, Depends(require("admin"))]
Viewer = Annotated[Principal, Depends(require("viewer"))]


class TokenIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=128)
    role: Literal["admin", "operator", "viewer"]


class TokenOut(BaseModel):
    id: str
    name: str
    role: str
    created_at: datetime
    created_by: str
    revoked_at: datetime | None = None
    token: str | None = None  # only in the answer to the create call: it is never shown again


class AuditOut(BaseModel):
    id: int
    ts: datetime
    actor: str
    role: str
    method: str
    path: str
    status: int
    result: str
    detail: str


def _ctx(request: Request) -> ServerContext:
    context: ServerContext = request.app.state.ctx
    return context


def _out(row: ApiToken, token: str | None = None) -> TokenOut:
    return TokenOut(
        id=row.id,
        name=row.name,
        role=row.role,
        created_at=row.created_at,
        created_by=row.created_by,
        revoked_at=row.revoked_at,
        token=token,
    )


@tokens_router.post("", status_code=201, response_model=TokenOut)
def create_token(body: TokenIn, request: Request, who: Admin) -> TokenOut:
    token = new_token()
    row = ApiToken(
        id=secrets.token_hex(6),
        name=body.name,
        role=body.role,
        token_hash=hash_token(token),
        created_at=utcnow(),
        created_by=who.actor,
    )
    with new_session(_ctx(request).engine) as session:
        session.add(row)
        session.commit()
        session.refresh(row)
    request.state.audit_detail = f"token {row.id} ({row.name}, {row.role})"
    return _out(row, token)


@tokens_router.get("", response_model=list[TokenOut])
def list_tokens(request: Request, _who: Admin) -> list[TokenOut]:
    with new_session(_ctx(request).engine) as session:
        return [_out(r) for r in session.exec(select(ApiToken).order_by(col(ApiToken.created_at))).all()]


@tokens_router.delete("/{token_id}", response_model=TokenOut)
def revoke_token(token_id: str, request: Request, _who: Admin) -> TokenOut:
    """Revoke (idempotent): the token stops working at once; the row stays for the audit trail."""
    with new_session(_ctx(request).engine) as session:
        row = session.get(ApiToken, token_id)
        if row is None:
            raise ApiError(404, "token_not_found", f"no token {token_id}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            session.add(row)
            session.commit()
            session.refresh(row)
    request.state.audit_detail = f"token {token_id}"
    return _out(row)


@audit_router.get("", response_model=list[AuditOut])
def list_audit(
    request: Request,
    _who: Viewer,
    limit: Annotated[int, Query(ge=1, le=10000)] = 200,
    after_id: Annotated[int, Query(ge=0)] = 0,
    actor: str | None = None,
) -> list[AuditOut]:
    """Oldest first from ``after_id`` (page with the last id you saw)."""
    query = select(AuditEntry).where(col(AuditEntry.id) > after_id)
    if actor:
        query = query.where(AuditEntry.actor == actor)
    with new_session(_ctx(request).engine) as session:
        rows = session.exec(query.order_by(col(AuditEntry.id)).limit(limit)).all()
        return [AuditOut.model_validate(r, from_attributes=True) for r in rows]


__all__ = ["audit_router", "tokens_router"]
