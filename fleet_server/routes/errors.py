"""The one exception handler: every error leaves the server as ``{"detail": {"code", "message"}}``.

Services raise :class:`~fleet_server.errors.DomainError` subclasses (their
class says the status); the HTTP layer raises :class:`~fleet_server.errors.ApiError`;
FastAPI and Starlette raise their own ``HTTPException`` (unknown path, wrong
method, a body that is not JSON or not multipart) and ``RequestValidationError``.
All of them, and any unexpected exception (500), are rendered here, so a
client parses one error shape whatever failed. The code is also put on the
request state, where the audit log reads it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from fleet_server.errors import DomainError
from fleet_server.schemas import ErrorOut

# Codes for errors raised with a plain-text detail by FastAPI or Starlette themselves.
_CODES = {
    400: "invalid_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
}
_DESCRIPTIONS = {
    400: "bad input (code invalid_request) or a failed trust check (code: the signing error's)",
    401: "no or invalid API token",
    403: "the token's role may not do this",
    404: "not found",
    409: "conflict with the current state",
    413: "the request body is larger than this route accepts",
    422: "well formed, but names things that cannot work together",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries: these statuses, and every other 4xx, answer with ``ErrorOut``.

    The ``4XX`` entry also keeps FastAPI from documenting its own 422 body, which
    this server never sends (validation errors are 400 ``invalid_request``).
    """
    named: dict[int | str, dict[str, Any]] = {
        s: {"model": ErrorOut, "description": _DESCRIPTIONS.get(s, "error")} for s in statuses
    }
    return {"4XX": {"model": ErrorOut, "description": "any other client error"}, **named}


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse({"detail": {"code": code, "message": message}}, status_code=status, headers=headers)


def install_error_handler(app: FastAPI, allowed_methods: Callable[[str], Sequence[str]]) -> None:
    """Route every error through :func:`handle`; ``allowed_methods(path)`` answers a 405's ``Allow``."""

    async def handle(request: Request, exc: Exception) -> JSONResponse:
        status, code, message, headers = _describe(exc)
        if status == 405:
            # Starlette names only the methods of the first route on the path; a client needs all
            headers = {**(headers or {}), "Allow": ", ".join(allowed_methods(request.url.path))}
        request.state.error_code = code
        return error_response(status, code, message, headers)

    for exc_class in (DomainError, HTTPException, RequestValidationError, Exception):
        app.add_exception_handler(exc_class, handle)


def _describe(exc: Exception) -> tuple[int, str, str, dict[str, str] | None]:
    if isinstance(exc, DomainError):
        return exc.status_code, exc.code, exc.message, None
    if isinstance(exc, RequestValidationError):
        return 400, "invalid_request", _validation_message(exc), None
    if isinstance(exc, HTTPException):
        headers = dict(exc.headers) if exc.headers else None
        detail = exc.detail
        if isinstance(detail, dict) and {"code", "message"} <= detail.keys():
            return exc.status_code, str(detail["code"]), str(detail["message"]), headers
        code = _CODES.get(exc.status_code, f"http_{exc.status_code}")
        return exc.status_code, code, str(detail), headers
    # Unexpected: the details stay in the server log (Starlette re-raises after this answer).
    return 500, "internal_error", "internal server error", None


def _validation_message(exc: RequestValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()]
    return "; ".join(parts) or "invalid request"


__all__ = ["error_response", "error_responses", "install_error_handler"]
