"""Who is calling the admin API, and may they: bearer tokens, roles, the bootstrap admin token.

Bearer tokens (``Authorization: Bearer ef_...``) with one of three roles,
ordered: ``viewer`` (read), ``operator`` (devices, models, rollouts),
``admin`` (tokens), or the side role ``labeler``: it may post labels and
nothing else (not even read), so the app or labelling service that feeds
ground truth back holds no key to the fleet. Operators and admins may post
labels too; a viewer may not (labels move the accuracy gate). Only a
token's SHA-256 is stored (``fleet_server.tokens``).
The bootstrap admin token comes from ``ServerSettings.admin_token`` or is
generated once into ``<data_dir>/admin.token`` (0600) and is compared in
memory, never stored in the database. Without a token the answer is 401 when
``auth_required`` is on; with it off, a call without a token passes as
``anonymous`` (a token that is sent is still checked, so a wrong one is always
401). A known token with too small a role is 403.

A route states the role it needs with ``Depends(require(role))``. The route
guard (``fleet_server.routes.guard``) reads that declaration and checks it
before the request body is read; the dependency itself then finds the caller
already on the request, and is the check of last resort for any route the
guard does not wrap.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.dependencies.models import Dependant
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import select

from fleet_server.errors import ApiError
from fleet_server.models import ApiToken
from fleet_server.settings import ServerSettings
from fleet_server.store import new_session

if TYPE_CHECKING:
    from fleet_server.context import ServerContext

log = logging.getLogger(__name__)

ROLES = ("viewer", "operator", "admin")  # ordered: each may do what the ones before it may
LABELER = "labeler"  # outside the order: posts labels only
# who satisfies a route's declared role
GRANTS: dict[str, frozenset[str]] = {
    **{role: frozenset(ROLES[i:]) for i, role in enumerate(ROLES)},
    LABELER: frozenset({LABELER, "operator", "admin"}),
}
# which declaration wins when a route's dependencies declare several (the strictest)
_STRENGTH = {"viewer": 0, LABELER: 1, "operator": 2, "admin": 3}
TOKEN_ROLES = (*ROLES, LABELER)
TOKEN_FILE = "admin.token"
_CHALLENGE = {"WWW-Authenticate": "Bearer"}

# Declares the scheme in /openapi.json (clients and fuzzers learn which routes need a token);
# it never refuses by itself: ``authenticate`` does, with the contract's error codes.
bearer_scheme = HTTPBearer(auto_error=False, description="an API token: Bearer ef_...")


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


def authenticate(request: Request) -> Principal:
    """Who is calling (cached on the request); 401 for a bad token, or a missing one when required.

    A refused caller is recorded on the request too, so the audit log names it.
    May query the database: call it from a worker thread, not the event loop.
    """
    cached = getattr(request.state, "principal", None)
    if isinstance(cached, Principal) and cached.role:
        return cached
    ctx = request.app.state.ctx
    token = _bearer(request)
    principal: Principal
    if token is None:
        if ctx.settings.auth_required:
            request.state.principal = Principal("unauthenticated", "")
            raise ApiError(401, "unauthenticated", "this route needs an API token (Bearer)", _CHALLENGE)
        principal = Principal("anonymous", "admin")
    else:
        known = principal_of(ctx, hash_token(token))
        if known is None:
            request.state.principal = Principal("invalid-token", "")
            raise ApiError(401, "invalid_token", "unknown or revoked API token", _CHALLENGE)
        principal = known
    request.state.principal = principal
    return principal


def principal_of(ctx: ServerContext, token_hash: str) -> Principal | None:
    """Who holds the token with this SHA-256 now: None when it is unknown or revoked.

    The one lookup behind both the bearer token and the console's session cookie (which carries
    the hash), so revoking a token ends its console sessions on their next request too.
    May query the database: call it from a worker thread, not the event loop.
    """
    if hmac.compare_digest(token_hash, ctx.admin_token_hash):
        return Principal("bootstrap-admin", "admin")
    with new_session(ctx.engine) as session:
        row = session.exec(select(ApiToken).where(ApiToken.token_hash == token_hash)).first()
    if row is None or row.revoked_at is not None:
        return None
    return Principal(f"{row.id}:{row.name}", row.role)


def ensure_role(principal: Principal, role: str) -> None:
    """403 unless ``principal`` holds ``role`` or one that grants it (``GRANTS``)."""
    if principal.role not in GRANTS[role]:
        raise ApiError(
            403, "forbidden", f"{principal.actor} ({principal.role}) may not do this: needs {role}"
        )


@dataclass(frozen=True)
class Require:
    """A route dependency: the caller must hold ``role`` or a higher one."""

    role: str

    def __call__(
        self,
        request: Request,
        _credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer_scheme)],
    ) -> Principal:
        principal = authenticate(request)
        ensure_role(principal, self.role)
        return principal


def require(role: str) -> Require:
    if role not in GRANTS:
        raise ValueError(f"unknown role {role!r}")
    return Require(role)


def required_role(dependant: Dependant) -> str | None:
    """The highest role any ``require`` in a route's dependency tree asks for (None: a public route)."""
    roles = [d.call.role for d in _walk(dependant) if isinstance(d.call, Require)]
    return max(roles, key=_STRENGTH.__getitem__) if roles else None


def _walk(dependant: Dependant) -> Iterator[Dependant]:
    stack = [dependant]
    while stack:
        node = stack.pop()
        yield node
        stack.extend(node.dependencies)


__all__ = [
    "GRANTS",
    "LABELER",
    "ROLES",
    "TOKEN_ROLES",
    "Principal",
    "Require",
    "authenticate",
    "bootstrap_admin_token",
    "ensure_role",
    "hash_token",
    "new_token",
    "principal_of",
    "require",
    "required_role",
]
