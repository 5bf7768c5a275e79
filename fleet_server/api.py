"""HTTP routes of ``/api/v1`` (docs/contracts.md). Handlers are thin: store and services do the work.

Handlers are plain ``def`` (FastAPI runs them in its thread pool) and open one
short session each, so no session is shared between threads. Every route
declares its response model and its error bodies, so the OpenAPI schema is
complete. Authentication (``fleet_server.auth``): the router needs ``viewer``;
mutating routes add ``operator``. Device-facing routes (artifacts here, TUF
metadata in ``tuf_api``) are on ``device_router`` and need no admin token.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Header, Request, Response, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet_server import artifacts, tuf_api
from fleet_server.aggregates import telemetry_aggregates
from fleet_server.auth import require
from fleet_server.context import ServerContext
from fleet_server.errors import ApiError, DomainError
from fleet_server.migrate import current_revision
from fleet_server.models import Device, Model, Rollout, utcnow
from fleet_server.rollouts import create_rollout, operator_action, rollout_status
from fleet_server.schemas import (
    AggregateOut,
    DeviceIn,
    DeviceOut,
    ErrorOut,
    ModelOut,
    RolloutIn,
    RolloutOut,
    RunningModelOut,
    ServerOut,
    StatsOut,
    TagsIn,
)
from fleet_server.store import new_session
from signing.errors import TrustError
from signing.manifest import ENVELOPE_NAME


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {400: "bad input or trust failure", 403: "forbidden", 404: "not found", 409: "conflict"}
    return {c: {"model": ErrorOut, "description": text.get(c, "error")} for c in (400, *codes)}


AUTH_ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorOut, "description": "no or invalid API token"},
    403: {"model": ErrorOut, "description": "forbidden (role)"},
}
router = APIRouter(
    prefix="/api/v1", responses={**_errors(), **AUTH_ERRORS}, dependencies=[Depends(require("viewer"))]
)
device_router = APIRouter(prefix="/api/v1", responses=_errors())
OPERATOR = [Depends(require("operator"))]
health = APIRouter()
DEVICE_HEADER = "X-Edgefleet-Device"


def ctx(request: Request) -> ServerContext:
    context: ServerContext = request.app.state.ctx
    return context


def db(c: Annotated[ServerContext, Depends(ctx)]) -> Iterator[Session]:
    with new_session(c.engine) as session:
        yield session


Ctx = Annotated[ServerContext, Depends(ctx)]
Db = Annotated[Session, Depends(db)]


@health.get("/healthz")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


# --- devices ---------------------------------------------------------------------------------


def device_out(d: Device) -> DeviceOut:
    running = (
        RunningModelOut(name=d.running_name, version=d.running_version, sha256=d.running_sha256)
        if d.running_sha256
        else None
    )
    return DeviceOut(
        device_id=d.id,
        hardware_id=d.hardware_id,
        tags=d.tags,
        registered_at=d.registered_at,
        online=d.online,
        last_seen=d.last_seen,
        running_model=running,
        deployment_state=d.deployment_state,
        deployment_seq=d.deployment_seq,
        desired_seq=d.desired_seq,
        agent_version=d.agent_version,
        inventory=_inventory(d),
        clock_offset_seconds=d.clock_offset_seconds,
        clock_offset_at=d.clock_offset_at,
    )


def _inventory(d: Device) -> dict[str, Any]:
    reported = d.reported or {}
    return {
        "capabilities": reported.get("capabilities") or {},
        "slots": reported.get("slots") or {},
        "active_slot": reported.get("active_slot"),
        "shadow_sha256": reported.get("shadow_sha256"),
    }


@router.post(
    "/devices", status_code=201, response_model=DeviceOut, responses=_errors(409), dependencies=OPERATOR
)
def register_device(body: DeviceIn, session: Db, response: Response) -> DeviceOut:
    existing = session.get(Device, body.device_id)
    if existing is not None:
        if existing.hardware_id == body.hardware_id and existing.tags == body.tags:
            response.status_code = 200
            return device_out(existing)
        raise ApiError(409, "device_exists", f"device {body.device_id} is registered with other attributes")
    device = Device(id=body.device_id, hardware_id=body.hardware_id, tags=body.tags, registered_at=utcnow())
    session.add(device)
    try:
        session.commit()
    except IntegrityError:  # registered concurrently
        raise ApiError(409, "device_exists", f"device {body.device_id} is already registered") from None
    return device_out(device)


@router.get("/devices", response_model=list[DeviceOut])
def list_devices(session: Db) -> list[DeviceOut]:
    return [device_out(d) for d in session.exec(select(Device).order_by(col(Device.id))).all()]


@router.get("/devices/{device_id}", response_model=DeviceOut, responses=_errors(404))
def get_device(device_id: str, session: Db) -> DeviceOut:
    device = session.get(Device, device_id)
    if device is None:
        raise ApiError(404, "device_not_found", f"no device {device_id}")
    return device_out(device)


@router.put(
    "/devices/{device_id}/tags", response_model=DeviceOut, responses=_errors(404), dependencies=OPERATOR
)
def set_device_tags(device_id: str, body: TagsIn, session: Db) -> DeviceOut:
    """Replace a device's tags; a running rollout whose selector it now matches takes it in."""
    device = session.get(Device, device_id)
    if device is None:
        raise ApiError(404, "device_not_found", f"no device {device_id}")
    device.tags = dict(body.tags)
    session.add(device)
    session.commit()
    return device_out(device)


