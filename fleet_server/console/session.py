"""The console's session cookie and CSRF tokens: stateless, signed, and tied to an API token.

A sign-in posts an API token once; the cookie then carries the token's SHA-256 (never the
token) and a random session id, signed with the server's console key (``itsdangerous``: HMAC-SHA256
with a timestamp, so the cookie also expires on the server's side, whatever the browser keeps).
Each request looks the hash up again (``fleet_server.auth.principal_of``): a revoked token ends
its sessions at once, and a changed role shows on the next page, with no session table.

CSRF: every form that changes something carries ``csrf_token(session)``, an HMAC of the session
id under the same key, compared in constant time on the POST. A page of another site can make
the browser post but cannot read the token; ``SameSite=Strict`` keeps the cookie off such posts
as a second wall.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from itsdangerous import BadSignature, SignatureExpired, URLSafeTimedSerializer

from fleet_server.settings import ServerSettings

COOKIE = "ef_console"
SECRET_FILE = "console.secret"
_SALT = "edgefleet-console-session"


@dataclass(frozen=True)
class ConsoleSession:
    """What a valid cookie says: whose token (its hash) and which sign-in (``sid``)."""

    token_hash: str
    sid: str


class SessionRefused(Exception):
    """A cookie that does not give a session; ``str()`` says why, for the sign-in page."""


def console_secret(settings: ServerSettings) -> bytes:
    """The configured console key, else ``<data_dir>/console.secret`` (created 0600 once)."""
    if settings.console_secret is not None:
        return settings.console_secret.get_secret_value().encode()
    path = Path(settings.data_dir) / SECRET_FILE
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if not existing:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another process of this server wrote it first: use theirs
            return path.read_text().strip().encode()
        existing = secrets.token_urlsafe(32)
        with os.fdopen(fd, "w") as fh:
            fh.write(existing + "\n")
    return existing.encode()


class SessionCodec:
    """Issues and reads session cookies and the CSRF token of each session."""

    def __init__(self, secret: bytes, max_age_seconds: float) -> None:
        if len(secret) < 16:
            raise ValueError("the console secret must be at least 16 bytes")
        self._serializer = URLSafeTimedSerializer(
            secret, salt=_SALT, signer_kwargs={"digest_method": hashlib.sha256}
        )
        self._csrf_key = hashlib.sha256(b"edgefleet-console-csrf\0" + secret).digest()
        self.max_age = int(max_age_seconds)

    def issue(self, token_hash: str) -> tuple[str, ConsoleSession]:
        """A new session for the token with this hash, and the cookie value that carries it."""
        session = ConsoleSession(token_hash=token_hash, sid=secrets.token_urlsafe(16))
        value = self._serializer.dumps({"t": session.token_hash, "s": session.sid})
        return str(value), session

    def read(self, value: str) -> ConsoleSession:
        """The session a cookie carries; ``SessionRefused`` when it is forged, altered or expired."""
        try:
            data = self._serializer.loads(value, max_age=self.max_age)
        except SignatureExpired:
            raise SessionRefused("your session expired: sign in again") from None
        except BadSignature:
            raise SessionRefused("the session cookie is not valid here: sign in again") from None
        if (
            not isinstance(data, dict)
            or not isinstance(data.get("t"), str)
            or not isinstance(data.get("s"), str)
        ):
            raise SessionRefused("the session cookie is not valid here: sign in again")
        return ConsoleSession(token_hash=data["t"], sid=data["s"])

    def csrf_token(self, session: ConsoleSession) -> str:
        return hmac.new(self._csrf_key, session.sid.encode(), hashlib.sha256).hexdigest()

    def csrf_ok(self, session: ConsoleSession, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(self.csrf_token(session), str(token))


__all__ = ["COOKIE", "ConsoleSession", "SessionCodec", "SessionRefused", "console_secret"]
