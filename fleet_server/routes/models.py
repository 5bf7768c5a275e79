"""``/api/v1/models`` (operator uploads, viewer reads) and ``/api/v1/artifacts`` (public reads).

An upload is verified before anything is kept (``fleet_server.releases``).
Artifacts are the stored model files and their signed envelopes; anyone may
read them, because a device verifies every byte against keys it already trusts
(docs/decisions/0009-public-delivery-and-request-guard.md). The ``X-Edgefleet-Device`` header
agents send is a label for logs and network emulation, never a credential:
these routes do not read it.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import File, Header, Path, Query, Response, UploadFile
from fastapi.responses import FileResponse, StreamingResponse

from fleet_server import acceptance_report, aggregates, releases
from fleet_server.artifacts import (
    MAX_ENVELOPE,
    RangeNotSatisfiable,
    Upload,
    find_artifact,
    find_bundle_file,
    iter_file,
    parse_range,
)
from fleet_server.models import Model
from fleet_server.paging import DEFAULT_LIMIT
from fleet_server.routes.common import (
    API,
    OPERATOR,
    Ctx,
    Cursor,
    Db,
    Limit,
    admin_router,
    page_out,
    public_router,
)
from fleet_server.routes.errors import error_responses
from fleet_server.schemas import ModelAcceptanceOut, ModelMetricsOut, ModelOut, ModelPage

router = admin_router(tags=["models"])
artifacts_router = public_router(API, tags=["artifacts"])


def model_out(m: Model) -> ModelOut:
    return ModelOut.model_validate(m, from_attributes=True)


@router.post(
    "/models",
    summary="Upload a signed bundle",
    status_code=201,
    response_model=ModelOut,
    responses={
        200: {"model": ModelOut, "description": "this exact bundle was already stored"},
        **error_responses(409, 413),
    },
    dependencies=OPERATOR,
)
def upload_model(
    c: Ctx,
    session: Db,
    response: Response,
    envelope: Annotated[UploadFile, File(description="bundle.dsse.json")],
    files: Annotated[
        list[UploadFile],
        File(min_length=1, description="one part per model file, named by its manifest path"),
    ],
    targets: Annotated[
        UploadFile | None, File(description="release-signed TUF targets metadata listing this bundle")
    ] = None,
) -> ModelOut:
    """Verify the bundle (DSSE) and, with ``targets``, the release-signed TUF targets metadata
    listing it; then publish snapshot + timestamp with the fleet key (docs/trust.md)."""
    accepted = releases.accept_bundle(
        c,
        session,
        envelope.file.read(MAX_ENVELOPE + 1),
        [Upload(f.filename or "", f.file) for f in files],
        targets.file.read(releases.MAX_METADATA + 1) if targets is not None else None,
    )
    if not accepted.created:
        response.status_code = 200
    return model_out(accepted.model)


@router.get("/models", response_model=ModelPage, summary="List models")
def list_models(
    session: Db,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
    name: Annotated[
        str | None, Query(min_length=1, max_length=256, description="only this model family's versions")
    ] = None,
) -> ModelPage:
    """The models the server holds, by name, then upload order, a page at a time."""
    return page_out(ModelPage, releases.list_models(session, name, cursor=cursor, limit=limit), model_out)


@router.get(
    "/models/{name}/{version}", response_model=ModelOut, responses=error_responses(404), summary="Get a model"
)
def get_model(
    name: Annotated[str, Path(description="the model's name", examples=["face-det"])],
    version: Annotated[str, Path(description="the model's version", examples=["7"])],
    session: Db,
) -> ModelOut:
    """One model: its manifest, hashes and the hardware it is for."""
    return model_out(releases.get_model(session, name, version))


@router.get(
    "/models/{name}/{version}/metrics",
    response_model=ModelMetricsOut,
    responses=error_responses(404),
    summary="Field metrics of a model",
)
def get_model_metrics(
    name: Annotated[str, Path(description="the model's name", examples=["digits"])],
    version: Annotated[str, Path(description="the model's version", examples=["2"])],
    session: Db,
) -> ModelMetricsOut:
    """Accuracy with a Wilson interval, precision/recall/FPR per class, label coverage and delay,
    feature and prediction availability, CPU cost per inference: per hardware cohort and rollout
    stage, and over all, from the devices' telemetry and the labels posted to the server."""
    return aggregates.model_metrics(session, name, version)


