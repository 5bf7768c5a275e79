"""API tokens: mint, list, revoke. Only a token's SHA-256 is stored; the secret is shown once."""

from __future__ import annotations

import secrets

from sqlalchemy import Engine
from sqlmodel import col, select

from fleet_server.auth import hash_token, new_token
from fleet_server.errors import NotFound
from fleet_server.models import ApiToken, utcnow
from fleet_server.paging import DEFAULT_LIMIT, Page, select_page
from fleet_server.store import new_session


def create_token(engine: Engine, name: str, role: str, created_by: str) -> tuple[ApiToken, str]:
    """Store a new token's hash; return its row and the secret (which nothing can recover later)."""
    secret = new_token()
    row = ApiToken(
        id=secrets.token_hex(6),
        name=name,
        role=role,
        token_hash=hash_token(secret),
        created_at=utcnow(),
        created_by=created_by,
    )
    with new_session(engine) as session:
        session.add(row)
        session.commit()
        session.refresh(row)
    return row, secret


def list_tokens(
    engine: Engine, role: str | None = None, *, cursor: str | None = None, limit: int = DEFAULT_LIMIT
) -> Page[ApiToken]:
    """One page of the tokens (with ``role``), oldest first; revoked ones stay listed."""
    query = select(ApiToken) if role is None else select(ApiToken).where(col(ApiToken.role) == role)
    order = [col(ApiToken.created_at), col(ApiToken.id)]
    with new_session(engine) as session:
        return select_page(session, query, order, "tokens", cursor, limit)


def revoke_token(engine: Engine, token_id: str) -> ApiToken:
    """Revoke (idempotent): the token stops working at once; the row stays for the audit trail."""
    with new_session(engine) as session:
        row = session.get(ApiToken, token_id)
        if row is None:
            raise NotFound("token_not_found", f"no token {token_id}")
        if row.revoked_at is None:
            row.revoked_at = utcnow()
            session.add(row)
            session.commit()
            session.refresh(row)
    return row


__all__ = ["create_token", "list_tokens", "revoke_token"]
