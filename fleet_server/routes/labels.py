"""``POST /api/v1/labels``: ground truth for inferences, from the apps and people who learn it.

The ``labeler`` role may post here and nowhere else (``fleet_server.auth``); operators and
admins may too. The guard bounds the body (1 MiB, 32 levels deep) before it is parsed; a
batch over ``MAX_ITEMS`` is refused whole (413), a body that is not a batch is a 400, and
otherwise every item gets its own status (``fleet_server.labels``) and the valid ones are kept.
The answer is serialised directly: a 10,000-item batch must not pay for a response model.
"""

from __future__ import annotations

from fastapi import Depends, Request, Response
from fastapi.routing import APIRouter

from fleet_server import labels
from fleet_server.auth import LABELER, require
from fleet_server.errors import ApiError
from fleet_server.models import utcnow
from fleet_server.routes.common import API, Ctx
from fleet_server.routes.errors import error_responses
from fleet_server.routes.guard import GuardedRoute
from fleet_server.schemas import LabelsIn, LabelsOut

router = APIRouter(
    prefix=API,
    tags=["labels"],
    route_class=GuardedRoute,
    dependencies=[Depends(require(LABELER))],
    responses=error_responses(400, 401, 403),
)


@router.post("/labels", response_model=LabelsOut, responses=error_responses(413), summary="Post labels")
def post_labels(body: LabelsIn, request: Request, c: Ctx) -> Response:
    """Store labels, idempotent on (inference_id, source); each item's outcome, in order.

    A label for an inference the server has no capture of is accepted (``matched: false``):
    the capture may arrive later, or the inference was not sampled."""
    if len(body.labels) > labels.MAX_ITEMS:
        raise ApiError(
            413, "too_many_labels", f"{len(body.labels)} labels in one batch; at most {labels.MAX_ITEMS}"
        )
    data, counts = labels.answer(labels.store(c.engine, body.labels, utcnow()))
    request.state.audit_detail = ", ".join(f"{n} {s}" for s, n in counts.items())
    return Response(data, media_type="application/json")
