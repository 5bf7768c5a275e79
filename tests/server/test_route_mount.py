"""The app serves the route objects its routers built at import, in order, with no wrapper between."""

from __future__ import annotations

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from starlette.routing import Mount, Route

from fleet_server.routes import ROUTERS
from fleet_server.routes.mount import mount_routes
from fleet_server.runner import ServerThread


def test_the_server_serves_every_routers_own_route_objects(server: ServerThread) -> None:
    served = server.app.routes
    assert all(isinstance(r, Route | Mount) for r in served), [type(r).__name__ for r in served]
    ids = [id(r) for r in served]
    ours = [id(r) for router in ROUTERS for r in router.routes]
    start = ids.index(ours[0])
    assert ids[start : start + len(ours)] == ours  # every route, the same object, in ROUTERS' order
    # and those objects serve this app's requests
    assert httpx.get(f"{server.url}/api/v1/devices", timeout=10).status_code == 200


def test_mounting_keeps_the_order_routes_were_given_in() -> None:
    first, second = APIRouter(), APIRouter()

    @first.get("/a")
    def a() -> str:
        return "a"

    @second.get("/a")
    def shadowed() -> str:
        return "second"

    app = FastAPI()
    mount_routes(app, first)
    mount_routes(app, second)
    served = [r for r in app.routes if isinstance(r, Route) and r.path == "/a"]
    assert served == [*first.routes, *second.routes]


def test_a_router_holding_another_router_is_refused_by_name() -> None:
    inner, outer = APIRouter(), APIRouter()

    @inner.get("/x")
    def x() -> str:
        return "x"

    outer.include_router(inner)
    with pytest.raises(TypeError, match="only plain routes"):
        mount_routes(FastAPI(), outer)
