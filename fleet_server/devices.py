"""Device registry: register (idempotent), list with filters, look up, re-tag, delete.

Registration is idempotent so provisioning scripts can be re-run: the same
id with the same attributes is the device that exists; with other attributes
it is a conflict, never a silent overwrite (the hardware id decides which
models a device may get).

Listing pages by device id (the primary key's index) and filters in SQL:
hardware id, tags, runtime, deployment state, online, running model. Only a
selector's agent version (PEP 440 ordering) is tested here, on the ids and
versions SQL returns, batch by batch, so a page is still full.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, delete
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from fleet_server.errors import Conflict, NotFound
from fleet_server.lifecycle import RolloutState as RS
from fleet_server.models import (
    Device,
    Experiment,
    ExperimentDevice,
    ModelAggregate,
    OutcomeAggregate,
    Rollout,
    RolloutDevice,
    utcnow,
)
from fleet_server.paging import DEFAULT_LIMIT, Page, select_page
from fleet_server.selector import agent_version_matches, sql_clauses
from fleet_server.shards import DEFAULT_SHARD, assign

SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class DeviceFilter:
    """What a device listing keeps: every criterion given must hold (AND).

    ``selector`` is the dict form (``selector.parse_selector``); ``model`` is ``name:version``,
    a bare name (any version) or the model file's sha256, of the model the device runs.
    """

    selector: Mapping[str, Any] = field(default_factory=dict)
    state: str | None = None
    online: bool | None = None
    model: str | None = None

    def sql(self, dialect: str) -> list[ColumnElement[bool]]:
        clauses = sql_clauses(self.selector, dialect)
        if self.state is not None:
            clauses.append(col(Device.deployment_state) == self.state)
        if self.online is not None:
            clauses.append(col(Device.online) == self.online)
        if self.model is not None:
            name, sep, version = self.model.partition(":")
            if sep:
                clauses += [col(Device.running_name) == name, col(Device.running_version) == version]
            elif SHA256_RE.match(self.model):
                clauses.append(col(Device.running_sha256) == self.model)
            else:
                clauses.append(col(Device.running_name) == self.model)
        return clauses


def register_device(
    session: Session,
    device_id: str,
    hardware_id: str,
    tags: dict[str, str],
    shards: Sequence[str] = (DEFAULT_SHARD,),
) -> tuple[Device, bool]:
    """The device and whether this call created it. A new device is placed on one of ``shards``
    (``fleet_server.shards.assign``, as provisioning placed it), for good: registering it again
    never moves it."""
    existing = session.get(Device, device_id)
    if existing is not None:
        if existing.hardware_id == hardware_id and existing.tags == tags:
            return existing, False
        raise Conflict("device_exists", f"device {device_id} is registered with other attributes")
    device = Device(
        id=device_id,
        hardware_id=hardware_id,
        tags=dict(tags),
        registered_at=utcnow(),
        broker_shard=assign(device_id, shards),
    )
    session.add(device)
    try:
        session.commit()
    except IntegrityError:  # registered concurrently
        raise Conflict("device_exists", f"device {device_id} is already registered") from None
    return device, True


def list_devices(
    session: Session,
    where: DeviceFilter | None = None,
    *,
    cursor: str | None = None,
    limit: int = DEFAULT_LIMIT,
) -> Page[Device]:
    """One page of the devices ``where`` keeps, by id, after ``cursor``."""
    where = where or DeviceFilter()
    clauses = where.sql(session.get_bind().dialect.name)
    spec = where.selector.get("agent_version")
    if spec is None:
        return select_page(
            session, select(Device).where(*clauses), [col(Device.id)], "devices", cursor, limit
        )
    # PEP 440 ordering is tested here: scan only (id, agent version), then read the page's rows
    versions = select(col(Device.id), col(Device.agent_version)).where(*clauses)
    ids: Page[Any] = select_page(
        session,
        versions,
        [col(Device.id)],
        "devices",
        cursor,
        limit,
        lambda r: agent_version_matches(r[1], spec),
    )
    rows = session.exec(
        select(Device).where(col(Device.id).in_([r[0] for r in ids.items])).order_by(col(Device.id))
    )
    return Page(list(rows.all()), ids.next)


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
    held = session.exec(
        select(Experiment.id)
        .join(ExperimentDevice, col(ExperimentDevice.experiment_id) == col(Experiment.id))
        .where(ExperimentDevice.device_id == device_id, Experiment.state == "running")
    ).all()
    if held:
        raise Conflict(
            "device_in_experiment",
            f"device {device_id} is in running experiment(s) {', '.join(sorted(held))}: stop them first",
        )
    session.execute(delete(RolloutDevice).where(col(RolloutDevice.device_id) == device_id))
    session.execute(delete(ExperimentDevice).where(col(ExperimentDevice.device_id) == device_id))
    session.execute(delete(ModelAggregate).where(col(ModelAggregate.device_id) == device_id))
    session.execute(delete(OutcomeAggregate).where(col(OutcomeAggregate.device_id) == device_id))
    session.delete(device)
    try:
        session.commit()
    except IntegrityError:  # a rollout took it in meanwhile
        raise Conflict("device_in_rollout", f"device {device_id} was just added to a rollout") from None
    return device


__all__ = ["delete_device", "get_device", "list_devices", "register_device", "set_tags"]


__all__ = ["DeviceFilter", "delete_device", "get_device", "list_devices", "register_device", "set_tags"]
