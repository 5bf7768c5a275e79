"""``GuardedRoute``: every API route checks its caller before it reads a byte of the body.

FastAPI reads (and spools to disk) a request body before it runs a route's
dependencies, so an auth dependency alone lets anyone who reaches the port
stream gigabytes before the 401. A ``GuardedRoute`` checks first, in the
handler FastAPI runs after routing and before it touches the body:

1. the role the route declares (``Depends(require(role))``, read from its
   dependency tree, so the declaration has one home) is checked from the
   headers alone: 401/403 right away;
2. the body is bounded: ``Content-Length`` over the limit is a 413 at once,
   and the bytes actually received are counted, so a chunked body or a
   client that lies is cut off at the limit too. Multipart routes (uploads)
   get the upload limit, every other body the request limit
   (``ServerContext.limits``);
3. JSON bodies are parsed by ``signing.safejson`` (bounded size and depth:
   the stdlib parser dies with ``RecursionError`` on deep nesting), and
   integers outside a signed 64-bit range or NaN/Infinity are refused, since
   every integer ends in a BIGINT column at most and NaN is not JSON.

A refusal sent while the client is still sending carries ``Connection:
close``: the server then drops the connection instead of reading the rest of
the body only to discard it. All refusals are ``ApiError``s, rendered in the
contract's shape by the one exception handler.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Coroutine
from typing import Any, Literal

from fastapi import params
from fastapi.routing import APIRoute
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Message, Receive

from fleet_server.auth import authenticate, ensure_role, required_role
from fleet_server.context import BodyLimits
from fleet_server.errors import ApiError
from signing import safejson

INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1

BodyKind = Literal["none", "json", "upload"]


class GuardedRoute(APIRoute):
    """An ``APIRoute`` that authenticates, then bounds and safely parses its body (see the module doc).

    The guard sits in the route handler FastAPI builds (``get_route_handler``),
    which every way of mounting the route goes through, and runs before the
    handler reads the body. Roles are read from the route's own dependencies
    (its router's and its decorator's), so declare them there, not when
    including the router.
    """

    required_role: str | None = None
    body_kind: BodyKind = "none"
    raw_body: bool = False  # the handler reads the body itself (bounded as JSON is)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        role = self.required_role = required_role(self.dependant)
        kind = self.body_kind = _body_kind(self)

        async def guarded(request: Request) -> Response:
            limits: BodyLimits = request.app.state.ctx.limits
            limit = limits.upload if kind == "upload" else limits.request
            announced = _content_length(request.headers)
            try:
                if role is not None:
                    # a token lookup may query the database: keep it off the event loop
                    ensure_role(await run_in_threadpool(authenticate, request), role)
                if kind != "none" and announced is not None and announced > limit:
                    raise _too_large(limit)
            except ApiError as exc:
                if announced or "transfer-encoding" in request.headers:  # the client is still sending
                    exc.headers = {**(exc.headers or {}), "Connection": "close"}
                raise
            receive = request.receive if kind == "none" else _counted(request.receive, limit)
            return await handler(_BoundedJsonRequest(request.scope, receive))

        return guarded


def _body_kind(route: APIRoute) -> BodyKind:
    if getattr(route, "raw_body", False):
        return "json"
    body = route.dependant.body_params
    if not body:
        return "none"  # FastAPI never reads it: nothing to bound
    return "upload" if any(isinstance(p.field_info, params.Form) for p in body) else "json"


def _content_length(headers: Headers) -> int | None:
    try:
        return int(headers["content-length"])
    except (KeyError, ValueError):
        return None  # absent (chunked, or no body); a malformed one never gets past the HTTP parser


def _too_large(limit: int) -> ApiError:
    return ApiError(413, "body_too_large", f"the request body exceeds {limit} bytes", {"Connection": "close"})


def _counted(receive: Receive, limit: int) -> Receive:
    received = 0

    async def counted() -> Message:
        nonlocal received
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                raise _too_large(limit)
        return message

    return counted


class _BoundedJsonRequest(Request):
    """A request whose ``json()`` is bounded in size, depth and number range."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            limits: BodyLimits = self.app.state.ctx.limits
            try:
                value = safejson.loads(body, max_bytes=limits.request)
            except safejson.JsonError as exc:
                raise ApiError(400, "invalid_request", f"request body: {exc}") from None
            _check_numbers(value)
            self._json = value
        return self._json


def _check_numbers(value: Any) -> None:
    """Refuse integers outside int64 and non-finite floats anywhere in a parsed document."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, bool):
            continue
        elif isinstance(node, int) and not INT64_MIN <= node <= INT64_MAX:
            raise ApiError(400, "invalid_request", "request body: an integer is outside the 64-bit range")
        elif isinstance(node, float) and not math.isfinite(node):
            raise ApiError(400, "invalid_request", "request body: NaN and Infinity are not JSON numbers")


class RawBodyRoute(GuardedRoute):
    """A guarded route whose handler reads its (bounded) body as bytes: a signed upload, whose
    signature covers the bytes as sent, not a re-encoding of what a parser made of them."""

    raw_body = True


__all__ = ["INT64_MAX", "INT64_MIN", "GuardedRoute", "RawBodyRoute"]