# --- models ----------------------------------------------------------------------------------


def model_out(m: Model) -> ModelOut:
    return ModelOut(
        name=m.name,
        version=m.version,
        release=m.release,
        target=m.target,
        hardware_ids=m.hardware_ids,
        sha256=m.sha256,
        length=m.length,
        manifest=m.manifest,
        created_at=m.created_at,
    )


@router.post(
    "/models", status_code=201, response_model=ModelOut, responses=_errors(409), dependencies=OPERATOR
)
def upload_model(
    c: Ctx,
    session: Db,
    response: Response,
    envelope: Annotated[UploadFile, File()],
    files: Annotated[list[UploadFile], File()],
    targets: Annotated[UploadFile | None, File()] = None,
) -> ModelOut:
    """Verify the bundle (DSSE) and, with ``targets``, the release-signed TUF targets metadata
    listing it; then publish snapshot + timestamp with the fleet key (docs/trust.md)."""
    raw = envelope.file.read(artifacts.MAX_ENVELOPE + 1)
    signed_targets = targets.file.read(artifacts.MAX_ENVELOPE + 1) if targets is not None else None
    uploads = [artifacts.Upload(f.filename or "", f.file) for f in files]
    try:
        staged = artifacts.stage_bundle(raw, uploads, c.trust, c.settings.upload_tmp_dir)
    except TrustError as exc:
        raise ApiError(400, exc.code, str(exc)) from None
    if signed_targets is not None:
        try:
            tuf_api.check_release_target(signed_targets, staged.manifest)
        except TrustError as exc:
            staged.discard()
            raise ApiError(400, exc.code, str(exc)) from None
    manifest = staged.manifest
    existing = session.exec(
        select(Model).where(Model.name == manifest.name, Model.version == manifest.version)
    ).first()
    if existing is not None:
        staged.discard()
        if existing.manifest == manifest.to_dict():
            if signed_targets is not None:
                tuf_api.publish_release(c, signed_targets, Path(existing.storage_path), manifest)
            response.status_code = 200
            return model_out(existing)
        raise ApiError(409, "model_exists", f"{manifest.ref} exists with different content")
    path = staged.commit(c.settings.artifacts_dir)
    if signed_targets is not None:
        try:
            tuf_api.publish_release(c, signed_targets, path, manifest)
        except ApiError:
            shutil.rmtree(path, ignore_errors=True)
            raise
    model = Model(
        name=manifest.name,
        version=manifest.version,
        release=manifest.release,
        target=manifest.target,
        hardware_ids=list(manifest.hardware_ids),
        sha256=manifest.model_file.sha256,
        length=manifest.model_file.length,
        manifest=manifest.to_dict(),
        storage_path=str(path),
        created_at=utcnow(),
    )
    session.add(model)
    try:
        session.commit()
    except IntegrityError:
        shutil.rmtree(path, ignore_errors=True)
        raise ApiError(409, "model_exists", f"{manifest.ref} was uploaded concurrently") from None
    return model_out(model)


