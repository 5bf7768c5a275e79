"""``create_app(settings)``: the FastAPI app whose lifespan runs the MQTT bridge and the engine ticker."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from fleet_server.api import health, router, validation_error_response
from fleet_server.artifacts import load_trust
from fleet_server.context import ServerContext
from fleet_server.mqtt_bridge import MqttBridge
from fleet_server.settings import ServerSettings
from fleet_server.store import make_engine
from fleet_server.ticker import Ticker
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

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bridge = MqttBridge(settings, context.engine, context.counters)
        ticker = Ticker(settings, context.engine, bridge.publish_desired, fleet_key, context.lock)
        context.bridge, context.ticker = bridge, ticker
        bridge.start()
        ticker.start()
        try:
            yield
        finally:
            ticker.stop()
            bridge.stop()
            context.engine.dispose()

    app = FastAPI(title="edgefleet fleet server", version="0.1.0", lifespan=lifespan)
    app.state.ctx = context
    app.include_router(health)
    app.include_router(router)

    @app.exception_handler(RequestValidationError)
    async def _bad_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = "; ".join(
            f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}" for e in exc.errors()
        )
        return validation_error_response(errors or "invalid request")

    return app
