"""``/api/v1/devices``: register devices, read what they report, re-tag or delete them."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query, Response

from device_agent.protocol import DeploymentState
from fleet_server import devices
from fleet_server.errors import Rejected
from fleet_server.models import Device
from fleet_server.paging import DEFAULT_LIMIT
from fleet_server.routes.common import OPERATOR, Ctx, Cursor, Db, Limit, admin_router, page_out
from fleet_server.routes.errors import error_responses
from fleet_server.schemas import DeviceIn, DeviceOut, DevicePage, TagsIn
from fleet_server.selector_syntax import SYNTAX, SelectorError, parse_selector

router = admin_router(tags=["devices"])


def device_out(d: Device) -> DeviceOut:
    """Validate the row's columns; three fields of the view are derived from them."""
    reported = d.reported or {}
    running = (
        {"name": d.running_name, "version": d.running_version, "sha256": d.running_sha256}
        if d.running_sha256
        else None
    )
    inventory: dict[str, Any] = {
        "capabilities": reported.get("capabilities") or {},
        "slots": reported.get("slots") or {},
        "active_slot": reported.get("active_slot"),
        "shadow_sha256": reported.get("shadow_sha256"),
        "acceptance": reported.get("acceptance") or {},
    }
    return DeviceOut.model_validate(
        {**d.model_dump(), "device_id": d.id, "running_model": running, "inventory": inventory}
    )


@router.post(
    "/devices",
    summary="Register a device",
    status_code=201,
    response_model=DeviceOut,
    responses={
        200: {"model": DeviceOut, "description": "already registered with these attributes"},
        **error_responses(409, 413),
    },
    dependencies=OPERATOR,
)
def register_device(body: DeviceIn, session: Db, c: Ctx, response: Response) -> DeviceOut:
    """Register a device so the server accepts its MQTT messages and may send it models.

    Idempotent: the same id with the same attributes answers 200 with the device; with other
    attributes it is a 409 ``device_exists`` (re-registering never overwrites).
    """
    device, created = devices.register_device(
        session, body.device_id, body.hardware_id, body.tags, c.shard_names
    )
    if not created:
        response.status_code = 200
    return device_out(device)


DeviceId = Annotated[str, Path(description="the device's id", examples=["cam-0042"])]
SelectorQuery = Annotated[
    str | None,
    Query(
        max_length=4096,
        description=f"only devices this selector picks: {SYNTAX}; every part must hold (AND), as for"
        " `edgefleet rollouts create --selector`",
        examples=["hw=rpi4,site=lab"],
    ),
]
ModelQuery = Annotated[
    str | None,
    Query(
        min_length=1,
        max_length=256,
        description="only devices running this model: name:version, a bare name (any version), or the"
        " model file's sha256",
        examples=["face-det:7"],
    ),
]


@router.get("/devices", response_model=DevicePage, summary="List devices")
def list_devices(
    session: Db,
    limit: Limit = DEFAULT_LIMIT,
    cursor: Cursor = None,
    selector: SelectorQuery = None,
    state: Annotated[
        DeploymentState | None, Query(description="only devices whose agent reports this deployment state")
    ] = None,
    online: Annotated[bool | None, Query(description="only devices online (true) or offline (false)")] = None,
    model: ModelQuery = None,
) -> DevicePage:
    """Devices by id, a page at a time, filtered in the database.

    A malformed selector or cursor is a 400 naming the part that is wrong.
    """
    try:
        parsed = parse_selector(selector or "")
    except SelectorError as exc:
        raise Rejected("invalid_selector", f"selector: {exc}") from None
    where = devices.DeviceFilter(selector=parsed, state=state, online=online, model=model)
    rows = devices.list_devices(session, where, cursor=cursor, limit=limit)
    return page_out(DevicePage, rows, device_out)


@router.get(
    "/devices/{device_id}", response_model=DeviceOut, responses=error_responses(404), summary="Get a device"
)
def get_device(device_id: DeviceId, session: Db) -> DeviceOut:
    """One device and the latest state it reported."""
    return device_out(devices.get_device(session, device_id))


@router.put(
    "/devices/{device_id}/tags",
    summary="Replace a device's tags",
    response_model=DeviceOut,
    responses=error_responses(404, 413),
    dependencies=OPERATOR,
)
def set_device_tags(device_id: DeviceId, body: TagsIn, session: Db) -> DeviceOut:
    """Replace a device's tags; a running rollout whose selector it now matches takes it in."""
    return device_out(devices.set_tags(session, device_id, body.tags))


@router.delete(
    "/devices/{device_id}",
    response_model=DeviceOut,
    responses=error_responses(404, 409),
    dependencies=OPERATOR,
    summary="Delete a device",
)
def delete_device(device_id: DeviceId, session: Db) -> DeviceOut:
    """Forget a device (409 ``device_in_rollout`` while an active rollout holds it); returns what it was."""
    return device_out(devices.delete_device(session, device_id))
