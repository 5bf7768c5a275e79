"""``/api/v1/experiments``: create A/B experiments between model versions, read their per-arm figures
with always-valid intervals, and stop an arm or the whole experiment (docs/experiments.md).

Changes take this process's rollout lock (the engine ticker evaluates experiments and applies
rollout plans under it) and the experiment's row lock, as the rollout routes do.
"""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Path, Query

from fleet_server.experiment_schemas import ExperimentIn, ExperimentOut, ExperimentPage, StopIn
from fleet_server.experiments import create_experiment, find_experiment, list_experiments, status, stop
from fleet_server.paging import DEFAULT_LIMIT
from fleet_server.routes.common import OPERATOR, Ctx, Cursor, Db, Limit, admin_router, page_out
from fleet_server.routes.errors import error_responses

router = admin_router(tags=["experiments"])

ExperimentId = Annotated[
    str, Path(description="the experiment's id", examples=["5c2e9a0b1d7f"], max_length=32)
]


@router.post(
    "/experiments",
    summary="Start an A/B experiment",
    status_code=201,
    response_model=ExperimentOut,
    responses=error_responses(404, 409, 413, 422),
    dependencies=OPERATOR,
)
def post_experiment(body: ExperimentIn, c: Ctx, session: Db) -> ExperimentOut:
    """Split the selected devices into the arms, every hardware cohort by the weights, and start one
    rollout per arm. 404 ``model_not_found``, 400 ``no_matching_devices`` or ``too_few_devices``,
    409 ``experiment_conflict`` when selected devices are in an active rollout or another running
    experiment."""
    with c.lock:
        exp = create_experiment(session, body)
        session.commit()
    return status(session, exp)


@router.get("/experiments", response_model=ExperimentPage, summary="List experiments")
def get_experiments(
    session: Db,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
    state: Annotated[
        Literal["running", "stopped", "completed"] | None, Query(description="only experiments in this state")
    ] = None,
) -> ExperimentPage:
    """Experiments with their figures, oldest first, a page at a time."""
    rows = list_experiments(session, state, cursor=cursor, limit=limit)
    return page_out(ExperimentPage, rows, lambda e: status(session, e))


@router.get(
    "/experiments/{experiment_id}",
    response_model=ExperimentOut,
    responses=error_responses(404),
    summary="Get an experiment's status",
)
def get_experiment(experiment_id: ExperimentId, session: Db) -> ExperimentOut:
    """Per arm: devices, metrics, the effect against the control with its always-valid interval and
    anytime p-value (valid at any number of looks), and every decision."""
    return status(session, find_experiment(session, experiment_id))


@router.post(
    "/experiments/{experiment_id}/stop",
    summary="Stop an experiment or one arm",
    response_model=ExperimentOut,
    responses=error_responses(404, 409),
    dependencies=OPERATOR,
)
def stop_experiment(experiment_id: ExperimentId, body: StopIn, c: Ctx, session: Db) -> ExperimentOut:
    """An arm: its devices go back to the control version. The experiment: every arm but the control
    goes back to the control; ``promote``: the proven winner is rolled out to the selector instead
    (409 ``no_winner`` without one). Stopping a stopped experiment is a no-op."""
    with c.lock:
        exp = stop(session, experiment_id, body.arm, body.reason, body.promote)
        session.commit()
    return status(session, exp)
