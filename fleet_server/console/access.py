"""Who is using the console and may they: the session behind a request, and the checks every
state-changing form goes through (same origin, the session's CSRF token, the role).

The session cookie is read and re-checked against the token store on every request
(``signed_in``); a POST that changes something passes ``acting`` first, whose role check is
the API's own ``ensure_role``.
"""

from __future__ import annotations

from typing import Annotated
from urllib.parse import urlsplit

from fastapi import Depends, Request

from fleet_server.auth import Principal, ensure_role, principal_of
from fleet_server.console.session import COOKIE, ConsoleSession, SessionCodec, SessionRefused
from fleet_server.context import ServerContext
from fleet_server.errors import ApiError


class NeedsSignIn(Exception):
    """No valid session: the handler in ``fleet_server.console`` sends the browser to sign in."""

    def __init__(self, why: str = "") -> None:
        super().__init__(why)
        self.why = why


class Refused(Exception):
    """A 403 page: a missing or wrong CSRF token, or a role too small for the action."""

    def __init__(self, message: str, user: User | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.user = user


class User:
    """The signed-in caller of one request: who, with which role, and their session's CSRF token."""

    def __init__(self, principal: Principal, session: ConsoleSession, csrf: str) -> None:
        self.principal = principal
        self.session = session
        self.csrf = csrf

    @property
    def can_act(self) -> bool:
        return self.principal.role in ("operator", "admin")


def ctx_of(request: Request) -> ServerContext:
    c: ServerContext = request.app.state.ctx
    return c


def codec_of(request: Request) -> SessionCodec:
    codec: SessionCodec = request.app.state.console_codec
    return codec


def signed_in(request: Request) -> User:
    """The caller's session, re-checked against the token store on every request."""
    value = request.cookies.get(COOKIE)
    if not value:
        raise NeedsSignIn()
    codec = codec_of(request)
    try:
        session = codec.read(value)
    except SessionRefused as exc:
        raise NeedsSignIn(str(exc)) from None
    principal = principal_of(ctx_of(request), session.token_hash)
    if principal is None or principal.role not in ("viewer", "operator", "admin"):
        raise NeedsSignIn("the token of this session was revoked or may not read: sign in again")
    request.state.principal = principal  # the audit log names the caller
    return User(principal, session, codec.csrf_token(session))


SignedIn = Annotated[User, Depends(signed_in)]


def same_origin(request: Request) -> bool:
    """A browser names the page a POST came from (``Origin``); it must be this server's host.

    Only the host name is compared: behind a proxy that ends TLS the scheme seen here is not the
    browser's, and a proxy may pass ``Host`` without the port the browser used. No ``Origin``
    (an older client, curl) passes: the CSRF token still holds.
    """
    origin = request.headers.get("origin")
    if origin is None:
        return True
    host = urlsplit(f"//{request.headers.get('host', '')}").hostname
    return urlsplit(origin).hostname == host


def acting(request: Request, user: User, csrf: str | None, role: str = "operator") -> None:
    """A state-changing POST: from this site, with the session's CSRF token, and a role that allows it."""
    if not same_origin(request) or not codec_of(request).csrf_ok(user.session, csrf):
        request.state.error_code = "csrf_failed"
        raise Refused(
            "this form is stale or did not come from the console (CSRF check failed):"
            " reload the page and try again",
            user,
        )
    try:
        ensure_role(user.principal, role)
    except ApiError as exc:
        request.state.error_code = "forbidden"
        message = exc.detail["message"] if isinstance(exc.detail, dict) else str(exc.detail)
        raise Refused(f"{message}. Ask an operator or an admin.", user) from None


__all__ = [
    "NeedsSignIn",
    "Refused",
    "SignedIn",
    "User",
    "acting",
    "codec_of",
    "ctx_of",
    "same_origin",
    "signed_in",
]
