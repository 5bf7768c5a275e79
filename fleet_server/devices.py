"""Device registry: register (idempotent), look up, re-tag, delete.

Registration is idempotent so provisioning scripts can be re-run: the same
id with the same attributes is the device that exists; with other attributes
it is a conflict, never a silent overwrite (the hardware id decides which
models a device may get).
"""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet_server.errors import Conflict, NotFound
from fleet_server.lifecycle import RolloutState as RS
from fleet_server.models import Device, ModelAggregate, Rollout, RolloutDevice, utcnow


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


def delete_device(session: Session, device_id: str) -> Device:
    """Forget a device: refused while it is in an active rollout (abort the rollout or let it end).

    Its rows in finished rollouts and its telemetry totals go with it; those rollouts'
    decisions (with their figures) and the audit log keep the record. Its raw events
    and telemetry batches stay, as received. A device registered again under the same
    id starts a new directive sequence, so its agent must be provisioned afresh.
    """
    device = session.get(Device, device_id, with_for_update=True)
    if device is None:
        raise NotFound("device_not_found", f"no device {device_id}")
    active = session.exec(
        select(Rollout.id)
        .join(RolloutDevice, col(RolloutDevice.rollout_id) == col(Rollout.id))
        .where(RolloutDevice.device_id == device_id, col(Rollout.state).in_(RS.ACTIVE))
    ).all()
    if active:
        raise Conflict(
            "device_in_rollout",
            f"device {device_id} is in active rollout(s) {', '.join(sorted(active))}: "
            "abort or finish them first",
        )
    session.execute(delete(RolloutDevice).where(col(RolloutDevice.device_id) == device_id))
    session.execute(delete(ModelAggregate).where(col(ModelAggregate.device_id) == device_id))
    session.delete(device)
    try:
        session.commit()
    except IntegrityError:  # a rollout took it in meanwhile
        raise Conflict("device_in_rollout", f"device {device_id} was just added to a rollout") from None
    return device


__all__ = ["delete_device", "get_device", "list_devices", "register_device", "set_tags"]