@router.get(
    "/models/{name}/{version}/acceptance",
    response_model=ModelAcceptanceOut,
    responses=error_responses(404),
    summary="On-device acceptance figures of a model",
)
def get_model_acceptance(
    name: Annotated[str, Path(description="the model's name", examples=["digits"])],
    version: Annotated[str, Path(description="the model's version", examples=["2"])],
    session: Db,
) -> ModelAcceptanceOut:
    """What the devices' acceptance checks (the bundle's golden set on each device's own runtime,
    before the swap) measured, per hardware class: passed, refused, and each figure's median and
    worst next to the value compiled on the host."""
    return ModelAcceptanceOut.model_validate(acceptance_report.model_acceptance(session, name, version))


Sha256 = Annotated[
    str, Path(pattern="^[0-9a-f]{64}$", description="SHA-256 of the model file (lowercase hex)")
]

ARTIFACT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **error_responses(404),
    200: {"content": {"application/octet-stream": {}}, "description": "the model file"},
    206: {"content": {"application/octet-stream": {}}, "description": "a byte range of it"},
    416: {"description": "range not satisfiable"},
}


@artifacts_router.get(
    "/artifacts/{sha256}",
    responses=ARTIFACT_RESPONSES,
    response_class=Response,
    summary="Download a model file",
)
def get_artifact(
    sha256: Sha256,
    c: Ctx,
    range_: Annotated[
        str | None, Header(alias="Range", description="one byte range, 'bytes=first-last' or 'bytes=first-'")
    ] = None,
) -> Response:
    """The model file, resumable with one ``Range: bytes=a-b`` (several ranges: 416)."""
    path = find_artifact(c.engine, sha256).model_file
    size = path.stat().st_size
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{sha256}"'}
    try:
        span = parse_range(range_, size)
    except RangeNotSatisfiable:
        return Response(status_code=416, headers={**headers, "Content-Range": f"bytes */{size}"})
    if span is None:
        start, end, status = 0, size - 1, 200
    else:
        (start, end), status = span, 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    return StreamingResponse(
        iter_file(path, start, end),
        status_code=status,
        headers=headers,
        media_type="application/octet-stream",
    )


@artifacts_router.get(
    "/artifacts/{sha256}/envelope",
    responses={**error_responses(404), 200: {"content": {"application/json": {}}, "description": "DSSE"}},
    response_class=FileResponse,
    summary="Download a bundle's signed envelope",
)
def get_envelope(sha256: Sha256, c: Ctx) -> FileResponse:
    """The bundle's signed envelope (the manifest the model file is checked against)."""
    return FileResponse(find_artifact(c.engine, sha256).envelope, media_type="application/json")


@artifacts_router.get(
    "/artifacts/{sha256}/files/{name}",
    responses={
        **error_responses(404),
        200: {"content": {"application/octet-stream": {}}, "description": "file"},
    },
    response_class=FileResponse,
    summary="Download another file of a bundle (its golden set)",
)
def get_bundle_file(
    sha256: Sha256,
    c: Ctx,
    name: Annotated[str, Path(max_length=255, description="a file name the bundle's signed manifest lists")],
) -> FileResponse:
    """A further file the bundle's signed manifest lists beside the model (the golden set the device's
    acceptance check runs), checked by the device against its signed hash."""
    return FileResponse(find_bundle_file(c.engine, sha256, name), media_type="application/octet-stream")
