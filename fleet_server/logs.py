"""Structured logs: one JSON object a line, and a request id on every API call.

``RequestIdMiddleware`` (pure ASGI) takes the caller's ``X-Request-ID`` when it
is a sane token, or makes one, returns it in the answer's header, keeps it in a
context variable for every log line written while the call runs, and logs the
call itself (method, path, status, duration, who) when it ends: that line
replaces uvicorn's access log. ``JsonFormatter`` writes each record as JSON
with the request id, so a log pipeline (Loki, Elasticsearch, journald) can
filter one call's lines.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any

from fleet_server.auth import Principal

request_id: ContextVar[str] = ContextVar("request_id", default="")
access = logging.getLogger("edgefleet.access")
_SANE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """A log record as one JSON line: time, level, logger, message, request id, and any ``extra``."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        rid = getattr(record, "request_id", "") or request_id.get()
        if rid:
            out["request_id"] = rid
        for key, value in record.__dict__.items():
            if key not in _STANDARD and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


class RequestIdFilter(logging.Filter):
    """Stamps each record with the request id of the call that logs it, in the logging thread
    (a handler formats later, perhaps elsewhere, when the context is gone)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not getattr(record, "request_id", ""):
            record.request_id = request_id.get()
        return True


def uvicorn_log_config(fmt: str, level: str = "INFO") -> dict[str, Any]:
    """Logging for ``edgefleet server``: every logger through one handler, JSON or plain text;
    uvicorn's access log off (``RequestIdMiddleware`` logs each call with its id)."""
    formatter = (
        {"()": JsonFormatter}
        if fmt == "json"
        else {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"}
    )
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {
            # sys.stderr as it is at each record, not as it was when logging was configured
            "default": {"class": "device_agent.logs.StderrHandler", "formatter": "default"},
            "null": {"class": "logging.NullHandler"},
        },
        "root": {"handlers": ["default"], "level": level},
        "loggers": {
            "uvicorn": {"level": level},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"level": "WARNING", "propagate": False, "handlers": ["null"]},
        },
    }


class RequestIdMiddleware:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = dict(scope.get("headers") or []).get(b"x-request-id", b"").decode("latin-1")
        rid = given if _SANE_ID.match(given) else uuid.uuid4().hex
        token = request_id.set(rid)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Any) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                message = {
                    **message,
                    "headers": [*message.get("headers", []), (b"x-request-id", rid.encode())],
                }
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            state = scope.get("state") or {}
            principal = state.get("principal")
            access.info(
                "%s %s %d",
                scope["method"],
                scope["path"],
                status,
                extra={
                    "request_id": rid,
                    "method": scope["method"],
                    "path": scope["path"],
                    "status": status,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    "actor": principal.actor if isinstance(principal, Principal) else "",
                },
            )
            request_id.reset(token)
