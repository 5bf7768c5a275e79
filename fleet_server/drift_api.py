"""``GET /api/v1/drift``: devices this replica saw off their desired state, and what it did about it.

The per-device view of ``fleet_server.reconciler`` (its totals are in ``/api/v1/stats``). In
memory and per replica, like the stats: the leader is the replica that republishes.
"""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from fleet_server.auth import require
from fleet_server.context import ServerContext
from fleet_server.schemas import ErrorOut

drift_router = APIRouter(
    prefix="/api/v1",
    tags=["devices"],
    dependencies=[Depends(require("viewer"))],
    responses={
        400: {"model": ErrorOut, "description": "bad input"},
        401: {"model": ErrorOut, "description": "no or invalid API token"},
        403: {"model": ErrorOut, "description": "forbidden (role)"},
    },
)


class DriftOut(BaseModel):
    device_id: str
    drift: str = Field(description="in_sync, seq_behind, seq_ahead, model_mismatch or directive_missing")
    episodes: int = Field(description="times the device went from in sync to drifting")
    republished: int = Field(description="directives republished to it")
    restored: int = Field(description="deleted retained directives put back for it")
    since: datetime | None = Field(description="when the current drift was first seen")
    last_republish_at: datetime | None
    detail: str


@drift_router.get("/drift", response_model=list[DriftOut])
def drift(request: Request, drifting: bool = False) -> list[DriftOut]:
    """Every device this replica saw drift (``drifting=true``: only those drifting now)."""
    c: ServerContext = request.app.state.ctx
    if c.bridge is None:
        return []
    rows = [DriftOut(**vars(d)) for d in c.bridge.reconciler.drift_table()]
    return [r for r in rows if r.drift != "in_sync"] if drifting else rows
