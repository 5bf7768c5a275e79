"""``GET /api/v1/drift``: devices this replica saw off their desired state, and what it did about it.

The per-device view of ``fleet_server.reconciler`` (its totals are in ``/api/v1/stats``). In
memory and per replica, like the stats: the leader is the replica that republishes. Paged like
every list, cut from the replica's table in memory (it holds one row per device seen drifting).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Query

from fleet_server.paging import DEFAULT_LIMIT, list_page
from fleet_server.routes.common import Ctx, Cursor, Limit, admin_router, page_out
from fleet_server.schemas import DriftOut, DriftPage

router = admin_router(tags=["devices"])

Drifting = Annotated[bool, Query(description="only the devices drifting now (leave out those back in sync)")]


@router.get("/drift", response_model=DriftPage, summary="Devices seen off their desired state")
def drift(
    c: Ctx, drifting: Drifting = False, cursor: Cursor = None, limit: Limit = DEFAULT_LIMIT
) -> DriftPage:
    """Every device this replica saw drift, by device id (``drifting=true``: only those drifting now)."""
    rows = (
        []
        if c.bridge is None
        else [DriftOut.model_validate(vars(d)) for d in c.bridge.reconciler.drift_table()]
    )
    if drifting:
        rows = [r for r in rows if r.drift != "in_sync"]
    return page_out(
        DriftPage, list_page("drift", rows, lambda r: (r.device_id,), (str,), cursor, limit), lambda r: r
    )
