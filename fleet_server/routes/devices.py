"""``/api/v1/devices``: register devices, read what they report, re-tag or delete them."""

from __future__ import annotations

from typing import Any

from fastapi import Response

from fleet_server import devices
from fleet_server.models import Device
from fleet_server.routes.common import OPERATOR, Db, admin_router
from fleet_server.routes.errors import error_responses
from fleet_server.schemas import DeviceIn, DeviceOut, TagsIn

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
    }
    return DeviceOut.model_validate(
        {**d.model_dump(), "device_id": d.id, "running_model": running, "inventory": inventory}
    )


@router.post(
    "/devices",
    status_code=201,
    response_model=DeviceOut,
    responses={
        200: {"model": DeviceOut, "description": "already registered with these attributes"},
        **error_responses(409, 413),
    },
    dependencies=OPERATOR,
)
def register_device(body: DeviceIn, session: Db, response: Response) -> DeviceOut:
    device, created = devices.register_device(session, body.device_id, body.hardware_id, body.tags)
    if not created:
        response.status_code = 200
    return device_out(device)


@router.get("/devices", response_model=list[DeviceOut])
def list_devices(session: Db) -> list[DeviceOut]:
    return [device_out(d) for d in devices.list_devices(session)]


@router.get("/devices/{device_id}", response_model=DeviceOut, responses=error_responses(404))
def get_device(device_id: str, session: Db) -> DeviceOut:
    return device_out(devices.get_device(session, device_id))


@router.put(
    "/devices/{device_id}/tags",
    response_model=DeviceOut,
    responses=error_responses(404, 413),
    dependencies=OPERATOR,
)
def set_device_tags(device_id: str, body: TagsIn, session: Db) -> DeviceOut:
    """Replace a device's tags; a running rollout whose selector it now matches takes it in."""
    return device_out(devices.set_tags(session, device_id, body.tags))


@router.delete(
    "/devices/{device_id}",
    response_model=DeviceOut,
    responses=error_responses(404, 409),
    dependencies=OPERATOR,
)
def delete_device(device_id: str, session: Db) -> DeviceOut:
    """Forget a device (409 ``device_in_rollout`` while an active rollout holds it); returns what it was."""
    return device_out(devices.delete_device(session, device_id))
