"""This server itself: ``/healthz`` (public, for load balancers), ``/api/v1/stats``, ``/api/v1/server``."""

from __future__ import annotations

from fleet_server.migrate import current_revision
from fleet_server.routes.common import Ctx, admin_router, public_router
from fleet_server.schemas import HealthOut, ServerOut, StatsOut

health_router = public_router("", tags=["server"])
router = admin_router(tags=["server"])


@health_router.get("/healthz", response_model=HealthOut, summary="Health check")
def healthz() -> HealthOut:
    """The server answers HTTP; no token needed (for load balancers and container health checks)."""
    return HealthOut(status="ok")


@router.get("/stats", response_model=StatsOut, summary="Ingest counters")
def stats(c: Ctx) -> StatsOut:
    """This process's ingest counters (summed over its ingest workers)."""
    return StatsOut.model_validate(c.counters.snapshot())


@router.get("/server", response_model=ServerOut, summary="This replica")
def server_info(c: Ctx) -> ServerOut:
    """This replica: whether it drives the rollout engine (leader), its database and schema revision."""
    return ServerOut(
        replica=c.bridge.client_id if c.bridge is not None else "",
        leader=c.ticker.is_leader if c.ticker is not None else False,
        database=c.engine.dialect.name,
        schema_revision=current_revision(c.engine),
        mqtt_connected=c.bridge.connected if c.bridge is not None else False,
    )
