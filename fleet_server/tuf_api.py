"""HTTP face of the TUF repository: static metadata/targets for devices, release uploads for operators.

``GET /tuf/metadata/<file>`` and ``GET /tuf/targets/<path>`` serve the
repository directory read-only, with no admin token: every byte is verified by
the device against the root it already trusts, so the transport need not be.
``POST /api/v1/tuf/targets`` (operator) installs targets metadata a release key
signed elsewhere (``edgefleet models revoke``), with the bytes of any new
target; a model upload carries its targets metadata in the same request.
"""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Request, UploadFile
from fastapi.responses import FileResponse
from tuf.api.metadata import Metadata, Targets

from fleet_server.auth import require
from fleet_server.context import ServerContext
from fleet_server.errors import ApiError
from fleet_server.schemas import ErrorOut
from signing.errors import HardwareMismatch, MetadataInvalid, TargetMismatch, TargetNotFound, TrustError
from signing.manifest import BundleManifest
from signing.targets import TargetCustom
from signing.tuf_release import target_name

MAX_METADATA = 1 << 20
_METADATA_RE = re.compile(r"^(?:[0-9]{1,12}\.)?(?:root|timestamp|snapshot|targets)\.json$")

static_router = APIRouter(prefix="/tuf", tags=["tuf"])
release_router = APIRouter(
    prefix="/api/v1/tuf",
    dependencies=[Depends(require("operator"))],
    responses={c: {"model": ErrorOut} for c in (400, 401, 403, 409)},
)


def _ctx(request: Request) -> ServerContext:
    context: ServerContext = request.app.state.ctx
    return context


def _tuf(c: ServerContext) -> Any:
    if c.tuf is None:
        raise ApiError(409, "tuf_disabled", "this server has no TUF repository")
    return c.tuf


# --- release uploads --------------------------------------------------------------------------


def check_release_target(signed_targets: bytes, manifest: BundleManifest) -> None:
    """The uploaded targets metadata must describe exactly this bundle (signatures are checked on install)."""
    try:
        md = Metadata[Targets].from_bytes(signed_targets)
    except Exception as exc:
        raise MetadataInvalid(f"targets metadata does not parse: {exc}") from exc
    name = target_name(manifest.name, manifest.version)
    entry = md.signed.targets.get(name)
    if entry is None:
        raise TargetNotFound(f"the signed targets metadata does not list {name!r}")
    model = manifest.model_file
    if entry.hashes.get("sha256") != model.sha256 or entry.length != model.length:
        raise TargetMismatch(f"{name}: signed target hash/length differ from the bundle's model file")
    custom = TargetCustom.from_custom(entry.custom, name)
    if sorted(custom.hardware_ids) != sorted(manifest.hardware_ids) or custom.release != manifest.release:
        raise HardwareMismatch(f"{name}: signed hardware ids/release differ from the bundle manifest")


def publish_release(
    c: ServerContext, signed_targets: bytes, bundle_dir: Path, manifest: BundleManifest
) -> None:
    """Install the release-signed targets (the bundle's model file as its target) and publish."""
    name = target_name(manifest.name, manifest.version)
    try:
        _tuf(c).accept(signed_targets, {name: bundle_dir / manifest.model_file.path})
    except TrustError as exc:
        raise ApiError(400, exc.code, str(exc)) from None
    except ValueError as exc:
        raise ApiError(400, "invalid_request", str(exc)) from None


@release_router.post("/targets", status_code=201)
def post_targets(
    request: Request,
    targets: Annotated[UploadFile, File()],
    files: Annotated[list[UploadFile] | None, File()] = None,
) -> dict[str, Any]:
    """Install release-signed targets metadata (e.g. a raised revocation floor) with new targets' bytes."""
    c = _ctx(request)
    service = _tuf(c)
    data = targets.file.read(MAX_METADATA + 1)
    if len(data) > MAX_METADATA:
        raise ApiError(400, "metadata_invalid", f"targets metadata larger than {MAX_METADATA} bytes")
    with tempfile.TemporaryDirectory(dir=c.settings.data_dir) as tmp:
        staged: dict[str, Path] = {}
        for i, up in enumerate(files or []):
            path = Path(tmp) / str(i)
            with open(path, "wb") as out:
                shutil.copyfileobj(up.file, out, 1 << 20)
            staged[up.filename or ""] = path
        try:
            version = service.accept(data, staged)
        except TrustError as exc:
            raise ApiError(400, exc.code, str(exc)) from None
        except ValueError as exc:
            raise ApiError(400, "invalid_request", str(exc)) from None
    md = Metadata[Targets].from_bytes(data)
    return {"targets_version": md.signed.version, "snapshot_version": version}


# --- static serving (devices) -----------------------------------------------------------------


@static_router.get(
    "/metadata/{name}",
    response_class=FileResponse,
    responses={200: {"content": {"application/json": {}}, "description": "TUF metadata"}, 404: {}},
)
def get_metadata(name: str, request: Request) -> FileResponse:
    if not _METADATA_RE.match(name):
        raise ApiError(404, "not_found", f"no metadata {name}")
    path = _tuf(_ctx(request)).repo.metadata_dir / name
    if not path.is_file():
        raise ApiError(404, "not_found", f"no metadata {name}")
    return FileResponse(path, media_type="application/json")


@static_router.get(
    "/targets/{target:path}",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}, "description": "a target"}, 404: {}},
)
def get_target(target: str, request: Request) -> FileResponse:
    base = _tuf(_ctx(request)).repo.targets_dir.resolve()
    path = (base / target).resolve()
    if not path.is_relative_to(base) or not path.is_file() or path.name.startswith("."):
        raise ApiError(404, "not_found", f"no target {target}")
    return FileResponse(path, media_type="application/octet-stream")


__all__ = ["check_release_target", "publish_release", "release_router", "static_router"]
