"""Which shard a device's directives go to: the one on its device record (``fleet_server.shards``).

The record's shard never changes once written, so what was read once is kept: the first
lookup loads every registered device's shard in one query, and a device registered later
(on this replica or another) is read when its first directive goes out. With one shard
there is nothing to look up.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from sqlalchemy import Engine
from sqlmodel import Session, col, select

from fleet_server.models import Device
from fleet_server.shards import assign, resolve

log = logging.getLogger(__name__)


class ShardRouter:
    def __init__(self, engine: Engine, names: Sequence[str]) -> None:
        self.engine = engine
        self.names = list(names)
        self._lock = threading.Lock()
        self._known: dict[str, str] = {}
        self._loaded = False

    def shard_of(self, device_id: str) -> str | None:
        """The shard ``device_id`` is on (it may be one this server has no connection to: the caller
        says so); a device with no record is placed as registration would place it."""
        if len(self.names) == 1:
            return self.names[0]
        with self._lock:
            found = self._known.get(device_id)
            if found is not None:
                return found
            with Session(self.engine) as session:
                if not self._loaded:
                    rows = session.exec(select(col(Device.id), col(Device.broker_shard))).all()
                    self._known.update((d, resolve(s, self.names)) for d, s in rows)
                    self._loaded = True
                    found = self._known.get(device_id)
                if found is None:
                    device = session.get(Device, device_id)
                    if device is not None:
                        found = self._known[device_id] = resolve(device.broker_shard, self.names)
            if found is None:
                log.warning("%s has no device record: placing it by its id", device_id)
                return assign(device_id, self.names)
            return found
