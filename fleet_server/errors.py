"""Errors in the contract's shape: ``{"detail": {"code": "<snake_case>", "message": "..."}}``.

Services (releases, devices, tokens, rollouts) raise a :class:`DomainError`
subclass naming what went wrong; the HTTP layer maps each class to its status
in one exception handler (``fleet_server.routes.errors``), so no service
imports FastAPI to say "not found". :class:`ApiError` stays for what only the
HTTP layer knows (authentication, request framing, body limits).
"""

from __future__ import annotations

from typing import ClassVar

from fastapi import HTTPException


class DomainError(Exception):
    """A request the service refuses; ``code`` is the stable snake_case reason on the wire."""

    status_code: ClassVar[int] = 400

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Rejected(DomainError):
    """The input is refused as given: malformed, or failing a signature or integrity check.

    Trust failures keep the ``signing`` error's code (``digest_mismatch``,
    ``unknown_key``, ...) so a client can tell a tampered bundle from a typo.
    """

    status_code = 400


class NotFound(DomainError):
    status_code = 404


class Conflict(DomainError):
    """The request is well formed but the current state does not allow it."""

    status_code = 409


class Invalid(DomainError):
    """The request names things that cannot work together (unknown model, bad selector, ...)."""

    status_code = 422


class Forbidden(DomainError):
    status_code = 403


class TooLarge(DomainError):
    status_code = 413


class ApiError(HTTPException):
    def __init__(
        self, status_code: int, code: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(status_code, detail={"code": code, "message": message}, headers=headers)
        self.code = code
