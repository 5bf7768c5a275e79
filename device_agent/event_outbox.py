"""Deployment events the broker has not taken yet, in the order they happened, each with an id.

An event is a record of why a device did what it did (a refused directive, a failed download, a
revert), and the rollout engine and the operator's event trail read it. Handing one to the link
fails while the broker is away, which is when such events happen most, so the agent keeps them
here and sends them, oldest first, as soon as the link is back. Once paho has taken a QoS 1
message it resends it itself until the broker acknowledges it; what is kept here is what the link
refused. (paho may keep a message it refused for want of a connection too, and send it on
reconnecting: the event then arrives twice, and the server stores it once.)

Each event gets an id unique to the device (a random prefix per agent start and a count), so the
server stores an event sent twice (a resend after a lost acknowledgement) once. The queue is held
in memory and bounded: it outlives a lost connection, not the agent process (the device's
reported state, retained on the broker, says where it stands after a restart), and past
``capacity`` the oldest events go first and are counted.
"""

from __future__ import annotations

import secrets
from collections import deque
from dataclasses import replace

from device_agent import wire

CAPACITY = 512  # events kept while the broker is away; a day offline with an install an hour fits


class EventOutbox:
    """Events not yet handed to the link, oldest first. Not thread-safe: the agent's loop owns it."""

    def __init__(self, capacity: int = CAPACITY, prefix: str | None = None) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.capacity = capacity
        self.prefix = prefix or secrets.token_hex(6)
        self.dropped = 0  # events let go because the queue was full
        self._count = 0
        self._events: deque[wire.Event] = deque()

    def add(self, event: wire.Event) -> wire.Event:
        """Queue ``event`` with an id of its own (one it carries already is kept); returns it."""
        if event.event_id is None:
            self._count += 1
            event = replace(event, event_id=f"{self.prefix}-{self._count}")
        if len(self._events) >= self.capacity:
            self._events.popleft()
            self.dropped += 1
        self._events.append(event)
        return event

    def head(self) -> wire.Event | None:
        """The oldest event not yet sent, or None."""
        return self._events[0] if self._events else None

    def sent(self, event: wire.Event) -> None:
        """``event`` was handed to the link: take it off the queue (if it is still the head: a full
        queue may have let it go meanwhile)."""
        if self._events and self._events[0] is event:
            self._events.popleft()

    def __len__(self) -> int:
        return len(self._events)


__all__ = ["CAPACITY", "EventOutbox"]