@router.get("/models", response_model=list[ModelOut])
def list_models(session: Db) -> list[ModelOut]:
    rows = session.exec(select(Model).order_by(col(Model.name), col(Model.created_at))).all()
    return [model_out(m) for m in rows]


@router.get("/models/{name}/{version}", response_model=ModelOut, responses=_errors(404))
def get_model(name: str, version: str, session: Db) -> ModelOut:
    model = session.exec(select(Model).where(Model.name == name, Model.version == version)).first()
    if model is None:
        raise ApiError(404, "model_not_found", f"no model {name}:{version}")
    return model_out(model)


# --- artifacts -------------------------------------------------------------------------------


def _artifact(session: Session, sha256: str, device_id: str | None) -> Model:
    if not device_id or session.get(Device, device_id) is None:
        raise ApiError(
            403, "unregistered_device", f"artifacts are served to registered devices ({DEVICE_HEADER})"
        )
    model = session.exec(
        select(Model).where(Model.sha256 == sha256).order_by(col(Model.created_at).desc())
    ).first()
    if model is None:
        raise ApiError(404, "artifact_not_found", f"no artifact {sha256}")
    return model


DeviceHeader = Annotated[str | None, Header(alias=DEVICE_HEADER)]


ARTIFACT_RESPONSES: dict[int | str, dict[str, Any]] = {
    **_errors(403, 404),
    200: {"content": {"application/octet-stream": {}}, "description": "the model file"},
    206: {"content": {"application/octet-stream": {}}, "description": "a byte range of it"},
    416: {"description": "range not satisfiable"},
}


@device_router.get("/artifacts/{sha256}", responses=ARTIFACT_RESPONSES, response_class=Response)
def get_artifact(
    sha256: str,
    c: Ctx,
    device: DeviceHeader = None,
    range_: Annotated[str | None, Header(alias="Range")] = None,
) -> Response:
    # No ``Db`` dependency here: a yield-dependency keeps its session (and pooled connection)
    # until the stream ends, and a wave of devices downloading at once then exhausts the pool
    # while the threads that would finish the streams wait for it (tests: many_devices).
    with new_session(c.engine) as session:
        model = _artifact(session, sha256, device)
        path = Path(model.storage_path) / str(model.manifest["files"][0]["path"])
    size = path.stat().st_size
    headers = {"Accept-Ranges": "bytes", "ETag": f'"{sha256}"'}
    try:
        span = artifacts.parse_range(range_, size)
    except artifacts.RangeNotSatisfiable:
        return Response(
            status_code=416,
            headers={**headers, "Content-Range": f"bytes */{size}"},
            content=b"",
        )
    if span is None:
        start, end, status = 0, size - 1, 200
    else:
        (start, end), status = span, 206
        headers["Content-Range"] = f"bytes {start}-{end}/{size}"
    headers["Content-Length"] = str(end - start + 1)
    return StreamingResponse(
        artifacts.iter_file(path, start, end),
        status_code=status,
        headers=headers,
        media_type="application/octet-stream",
    )


