"""``create_app(settings)``: the FastAPI app whose lifespan runs the MQTT bridge and the engine ticker.

The routes live in ``fleet_server.routes`` (one module per resource); every
error they or FastAPI raise is rendered by the one handler in
``fleet_server.routes.errors``.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path

from fastapi import FastAPI

from fleet_server.artifacts import load_trust
from fleet_server.audit import AuditMiddleware
from fleet_server.auth import bootstrap_admin_token, hash_token
from fleet_server.captures import load_device_ca
from fleet_server.console import install_console
from fleet_server.context import ServerContext
from fleet_server.keyload import load_fleet_key
from fleet_server.logs import RequestIdMiddleware
from fleet_server.metrics import make_registry
from fleet_server.mqtt_bridge import MqttBridge
from fleet_server.releases import make_publisher
from fleet_server.retrain import RetrainWatcher
from fleet_server.routes import ROUTERS, allowed_methods
from fleet_server.routes.docs_pages import install_docs
from fleet_server.routes.errors import install_error_handler
from fleet_server.routes.mount import mount_routes
from fleet_server.routes.openapi import install_openapi
from fleet_server.settings import ServerSettings
from fleet_server.slo_runner import SloRunner
from fleet_server.store import make_engine
from fleet_server.ticker import Ticker
from fleet_server.tuf_service import TufService
from signing.keys import KeyPair

log = logging.getLogger(__name__)


def create_app(settings: ServerSettings | None = None, fleet_key: KeyPair | None = None) -> FastAPI:
    """Build the app; the database schema is created here, MQTT and the ticker start with the lifespan.

    ``fleet_key``: the fleet key already loaded (and decrypted) by the caller; else it is loaded here."""
    settings = settings or ServerSettings()
    Path(settings.data_dir).mkdir(parents=True, exist_ok=True)
    context = ServerContext(
        settings=settings, engine=make_engine(settings), trust=load_trust(settings.keys_dir)
    )
    if fleet_key is None:
        fleet_key = load_fleet_key(settings)
    context.device_ca = load_device_ca(settings.device_ca_path)
    context.admin_token = bootstrap_admin_token(settings)
    context.admin_token_hash = hash_token(context.admin_token)
    context.publisher = make_publisher(settings, context.engine)
    try:
        context.tuf = TufService(
            settings.tuf_dir,
            settings.keys_dir,
            fleet_key,
            timestamp_expiry=timedelta(seconds=settings.tuf_timestamp_expiry_seconds),
            snapshot_expiry=timedelta(seconds=settings.tuf_snapshot_expiry_seconds),
            publisher=context.publisher,
        )
    except FileNotFoundError as exc:  # a key directory from before TUF: serve DSSE-only, say so loudly
        log.error(
            "no TUF root chain in %s (%s): TUF delivery is off (409 tuf_disabled)",
            settings.keys_dir,
            str(exc),
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        bridge = MqttBridge(settings, context.engine, context.counters, context.trust.fleet_keys)
        ticker = Ticker(
            settings,
            context.engine,
            bridge.publish_desired,
            fleet_key,
            context.lock,
            ingest_lag=lambda: bridge.ingest_lag,  # what the server is behind is not a device's delay
        )
        slo = SloRunner(context.engine, settings, lambda: ticker.is_leader)
        context.bridge, context.ticker, context.slo = bridge, ticker, slo
        bridge.reconciler.listeners.append(ticker.observe)  # a stage's last report wakes the engine
        bridge.start(is_leader=lambda: ticker.is_leader)
        ticker.start()
        slo.start()
        retrain = RetrainWatcher(settings, context.engine, lambda: ticker.is_leader)
        context.retrain = retrain
        retrain.start()
        if context.tuf is not None:
            context.tuf.start(settings.tuf_refresh_interval)
        # What is built by now lives as long as the server: take it out of the collector's walks.
        # Request bodies parsed into many dicts (a 7,000-label batch) reach the oldest generation
        # and set off full collections, each walking the whole heap (~190,000 objects here):
        # measured, GC was a third of the time a label batch took. gc.freeze is CPython's own
        # tool for a long-lived heap. Only a heap nobody froze is frozen here, and unfrozen on the
        # way out: a process that froze its own (an embedder, the test suite's workers, a fleet
        # started first) keeps it as it is, since unfreeze cannot tell their objects from ours.
        # (The first of two such owners to stop unfreezes the whole heap: gc has one frozen set.)
        froze = gc.get_freeze_count() == 0
        if froze:
            gc.freeze()
        try:
            yield
        finally:
            if froze:
                gc.unfreeze()
            if context.tuf is not None:
                context.tuf.stop()
            slo.stop()
            retrain.stop()
            ticker.stop()
            bridge.stop()
            context.engine.dispose()

    app = FastAPI(
        title="edgefleet fleet server", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None
    )
    install_openapi(app)
    install_docs(app)
    app.state.ctx = context
    for router in ROUTERS:
        mount_routes(app, router)
    install_console(app, settings)  # the web console under /ui: same process, same tokens
    # outermost: it records the outcome of every mutating call, refusals by the route guard included
    app.add_middleware(AuditMiddleware, engine=context.engine)
    # outside the audit: the request id is set before anything else runs and logged after it all
    app.add_middleware(RequestIdMiddleware)
    context.metrics = make_registry(context)
    install_error_handler(app, allowed_methods)
    return app
