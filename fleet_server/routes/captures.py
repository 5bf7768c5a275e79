"""``PUT /api/v1/captures/{device_id}/{batch_id}``: a device uploads inferences it captured.

No bearer token: the device signs the request with the key of its fleet-CA certificate
(``signing.device_auth``). The signature, the certificate and the device id are checked
from the headers before a byte of the body is read; the body is then bounded (1 MiB) and
its SHA-256 compared with the signed one. A refusal stores nothing. What the answers mean
to the agent (``device_agent.capture_upload.outcome``): 201 stored, 200 stored before (the
same body), any other 4xx dropped for good, 5xx retried.
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Any

from fastapi import Path, Query, Request, Response
from fastapi.routing import APIRouter
from pydantic import AwareDatetime
from starlette.concurrency import run_in_threadpool

from fleet_server import captures
from fleet_server.auth import Principal
from fleet_server.datasets import dataset_page
from fleet_server.errors import ApiError
from fleet_server.paging import DEFAULT_LIMIT
from fleet_server.routes.common import API, Ctx, Cursor, Db, Limit, admin_router, page_out
from fleet_server.routes.errors import error_responses
from fleet_server.routes.guard import RawBodyRoute
from fleet_server.schemas import CapturedOut, CapturedPage, CaptureOut
from signing.device_auth import (
    CERT_HEADER,
    DEVICE_HEADER,
    DIGEST_HEADER,
    SIGNATURE_HEADER,
    DeviceAuthError,
    verify_request,
)

router = APIRouter(
    prefix=f"{API}/captures",
    tags=["captures"],
    route_class=RawBodyRoute,
    responses=error_responses(400, 401, 403),
)

BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "the batch as the agent sealed it (signed: send it byte for byte)",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/CaptureBatchIn"}}},
    },
    "parameters": [
        {
            "name": header,
            "in": "header",
            "required": True,
            "schema": {"type": "string"},
            "description": text,
        }
        for header, text in (
            ("X-Edgefleet-Device", "the device id the request is signed as"),
            ("X-Edgefleet-Device-Cert", "the device's certificate from the fleet CA (base64 DER)"),
            ("X-Edgefleet-Content-SHA256", "SHA-256 of the body (hex)"),
            ("X-Edgefleet-Signature", "base64 ECDSA-SHA256 by the device's key over method, path, id, hash"),
        )
    ],
}

DeviceId = Annotated[
    str,
    Path(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$", description="the device that captured the batch"),
]
BatchId = Annotated[
    str,
    Path(
        pattern=r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$",
        description="the device's id of the batch (a UUIDv7): the same id is the same batch",
    ),
]
list_router = admin_router(f"{API}/captures", tags=["captures"])

_STATUS_OF = {"device_unauthenticated": 401}
SIGNED_HEADERS = (DEVICE_HEADER, CERT_HEADER, DIGEST_HEADER, SIGNATURE_HEADER)


@router.put(
    "/{device_id}/{batch_id}",
    status_code=201,
    response_model=CaptureOut,
    responses={
        200: {"model": CaptureOut, "description": "this exact batch was stored before"},
        **error_responses(409, 413, 422, 503),
    },
    openapi_extra=BODY,
    summary="Upload captured inferences (device-signed)",
)
async def put_capture(device_id: DeviceId, batch_id: BatchId, request: Request, c: Ctx) -> Response:
    """Store a batch of captured inferences signed by the device that made them, and index each by
    model version, hardware cohort, rollout stage and time. Idempotent on the batch id."""
    headers = {k.lower(): v for k, v in request.headers.items()}
    ca = c.device_ca
    if ca is None and all(headers.get(h.lower()) for h in SIGNED_HEADERS):
        ca = c.device_ca = await run_in_threadpool(captures.load_device_ca, c.settings.device_ca_path)
        if ca is None:  # the deployment's fault, not the device's: it retries (5xx) and keeps the batch
            raise ApiError(503, "captures_unavailable", "the server has no device CA to check uploads with")
    try:
        if ca is None:  # unsigned: refused the same with or without a CA
            raise DeviceAuthError("device_unauthenticated", "a device request must be signed (X-Edgefleet-*)")
        who = verify_request(headers, "PUT", request.url.path, None, ca)
    except DeviceAuthError as exc:
        request.state.principal = Principal(f"device?:{headers.get('x-edgefleet-device', '')[:128]}", "")
        raise ApiError(_STATUS_OF.get(exc.code, 403), exc.code, str(exc)) from None
    request.state.principal = Principal(f"device:{who}", "device")  # for the audit log
    if who != device_id:
        raise ApiError(403, "wrong_device", f"{who} may not upload as {device_id}")
    body = await request.body()
    if hashlib.sha256(body).hexdigest() != headers.get("x-edgefleet-content-sha256"):
        raise ApiError(400, "digest_mismatch", "the body does not match its signed SHA-256")
    done = await run_in_threadpool(
        captures.store, c.engine, c.settings.captures_dir, device_id, batch_id, body, c.limits.request
    )
    request.state.audit_detail = f"batch {batch_id}: {done.batch.items} items" + (
        "" if done.created else " (stored before)"
    )
    out = CaptureOut(
        device_id=device_id,
        batch_id=batch_id,
        items=done.batch.items,
        skipped=done.skipped,
        model_sha256=done.batch.model_sha256,
        hardware_id=done.batch.hardware_id,
        stage=done.batch.stage,
        created=done.created,
    )
    return Response(
        out.model_dump_json(), status_code=201 if done.created else 200, media_type="application/json"
    )


@list_router.get(
    "", response_model=CapturedPage, responses=error_responses(404), summary="List captured inferences"
)
def list_captures(
    c: Ctx,
    session: Db,
    model: Annotated[
        str,
        Query(
            min_length=1,
            max_length=256,
            description="a model family (every version) or name:version; 404 for an unknown one",
            examples=["digits"],
        ),
    ],
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
    since: Annotated[
        AwareDatetime | None,
        Query(description="only inferences at or after this time (ISO 8601 with offset)"),
    ] = None,
    until: Annotated[
        AwareDatetime | None, Query(description="only inferences before this time (ISO 8601 with offset)")
    ] = None,
    labeled: Annotated[bool, Query(description="only inferences with at least one label")] = False,
) -> CapturedPage:
    """Captured inferences of a model with their labels and arrays, oldest id first: the rows of a
    retraining dataset (``edgefleet data export``)."""
    page = dataset_page(
        session,
        c.settings.captures_dir,
        model,
        since=since,
        until=until,
        labeled=labeled,
        cursor=cursor,
        limit=limit,
    )
    return page_out(CapturedPage, page, CapturedOut.model_validate)
