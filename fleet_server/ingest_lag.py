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
# A probe still on its way after this long gets a successor: the broker may have dropped the first
# (a full session queue), and without a successor the lag would grow until the worker's session
# changed. The worker's queue is FIFO, so the successor arriving first says the first was lost.
PROBE_RESEND = 15.0


def probe_topic(client_id: str) -> str:
    """The topic an ingest worker with this client id subscribes to for its lag probes."""
    tag = hashlib.blake2b(client_id.encode(), digest_size=8).hexdigest()
    return protocol.topic(f"{SERVER_ACCOUNT}-lag-{tag}", protocol.Channel.DESIRED)


class LagProbe:
    """One worker's probes on one shard, as the server's main process sees them (thread-safe)."""

    def __init__(
        self,
        topic: str,
        interval: float = PROBE_INTERVAL,
        clock: Callable[[], float] = time.time,
        resend: float = PROBE_RESEND,
    ) -> None:
        self.topic, self.interval, self.clock, self.resend = topic, interval, clock, resend
        self._lock = threading.Lock()
        self._on_way: dict[str, float] = {}  # probes on their way, oldest first: token -> sent at
        self._last = 0.0  # round trip of the last probe stored, seconds
        self._next = 0.0

    def due(self) -> bool:
        """No probe on its way and the interval since the last one has passed; or the newest on
        its way has been for ``resend`` seconds (it may have been dropped)."""
        with self._lock:
            now = self.clock()
            if self._on_way:
                return now - next(reversed(self._on_way.values())) >= self.resend
            return now >= self._next

    def sent(self, token: str) -> None:
        with self._lock:
            now = self.clock()
            self._on_way[token] = now
            self._next = now + self.interval

    def forget(self, token: str) -> None:
        """A probe marked on its way was not published after all: it will never be stored."""
        with self._lock:
            self._on_way.pop(token, None)
            self._next = 0.0

    def stored(self, token: str) -> None:
        """The worker stored (committed) this probe. Probes sent before it and not stored are
        lost (the queue is FIFO); tokens not on their way are ignored (one queued for an earlier
        session of the worker)."""
        with self._lock:
            if token not in self._on_way:
                return
            self._last = max(self.clock() - self._on_way[token], 0.0)
            while self._on_way:
                first = next(iter(self._on_way))
                del self._on_way[first]
                if first == token:
                    break

    def reset(self) -> None:
        """The worker's session changed (restarted, reconnected): a probe queued for the old one
        may never arrive, so stop waiting for it; the next goes out at once."""
        with self._lock:
            self._on_way.clear()
            self._next = 0.0

    @property
    def lag(self) -> float:
        """The last round trip, or how long the oldest probe on its way has been, if longer."""
        with self._lock:
            oldest = next(iter(self._on_way.values()), None)
            waiting = self.clock() - oldest if oldest is not None else 0.0
            return max(self._last, waiting, 0.0)


def token(now: float) -> str:
    """A probe's payload: its publish time, which also tells one probe from the next."""
    return f"{now:.6f}"


__all__ = ["PROBE_INTERVAL", "PROBE_RESEND", "LagProbe", "probe_topic", "token"]
