"""Delivery metadata: the TUF repository, read by anyone; release-signed targets, installed by operators.

``GET /tuf/metadata/<file>`` and ``GET /tuf/targets/<path>`` serve the
repository directory read-only and need no token: every byte is verified by
the device against the root it already trusts, so neither the transport nor
the server need be (the same files can sit behind any web server or CDN).
``POST /api/v1/tuf/targets`` (operator) installs targets metadata a release key
signed elsewhere (``edgefleet models revoke``), with the bytes of any new
target; a model upload carries its targets metadata in the same request.
"""

from __future__ import annotations

import re
from typing import Annotated

from fastapi import File, Path, Response, UploadFile
from fastapi.responses import FileResponse

from fleet_server import releases
from fleet_server.artifacts import Upload
from fleet_server.errors import NotFound
from fleet_server.mirror import IMMUTABLE_CACHE, TIMESTAMP_CACHE, TIMESTAMP_KEY, DirectoryStorage
from fleet_server.routes.common import API, OPERATOR, Ctx, admin_router, public_router
from fleet_server.routes.errors import error_responses
from fleet_server.schemas import TargetsOut

_METADATA_RE = re.compile(r"^(?:[0-9]{1,12}\.)?(?:root|timestamp|snapshot|targets)\.json$")

static_router = public_router("/tuf", tags=["tuf"])
mirror_router = public_router("/mirror", tags=["tuf"])
release_router = admin_router(f"{API}/tuf", tags=["tuf"])


@release_router.post(
    "/targets",
    status_code=201,
    response_model=TargetsOut,
    responses=error_responses(409, 413),
    dependencies=OPERATOR,
    summary="Install release-signed targets metadata",
)
def post_targets(
    c: Ctx,
    targets: Annotated[UploadFile, File(description="targets metadata N+1, signed by a release key")],
    files: Annotated[
        list[UploadFile], File(description="bytes of new targets, each part named by its target path")
    ] = [],  # noqa: B006 - FastAPI copies parameter defaults per request
) -> TargetsOut:
    """Install release-signed targets metadata (e.g. a raised revocation floor) with new targets' bytes."""
    published = releases.accept_targets(
        c,
        targets.file.read(releases.MAX_METADATA + 1),
        [Upload(f.filename or "", f.file) for f in files],
    )
    return TargetsOut.model_validate(published, from_attributes=True)


@static_router.get(
    "/metadata/{name}",
    response_class=Response,
    responses={
        200: {"content": {"application/json": {}}, "description": "TUF metadata"},
        **error_responses(404, 409),
    },
    summary="Read TUF metadata",
)
def get_metadata(
    name: Annotated[
        str,
        Path(
            description="N.root.json, timestamp.json, N.snapshot.json, N.targets.json or targets.json",
            examples=["timestamp.json"],
        ),
    ],
    c: Ctx,
) -> Response:
    """A TUF metadata file; no token needed (devices verify it against the root they trust)."""
    # Read in one go, not streamed: the unversioned files (timestamp.json, targets.json) are
    # replaced while being served, and a stream could mix a new body with an old length.
    if not _METADATA_RE.match(name):
        raise NotFound("not_found", f"no metadata {name}")
    path = releases.tuf_repository(c).repo.metadata_dir / name
    try:
        return Response(path.read_bytes(), media_type="application/json")
    except (FileNotFoundError, IsADirectoryError):
        raise NotFound("not_found", f"no metadata {name}") from None


@static_router.get(
    "/targets/{target:path}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "a target"},
        **error_responses(404, 409),
    },
    summary="Read a TUF target",
)
def get_target(
    target: Annotated[
        str, Path(description="the target's path in the repository, e.g. models/<name>/<file>")
    ],
    c: Ctx,
) -> FileResponse:
    """A target file (consistent-snapshot name); no token needed (devices verify its hash and length)."""
    base = releases.tuf_repository(c).repo.targets_dir.resolve()
    path = (base / target).resolve()
    if not path.is_relative_to(base) or not path.is_file() or path.name.startswith("."):
        raise NotFound("not_found", f"no target {target}")
    return FileResponse(path, media_type="application/octet-stream")


@mirror_router.get(
    "/{key:path}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "a published file"},
        **error_responses(404),
    },
    summary="Read a file of the local mirror",
)
def get_mirror_file(
    key: Annotated[str, Path(description="a key of the published tree, e.g. metadata/timestamp.json")],
    c: Ctx,
) -> FileResponse:
    """The local mirror directory (``mirror`` unset or a path), so this server can be one of the
    mirrors a device lists; a static web server or CDN in front of the same directory takes the load
    off it. No token: every byte is verified on the device."""
    storage = c.publisher.storage if c.publisher is not None else None
    if not isinstance(storage, DirectoryStorage):
        raise NotFound("not_found", "this server publishes no local mirror")
    base = storage.root.resolve()
    path = (base / key).resolve()
    if not path.is_relative_to(base) or not path.is_file() or path.name.startswith("."):
        raise NotFound("not_found", f"no file {key}")
    cache = TIMESTAMP_CACHE if key == TIMESTAMP_KEY else IMMUTABLE_CACHE
    return FileResponse(path, media_type="application/octet-stream", headers={"Cache-Control": cache})
