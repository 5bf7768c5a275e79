"""``/api/v1/rollouts``: create staged rollouts, read their status, and the operator's actions on them.

Rollout changes take this process's rollout lock (the engine ticker applies
plans under it) and, for actions, the rollout's row lock, so an operator's
pause never interleaves with a tick on another replica.
"""

from __future__ import annotations

from sqlmodel import Session, col, select

from fleet_server.context import ServerContext
from fleet_server.errors import NotFound
from fleet_server.models import Rollout
from fleet_server.rollouts import create_rollout, operator_action, rollout_status
from fleet_server.routes.common import OPERATOR, Ctx, Db, admin_router
from fleet_server.routes.errors import error_responses
from fleet_server.schemas import RolloutIn, RolloutOut

router = admin_router(tags=["rollouts"])


def find_rollout(session: Session, rollout_id: str, *, for_update: bool = False) -> Rollout:
    rollout = session.get(Rollout, rollout_id, with_for_update=for_update)
    if rollout is None:
        raise NotFound("rollout_not_found", f"no rollout {rollout_id}")
    return rollout


@router.post(
    "/rollouts",
    status_code=201,
    response_model=RolloutOut,
    responses=error_responses(404, 409, 413, 422),
    dependencies=OPERATOR,
)
def post_rollout(body: RolloutIn, c: Ctx, session: Db) -> RolloutOut:
    with c.lock:
        rollout = create_rollout(session, body)
        session.commit()
    return rollout_status(session, rollout)


@router.get("/rollouts", response_model=list[RolloutOut])
def list_rollouts(session: Db) -> list[RolloutOut]:
    rows = session.exec(select(Rollout).order_by(col(Rollout.created_at))).all()
    return [rollout_status(session, r) for r in rows]


@router.get("/rollouts/{rollout_id}", response_model=RolloutOut, responses=error_responses(404))
def get_rollout(rollout_id: str, session: Db) -> RolloutOut:
    return rollout_status(session, find_rollout(session, rollout_id))


def _act(rollout_id: str, action: str, c: ServerContext, session: Session) -> RolloutOut:
    with c.lock:  # this process's ticker; other replicas' wait on the row lock below
        rollout = operator_action(session, find_rollout(session, rollout_id, for_update=True), action)
        session.commit()
    return rollout_status(session, rollout)


ACTION_ERRORS = error_responses(404, 409)


@router.post(
    "/rollouts/{rollout_id}/pause", response_model=RolloutOut, responses=ACTION_ERRORS, dependencies=OPERATOR
)
def pause_rollout(rollout_id: str, c: Ctx, session: Db) -> RolloutOut:
    return _act(rollout_id, "pause", c, session)


@router.post(
    "/rollouts/{rollout_id}/resume", response_model=RolloutOut, responses=ACTION_ERRORS, dependencies=OPERATOR
)
def resume_rollout(rollout_id: str, c: Ctx, session: Db) -> RolloutOut:
    return _act(rollout_id, "resume", c, session)


@router.post(
    "/rollouts/{rollout_id}/abort", response_model=RolloutOut, responses=ACTION_ERRORS, dependencies=OPERATOR
)
def abort_rollout(rollout_id: str, c: Ctx, session: Db) -> RolloutOut:
    return _act(rollout_id, "abort", c, session)


@router.post(
    "/rollouts/{rollout_id}/approve",
    response_model=RolloutOut,
    responses=ACTION_ERRORS,
    dependencies=OPERATOR,
)
def approve_rollout(rollout_id: str, c: Ctx, session: Db) -> RolloutOut:
    """Accept the current stage: passes the manual gate, or overrides a gate that paused the rollout."""
    return _act(rollout_id, "approve", c, session)


@router.post(
    "/rollouts/{rollout_id}/rollback",
    response_model=RolloutOut,
    responses=ACTION_ERRORS,
    dependencies=OPERATOR,
)
def rollback_rollout(rollout_id: str, c: Ctx, session: Db) -> RolloutOut:
    """Send every device that got this rollout's model back to the model it ran before (any state)."""
    return _act(rollout_id, "rollback", c, session)
