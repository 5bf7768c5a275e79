"""Put a router's routes on an app as the route objects they already are.

FastAPI's ``include_router`` keeps the router behind a wrapper and derives each route's request
handling again for every app that includes it (parameter models, dependency tree, response
field), at the first request that walks past the route, and every later request walks through
the wrappers too (docs/decisions/0009 has the cost). A server process builds one app; the test
suite builds hundreds.

Our routers need nothing an app would add: each carries its own prefix, tags, route class and
error responses, and no app overrides dependencies (``app.dependency_overrides`` would not reach
these routes). So the routes built once at import serve every app as they are, in the order
given. A router that holds another router is refused: its routes would need the wrapper's path
and context composition.
"""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from starlette.routing import BaseRoute, Mount, Route


def mount_routes(app: FastAPI, router: APIRouter) -> None:
    """Serve ``router``'s routes on ``app`` after those it serves already."""
    routes: list[BaseRoute] = list(router.routes)
    for route in routes:
        if not isinstance(route, Route | Mount):
            raise TypeError(
                f"{type(route).__name__} in {router!r}: only plain routes can be mounted as they are"
            )
    app.router.routes.extend(routes)


__all__ = ["mount_routes"]
