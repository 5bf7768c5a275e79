"""This server itself: ``/healthz`` (alive), ``/readyz`` (fit for traffic) and ``/metrics`` (public,
for load balancers, orchestrators and Prometheus), ``/api/v1/stats``, ``/api/v1/server``."""

from __future__ import annotations

import hmac
from typing import Annotated, Literal

from fastapi import Header, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from fleet_server.errors import ApiError
from fleet_server.metrics import exposition
from fleet_server.migrate import current_revision
from fleet_server.routes.common import Ctx, admin_router, public_router
from fleet_server.routes.errors import error_responses
from fleet_server.schemas import HealthOut, ReadyCheck, ReadyOut, ServerOut, StatsOut

health_router = public_router("", tags=["server"])
router = admin_router(tags=["server"])


@health_router.get("/healthz", response_model=HealthOut, summary="Health check")
def healthz() -> HealthOut:
    """The server answers HTTP; no token needed (for load balancers and container health checks)."""
    return HealthOut(status="ok")


@health_router.get(
    "/readyz",
    response_model=ReadyOut,
    responses={503: {"model": ReadyOut, "description": "a check failed"}},
    summary="Readiness check",
)
def readyz(c: Ctx) -> Response:
    """200 when the database answers and the broker connection is up, 503 with the failing checks
    otherwise; ingest lagging more than ``ready_max_ingest_lag_seconds`` makes it ``degraded`` but
    still 200 (see ``ReadyOut``). No token needed."""
    checks: dict[str, ReadyCheck] = {}
    try:
        with c.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["database"] = ReadyCheck(ok=True, detail=c.engine.dialect.name)
    except SQLAlchemyError as exc:
        checks["database"] = ReadyCheck(ok=False, detail=f"{type(exc).__name__}: {exc}"[:200])
    # With several broker shards, one being down is the same for every replica: keep serving the API
    # (the devices on the other shards go on); ready while connected to at least one.
    shards = c.bridge.shard_connected() if c.bridge is not None else {}
    down = sorted(name for name, up in shards.items() if not up)
    # one broker: the main client and every ingest worker must be on it
    sharded = len(shards) > 1
    connected = len(down) < len(shards) if sharded else c.bridge is not None and c.bridge.connected
    if sharded and down:
        detail = f"not connected to {', '.join(down)}" if connected else "not connected"
    else:
        detail = "connected" if connected else "not connected"
    checks["broker"] = ReadyCheck(ok=connected, detail=detail)
    lag, limit = (c.bridge.ingest_lag if c.bridge else 0.0), c.settings.ready_max_ingest_lag_seconds
    checks["ingest_lag"] = ReadyCheck(
        ok=lag <= limit, detail=f"{lag:.0f}s (limit {limit:g}s)", required=False
    )
    leading = c.ticker is not None and c.ticker.is_leader
    checks["leader"] = ReadyCheck(ok=True, detail="leader" if leading else "follower")
    ok = all(check.ok for check in checks.values() if check.required)
    status: Literal["ready", "degraded", "not_ready"] = (
        "not_ready" if not ok else "ready" if all(c.ok for c in checks.values()) else "degraded"
    )
    body = ReadyOut(status=status, checks=checks)
    return JSONResponse(body.model_dump(), status_code=200 if ok else 503)


@health_router.get(
    "/metrics",
    summary="Prometheus metrics",
    response_class=Response,
    responses={
        200: {
            "content": {CONTENT_TYPE_LATEST: {"schema": {"type": "string"}}},
            "description": "The exposition",
        },
        **error_responses(401),
    },
)
def metrics(c: Ctx, authorization: Annotated[str | None, Header(include_in_schema=False)] = None) -> Response:
    """The fleet, rollouts, ingest, SLOs and alerts in Prometheus' text format (docs/slo.md lists
    them). No per-device series. When the server has a ``metrics_token``, a bearer token equal to it
    is needed (401 otherwise); without one, scrape it from inside the deployment only."""
    token = c.settings.metrics_token
    if token is not None and not hmac.compare_digest(
        (authorization or "").encode(), f"Bearer {token.get_secret_value()}".encode()
    ):
        raise ApiError(401, "unauthenticated", "/metrics needs the metrics bearer token")
    assert c.metrics is not None  # create_app makes it
    return Response(exposition(c.metrics), media_type=CONTENT_TYPE_LATEST)


@router.get("/stats", response_model=StatsOut, summary="Ingest counters")
def stats(c: Ctx) -> StatsOut:
    """This process's ingest counters (summed over its ingest workers), and how far behind it is."""
    lag: dict[str, float] = {}
    if c.bridge:
        lag = {"ingest_lag_seconds": c.bridge.ingest_lag, "ingest_backlog_messages": c.bridge.backlog}
        lag.update({f"ingest_{stream}_lag_seconds": v for stream, v in c.bridge.stream_lag().items()})
    return StatsOut.model_validate({**c.counters.snapshot(), **lag})


@router.get("/server", response_model=ServerOut, summary="This replica")
def server_info(c: Ctx) -> ServerOut:
    """This replica: whether it drives the rollout engine (leader), its database and schema revision."""
    return ServerOut(
        replica=c.bridge.client_id if c.bridge is not None else "",
        leader=c.ticker.is_leader if c.ticker is not None else False,
        database=c.engine.dialect.name,
        schema_revision=current_revision(c.engine),
        mqtt_connected=c.bridge.connected if c.bridge is not None else False,
        mqtt_shards=c.bridge.shard_connected() if c.bridge is not None else {},
    )
