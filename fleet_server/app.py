"""``create_app(settings)``: the FastAPI app whose lifespan runs the MQTT bridge and the engine ticker."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from fleet_server.api import device_router, health, router, validation_error_response
from fleet_server.artifacts import load_trust
from fleet_server.auth import AuditMiddleware, bootstrap_admin_token, hash_token
from fleet_server.auth_api import audit_router, tokens_router
from fleet_server.context import ServerContext
from fleet_server.drift_api import drift_router
from fleet_server.errors import ApiError
from fleet_server.mqtt_bridge import MqttBridge
from fleet_server.settings import ServerSettings
from fleet_server.store import make_engine
from fleet_server.ticker import Ticker
from fleet_server.tuf_api import release_router, static_router
from fleet_server.tuf_service import TufService
from signing.keyring import KeyDir

log = logging.getLogger(__name__)


def create_app(settings: ServerSettings | None = None) -> FastAPI:
    """Build the app; the database schema is created here, MQTT and the ticker start with the lifespan."""
    settings = settings or ServerSettings()
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    context = ServerContext(
        settings=settings, engine=make_engine(settings), trust=load_trust(settings.keys_dir)
    )
    fleet_key = KeyDir(Path(settings.keys_dir)).key("fleet")
    context.admin_token = bootstrap_admin_token(settings)
    context.admin_token_hash = hash_token(context.admin_token)
    try:
        context.tuf = TufService(
            settings.tuf_dir,
            settings.keys_dir,
            fleet_key,
            timestamp_expiry=timedelta(seconds=settings.tuf_timestamp_expiry_seconds),
            snapshot_expiry=timedelta(seconds=settings.tuf_snapshot_expiry_seconds),
        )
    except FileNotFoundError as exc:  # a key directory from before TUF: serve DSSE-only, say so loudly
        log.error(
            "no TUF root chain in %s (%s): TUF delivery is off (409 tuf_disabled)", settings.keys_dir, exc
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bridge = MqttBridge(settings, context.engine, context.counters, context.trust.fleet_keys)
        ticker = Ticker(settings, context.engine, bridge.publish_desired, fleet_key, context.lock)
        context.bridge, context.ticker = bridge, ticker
        bridge.start(is_leader=lambda: ticker.is_leader)
        ticker.start()
        if context.tuf is not None:
            context.tuf.start(settings.tuf_refresh_interval)
        try:
            yield
        finally:
            if context.tuf is not None:
                context.tuf.stop()
            ticker.stop()
            bridge.stop()
            context.engine.dispose()

    app = FastAPI(title="edgefleet fleet server", version="0.1.0", lifespan=lifespan)
    app.state.ctx = context
    app.include_router(health)
    app.include_router(router)
    app.include_router(device_router)
    app.include_router(release_router)
    app.include_router(tokens_router)
    app.include_router(audit_router)
    app.include_router(drift_router)
    app.include_router(static_router)
    app.add_middleware(AuditMiddleware, engine=context.engine)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        request.state.error_code = exc.code  # the audit log records the reason, not only the status
        return await http_exception_handler(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        _request.state.error_code = "invalid_request"
        return validation_error_response(errors or "invalid request")

    return app
