"""Ingest counters served by ``/api/v1/stats``.

In memory and per process: they say what this server instance saw since it
started (malformed input, strangers, duplicates), which is what an operator
debugging ingest needs; durable history lives in the tables.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class Counters:
    malformed_messages: int = 0
    unregistered_messages: int = 0
    telemetry_batches: int = 0
    duplicate_batches: int = 0
    events: int = 0
    reported: int = 0
    status: int = 0
    directives_published: int = 0
    dropped_messages: int = 0  # valid messages the database refused (bad data), logged and acknowledged
    mqtt_disconnects: int = 0  # unexpected MQTT disconnects of this server's clients (e.g. missed keepalive)
    drift_detected: int = 0  # devices seen going off their desired seq or model (fleet_server.reconcile)
    directives_republished: int = 0  # directives sent again to a drifting device
    directives_restored: int = 0  # deleted retained directives put back
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + n)

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}
