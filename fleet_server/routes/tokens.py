"""``/api/v1/tokens`` (admin): API credentials; ``/api/v1/audit`` (viewer): the trail of every change."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Query, Request

from fleet_server import tokens
from fleet_server.audit import audit_entries
from fleet_server.auth import Principal, require
from fleet_server.models import ApiToken
from fleet_server.routes.common import ADMIN, API, Ctx, admin_router
from fleet_server.routes.errors import error_responses
from fleet_server.routes.guard import INT64_MAX
from fleet_server.schemas import AuditOut, TokenIn, TokenOut

router = admin_router(f"{API}/tokens", tags=["tokens"])
audit_router = admin_router(f"{API}/audit", tags=["audit"])

Admin = Annotated[Principal, Depends(require("admin"))]


def token_out(row: ApiToken, secret: str | None = None) -> TokenOut:
    return TokenOut.model_validate(row, from_attributes=True).model_copy(update={"token": secret})


@router.post("", status_code=201, response_model=TokenOut, responses=error_responses(413))
def create_token(body: TokenIn, request: Request, c: Ctx, who: Admin) -> TokenOut:
    row, secret = tokens.create_token(c.engine, body.name, body.role, created_by=who.actor)
    request.state.audit_detail = f"token {row.id} ({row.name}, {row.role})"
    return token_out(row, secret)


@router.get("", response_model=list[TokenOut], dependencies=ADMIN)
def list_tokens(c: Ctx) -> list[TokenOut]:
    return [token_out(r) for r in tokens.list_tokens(c.engine)]


@router.delete("/{token_id}", response_model=TokenOut, responses=error_responses(404), dependencies=ADMIN)
def revoke_token(token_id: str, request: Request, c: Ctx) -> TokenOut:
    """Revoke (idempotent): the token stops working at once; the row stays for the audit trail."""
    row = tokens.revoke_token(c.engine, token_id)
    request.state.audit_detail = f"token {token_id}"
    return token_out(row)


@audit_router.get("", response_model=list[AuditOut])
def list_audit(
    c: Ctx,
    limit: Annotated[int, Query(ge=1, le=10000)] = 200,
    after_id: Annotated[int, Query(ge=0, le=INT64_MAX)] = 0,
    actor: Annotated[str | None, Query(max_length=160)] = None,
) -> list[AuditOut]:
    """Oldest first from ``after_id`` (page with the last id you saw)."""
    rows = audit_entries(c.engine, after_id=after_id, limit=limit, actor=actor)
    return [AuditOut.model_validate(r, from_attributes=True) for r in rows]