@device_router.get(
    "/artifacts/{sha256}/envelope",
    responses={**_errors(403, 404), 200: {"content": {"application/json": {}}, "description": "DSSE"}},
    response_class=Response,
)
def get_envelope(sha256: str, c: Ctx, device: DeviceHeader = None) -> Response:
    with new_session(c.engine) as session:
        storage = Path(_artifact(session, sha256, device).storage_path)
    raw = (storage / ENVELOPE_NAME).read_bytes()
    return Response(content=raw, media_type="application/json")


# --- rollouts --------------------------------------------------------------------------------


@router.post(
    "/rollouts",
    status_code=201,
    response_model=RolloutOut,
    responses=_errors(404, 409),
    dependencies=OPERATOR,
)
def post_rollout(body: RolloutIn, c: Ctx, session: Db) -> RolloutOut:
    with c.lock, _http_status():
        rollout = create_rollout(session, body)
        session.commit()
    return rollout_status(session, rollout)


@router.get("/rollouts", response_model=list[RolloutOut])
def list_rollouts(session: Db) -> list[RolloutOut]:
    rows = session.exec(select(Rollout).order_by(col(Rollout.created_at))).all()
    return [rollout_status(session, r) for r in rows]


def _rollout(session: Session, rollout_id: str) -> Rollout:
    rollout = session.get(Rollout, rollout_id)
    if rollout is None:
        raise ApiError(404, "rollout_not_found", f"no rollout {rollout_id}")
    return rollout


@router.get("/rollouts/{rollout_id}", response_model=RolloutOut, responses=_errors(404))
def get_rollout(rollout_id: str, session: Db) -> RolloutOut:
    return rollout_status(session, _rollout(session, rollout_id))


def _act(rollout_id: str, action: str, c: ServerContext, session: Session) -> RolloutOut:
    with c.lock:  # this process's ticker; other replicas' wait on the row lock below
        rollout = session.get(Rollout, rollout_id, with_for_update=True)
        if rollout is None:
            raise ApiError(404, "rollout_not_found", f"no rollout {rollout_id}")
        with _http_status():
            rollout = operator_action(session, rollout, action)
        session.commit()
    return rollout_status(session, rollout)


ACTION_ERRORS = _errors(404, 409)


@contextmanager
def _http_status() -> Iterator[None]:
    """A rollout service's domain error as the HTTP error of its class (404, 409, 422, ...)."""
    try:
        yield
    except DomainError as exc:
        raise ApiError(exc.status_code, exc.code, exc.message) from exc


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


@router.get("/rollouts/{rollout_id}/telemetry", response_model=list[AggregateOut], responses=_errors(404))
def rollout_telemetry(rollout_id: str, session: Db) -> list[AggregateOut]:
    """The rollout's devices' telemetry per model, stage and hardware id (what its gates read)."""
    return telemetry_aggregates(session, rollout=_rollout(session, rollout_id))


@router.get("/telemetry", response_model=list[AggregateOut])
def telemetry(session: Db, model: str | None = None, hardware_id: str | None = None) -> list[AggregateOut]:
    """Telemetry per model version and device class (hardware id); ``model`` is name:version or a sha256."""
    return telemetry_aggregates(session, model=model, hardware_id=hardware_id)


# --- stats -----------------------------------------------------------------------------------


@router.get("/stats", response_model=StatsOut)
def stats(c: Ctx) -> StatsOut:
    return StatsOut(**c.counters.snapshot())


@router.get("/server", response_model=ServerOut)
def server_info(c: Ctx) -> ServerOut:
    """This replica: whether it drives the rollout engine (leader), its database and schema revision."""
    return ServerOut(
        replica=c.bridge.client_id if c.bridge is not None else "",
        leader=c.ticker.is_leader if c.ticker is not None else False,
        database=c.engine.dialect.name,
        schema_revision=current_revision(c.engine),
        mqtt_connected=c.bridge.connected if c.bridge is not None else False,
    )


def validation_error_response(message: str) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": {"code": "invalid_request", "message": message}})
