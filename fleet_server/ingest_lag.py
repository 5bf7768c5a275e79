"""How far behind ingest is, measured through the broker's queue with a probe message per worker.

An ingest worker that cannot keep up (starved of CPU, stopped, a slow
database) does not hold its backlog itself: its pipeline takes a bounded number
of messages (``Pipeline.max_backlog``) and then holds paho's thread, so the rest
waits in the broker's queue for the worker's session. There the server's own
figure (``Pipeline.lag``: how long the oldest message being stored has waited
since paho read it) cannot see it: a worker minutes behind the fleet read as a
second or two, and a worker that stopped reporting read as its last report.

So the server's main process publishes a QoS 1 probe (its publish time, on the
server's clock) to a topic only that worker subscribes to, on every broker
shard, one probe at a time and at most every ``PROBE_INTERVAL``. Mosquitto
queues a client's deliveries in one FIFO whatever the subscription, so the probe
waits behind everything queued for the worker; the worker's store thread takes
it in order with the flush it arrives in and reports it once that flush is
committed. The lag is the time since the probe still on its way was published,
or the last probe's round trip if that is longer: how long a batch published
now waits before it is in the database. It needs no device clock, and it grows
while a worker is stopped outright.

The probe topic is a ``desired`` topic under the server's reserved prefix: the
server account may publish and read there (the broker ACL), no device can have
that id, and the main client, which reads every ``desired`` topic, ignores
reserved ids.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable

from device_agent import protocol
from fleet_server.mqtt_identity import SERVER_ACCOUNT

PROBE_INTERVAL = 1.0  # seconds between probes to one worker on one shard (one in flight at a time)


def probe_topic(client_id: str) -> str:
    """The topic an ingest worker with this client id subscribes to for its lag probes."""
    tag = hashlib.blake2b(client_id.encode(), digest_size=8).hexdigest()
    return protocol.topic(f"{SERVER_ACCOUNT}-lag-{tag}", protocol.Channel.DESIRED)


class LagProbe:
    """One worker's probes on one shard, as the server's main process sees them (thread-safe)."""

    def __init__(
        self, topic: str, interval: float = PROBE_INTERVAL, clock: Callable[[], float] = time.time
    ) -> None:
        self.topic, self.interval, self.clock = topic, interval, clock
        self._lock = threading.Lock()
        self._token: str | None = None  # the probe on its way
        self._sent_at = 0.0
        self._last = 0.0  # round trip of the last probe stored, seconds
        self._next = 0.0

    def due(self) -> bool:
        """No probe on its way and the interval since the last one has passed."""
        with self._lock:
            return self._token is None and self.clock() >= self._next

    def sent(self, token: str) -> None:
        with self._lock:
            now = self.clock()
            self._token, self._sent_at, self._next = token, now, now + self.interval

    def stored(self, token: str) -> None:
        """The worker stored (committed) this probe; tokens of probes not on their way are ignored
        (one queued for an earlier session of the worker)."""
        with self._lock:
            if token == self._token:
                self._last = max(self.clock() - self._sent_at, 0.0)
                self._token = None

    def reset(self) -> None:
        """The worker's session changed (restarted, reconnected): a probe queued for the old one
        may never arrive, so stop waiting for it; the next goes out at once."""
        with self._lock:
            self._token, self._next = None, 0.0

    @property
    def lag(self) -> float:
        with self._lock:
            waiting = self.clock() - self._sent_at if self._token is not None else 0.0
            return max(self._last, waiting, 0.0)


def token(now: float) -> str:
    """A probe's payload: its publish time, which also tells one probe from the next."""
    return f"{now:.6f}"


__all__ = ["PROBE_INTERVAL", "LagProbe", "probe_topic", "token"]
