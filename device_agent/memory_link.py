"""A :class:`device_agent.ports.Link` held in memory: the agent's broker connection without a broker.

What the agent publishes is recorded in order; what a caller ``deliver``s on the
device's ``desired`` topic reaches the agent as a broker message would (a
retained one is delivered again on every reconnect). ``disconnect`` and
``reconnect`` play a broker going away and coming back. It serves the shell's
tests and the benchmarks, which drive a real agent through its public seams
only; the MQTT semantics themselves are tested against a real Mosquitto.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from dataclasses import dataclass

from device_agent import wire
from device_agent.ports import ConnectHandler, MessageHandler


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False


class MemoryLink:
    """One device's link to an in-memory broker. Handlers run on the agent's loop, as with MQTT."""

    def __init__(self, device_id: str, *, online: bool = True) -> None:
        self.device_id = device_id
        self.desired_topic = wire.topic(device_id, wire.Channel.DESIRED)
        self.status_topic = wire.topic(device_id, wire.Channel.STATUS)
        self.online = online  # whether the "broker" is reachable
        self.acks = True  # False: publish_confirmed gets no acknowledgement (the data must be kept)
        self.retained: dict[str, bytes] = {}
        self._published: list[Message] = []
        self._lock = threading.Lock()
        self._connected = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_message: MessageHandler | None = None
        self._on_connected: ConnectHandler | None = None
        self._changed: asyncio.Event | None = None

    # -- what a test or bench reads and does ------------------------------------

    def published(self, channel: wire.Channel | str | None = None) -> list[Message]:
        """Everything the agent published so far (on ``channel`` only, if given), oldest first."""
        with self._lock:
            out = list(self._published)
        if channel is None:
            return out
        topic = wire.topic(self.device_id, channel)
        return [m for m in out if m.topic == topic]

    def deliver(self, payload: bytes, retain: bool = True) -> None:
        """The broker hands the agent a ``desired`` message (thread-safe; retained by default)."""
        if retain:
            with self._lock:
                self.retained[self.desired_topic] = payload
        self._on_loop(lambda: self._hand_over(payload, retain))

    def disconnect(self) -> None:
        """The broker goes away (thread-safe); the agent's publishes fail until ``reconnect``."""
        self.online = False
        self._on_loop(self._drop)

    def reconnect(self) -> None:
        """The broker is back (thread-safe): connect, say ``online``, redeliver the retained directive."""
        self.online = True
        self._on_loop(self._connect)

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        """On the agent's loop: wait until ``predicate()`` holds, re-checked after each publish."""
        assert self._changed is not None, "start the link first"
        deadline = asyncio.get_running_loop().time() + timeout
        while not predicate():
            left = deadline - asyncio.get_running_loop().time()
            if left <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except TimeoutError:
                return predicate()
        return True

    # -- the Link interface ------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected

    async def start(self, on_message: MessageHandler, on_connected: ConnectHandler) -> None:
        self._loop = asyncio.get_running_loop()
        self._changed = asyncio.Event()
        self._on_message, self._on_connected = on_message, on_connected
        if self.online:
            self._connect()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else asyncio.get_running_loop().time() + timeout
        while not self._connected:
            if deadline is not None and asyncio.get_running_loop().time() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> bool:
        if not self._connected:
            return False
        self._record(Message(topic, payload, retain))
        return True

    async def publish_confirmed(self, topic: str, payload: bytes, timeout: float = 10.0) -> bool:
        return await self.publish(topic, payload) and self.acks

    async def drain(self, timeout: float = 5.0) -> bool:
        return True

    async def stop(self) -> None:
        if self._connected:
            self._record(Message(self.status_topic, self._status("offline"), True))
        self._connected = False

    def abort(self) -> None:
        if self._connected:  # the broker publishes the last will
            self._record(Message(self.status_topic, self._status("offline"), True))
        self._connected = False
        self._loop = None

    # -- on the loop -------------------------------------------------------------

    def _on_loop(self, fn: Callable[[], None]) -> None:
        loop = self._loop
        if loop is None:
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    def _connect(self) -> None:
        if self._connected or not self.online:
            return
        self._connected = True
        self._record(Message(self.status_topic, self._status("online"), True))
        if self._on_connected is not None:
            self._on_connected()
        retained = self.retained.get(self.desired_topic)
        if retained is not None:
            self._hand_over(retained, True)

    def _drop(self) -> None:
        self._connected = False

    def _hand_over(self, payload: bytes, retain: bool) -> None:
        if self._connected and self._on_message is not None:
            self._on_message(self.desired_topic, payload, retain)

    def _record(self, message: Message) -> None:
        with self._lock:
            self._published.append(message)
            if message.retain:
                self.retained[message.topic] = message.payload
        if self._changed is not None:
            self._changed.set()

    def _status(self, state: str) -> bytes:
        return wire.encode(wire.Status(device_id=self.device_id, state=state))


__all__ = ["MemoryLink", "Message"]
