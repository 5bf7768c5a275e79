"""Device registry: register (idempotent), look up, re-tag.

Registration is idempotent so provisioning scripts can be re-run: the same
id with the same attributes is the device that exists; with other attributes
it is a conflict, never a silent overwrite (the hardware id decides which
models a device may get).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet_server.errors import Conflict, NotFound
from fleet_server.models import Device, utcnow


def register_device(
    session: Session, device_id: str, hardware_id: str, tags: dict[str, str]
) -> tuple[Device, bool]:
    """The device and whether this call created it."""
    existing = session.get(Device, device_id)
    if existing is not None:
        if existing.hardware_id == hardware_id and existing.tags == tags:
            return existing, False
        raise Conflict("device_exists", f"device {device_id} is registered with other attributes")
    device = Device(id=device_id, hardware_id=hardware_id, tags=dict(tags), registered_at=utcnow())
    session.add(device)
    try:
        session.commit()
    except IntegrityError:  # registered concurrently
        raise Conflict("device_exists", f"device {device_id} is already registered") from None
    return device, True


def list_devices(session: Session) -> Sequence[Device]:
    return session.exec(select(Device).order_by(col(Device.id))).all()


def get_device(session: Session, device_id: str) -> Device:
    device = session.get(Device, device_id)
    if device is None:
        raise NotFound("device_not_found", f"no device {device_id}")
    return device


def set_tags(session: Session, device_id: str, tags: dict[str, str]) -> Device:
    """Replace a device's tags; a running rollout whose selector it now matches takes it in."""
    device = get_device(session, device_id)
    device.tags = dict(tags)  # a new dict: JSON columns are replaced, never mutated in place
    session.add(device)
    session.commit()
    return device


__all__ = ["get_device", "list_devices", "register_device", "set_tags"]
