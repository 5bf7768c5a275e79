"""``/api/v1/tokens`` (admin): API credentials; ``/api/v1/audit`` (viewer): the trail of every change."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Depends, Path, Query, Request
from pydantic import AwareDatetime

from fleet_server import tokens
from fleet_server.audit import AuditFilter, audit_entries
from fleet_server.auth import Principal, require
from fleet_server.models import ApiToken, AuditEntry
from fleet_server.paging import DEFAULT_LIMIT
from fleet_server.routes.common import ADMIN, API, Ctx, Cursor, Limit, admin_router, page_out
from fleet_server.routes.errors import error_responses
from fleet_server.routes.guard import INT64_MAX
from fleet_server.schemas import AuditOut, AuditPage, TokenIn, TokenOut, TokenPage

router = admin_router(f"{API}/tokens", tags=["tokens"])
audit_router = admin_router(f"{API}/audit", tags=["audit"])

Admin = Annotated[Principal, Depends(require("admin"))]


def token_out(row: ApiToken, secret: str | None = None) -> TokenOut:
    return TokenOut.model_validate(row, from_attributes=True).model_copy(update={"token": secret})


@router.post(
    "",
    status_code=201,
    response_model=TokenOut,
    responses=error_responses(413),
    summary="Create an API token",
)
def create_token(body: TokenIn, request: Request, c: Ctx, who: Admin) -> TokenOut:
    """Mint a token with a role; its secret is in this answer only (only its hash is stored)."""
    row, secret = tokens.create_token(c.engine, body.name, body.role, created_by=who.actor)
    request.state.audit_detail = f"token {row.id} ({row.name}, {row.role})"
    return token_out(row, secret)


@router.get("", response_model=TokenPage, dependencies=ADMIN, summary="List API tokens")
def list_tokens(
    c: Ctx,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
    role: Annotated[
        Literal["admin", "operator", "viewer", "labeler"] | None,
        Query(description="only tokens of this role"),
    ] = None,
) -> TokenPage:
    """Tokens oldest first, revoked ones included, never their secrets."""
    return page_out(TokenPage, tokens.list_tokens(c.engine, role, cursor=cursor, limit=limit), token_out)


@router.delete(
    "/{token_id}",
    response_model=TokenOut,
    responses=error_responses(404),
    dependencies=ADMIN,
    summary="Revoke an API token",
)
def revoke_token(
    token_id: Annotated[str, Path(description="the token's id (from the list)", examples=["a1b2c3d4e5f6"])],
    request: Request,
    c: Ctx,
) -> TokenOut:
    """Revoke (idempotent): the token stops working at once; the row stays for the audit trail."""
    row = tokens.revoke_token(c.engine, token_id)
    request.state.audit_detail = f"token {token_id}"
    return token_out(row)


def audit_out(row: AuditEntry) -> AuditOut:
    return AuditOut.model_validate(row, from_attributes=True)


@audit_router.get("", response_model=AuditPage, summary="Read the audit log")
def list_audit(
    c: Ctx,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
    after_id: Annotated[
        int,
        Query(
            ge=0,
            le=INT64_MAX,
            description="only entries with a larger id (0: from the first); a cursor given too also applies",
        ),
    ] = 0,
    actor: Annotated[
        str | None, Query(max_length=160, description="only calls by this actor (as the entries show it)")
    ] = None,
    method: Annotated[
        Literal["POST", "PUT", "PATCH", "DELETE"] | None, Query(description="only calls with this method")
    ] = None,
    path: Annotated[
        str | None,
        Query(
            min_length=1,
            max_length=512,
            description="only calls whose path starts with this, e.g. /api/v1/rollouts",
            examples=["/api/v1/rollouts"],
        ),
    ] = None,
    result: Annotated[
        str | None,
        Query(min_length=1, max_length=64, description="only calls with this result: ok or an error code"),
    ] = None,
    since: Annotated[
        AwareDatetime | None, Query(description="only calls at or after this time (ISO 8601 with offset)")
    ] = None,
    until: Annotated[
        AwareDatetime | None, Query(description="only calls before this time (ISO 8601 with offset)")
    ] = None,
) -> AuditPage:
    """Every mutating call (who, what, when, result), oldest first, a page at a time."""
    where = AuditFilter(
        actor=actor, method=method, path=path, result=result, since=since, until=until, after_id=after_id
    )
    return page_out(AuditPage, audit_entries(c.engine, where, cursor=cursor, limit=limit), audit_out)
