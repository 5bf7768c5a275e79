"""The fleet server's HTTP routes, one module per resource (docs/contracts.md lists them).

``ROUTERS`` is everything the app mounts; ``allowed_methods`` answers which
methods a path supports (a 405's ``Allow``), from the same routes.
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.routing import APIRoute

from fleet_server.routes import (
    captures,
    delivery,
    devices,
    drift,
    labels,
    models,
    rollouts,
    server,
    slos,
    telemetry,
    tokens,
)

ROUTERS: tuple[APIRouter, ...] = (
    server.health_router,
    devices.router,
    drift.router,
    models.router,
    models.artifacts_router,
    rollouts.router,
    slos.router,
    telemetry.router,
    labels.router,
    captures.router,
    captures.list_router,
    tokens.router,
    tokens.audit_router,
    delivery.release_router,
    delivery.static_router,
    delivery.mirror_router,
    server.router,
)


def allowed_methods(path: str) -> list[str]:
    """Every method some route serves at ``path``, as a 405's ``Allow`` must list them."""
    methods = {
        method
        for router in ROUTERS
        for route in router.routes
        if isinstance(route, APIRoute) and route.path_regex.match(path)
        for method in route.methods or ()
    }
    return sorted(methods)


__all__ = ["ROUTERS", "allowed_methods"]
