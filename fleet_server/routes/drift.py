"""``GET /api/v1/drift``: devices this replica saw off their desired state, and what it did about it.

The per-device view of ``fleet_server.reconciler`` (its totals are in ``/api/v1/stats``). In
memory and per replica, like the stats: the leader is the replica that republishes.
"""

from __future__ import annotations

from fleet_server.routes.common import Ctx, admin_router
from fleet_server.schemas import DriftOut

router = admin_router(tags=["devices"])


@router.get("/drift", response_model=list[DriftOut])
def drift(c: Ctx, drifting: bool = False) -> list[DriftOut]:
    """Every device this replica saw drift (``drifting=true``: only those drifting now)."""
    if c.bridge is None:
        return []
    rows = [DriftOut.model_validate(vars(d)) for d in c.bridge.reconciler.drift_table()]
    return [r for r in rows if r.drift != "in_sync"] if drifting else rows
