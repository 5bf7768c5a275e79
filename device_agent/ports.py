"""The agent shell's two injected interfaces: its message link and its fetcher.

``Agent(config, trust, runtime_factory, link=..., fetcher=...)`` takes any object
of these shapes. By default it builds the real ones from its config
(:class:`device_agent.mqtt_link.MqttLink`,
:class:`device_agent.http_fetcher.HttpFetcher`); the tests give it an in-memory
link and fetcher instead, so the shell runs without a broker or a web server,
the way python-tuf's ``Updater`` takes a ``FetcherInterface``.

Error contract of a fetcher: :class:`signing.errors.Unavailable` when nothing
could be fetched (the agent retries within ``delivery_retry_s``), a
:class:`signing.errors.TrustError` when what was fetched is refused, any other
:class:`signing.errors.CodedError` when the server refused (final).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from types import TracebackType

    from device_agent.trust_state import TrustStore
    from device_agent.wire import ModelRef
    from signing.errors import DeliveryError

MessageHandler = Callable[[str, bytes, bool], None]  # topic, payload, retained
ConnectHandler = Callable[[], None]


class Admission(Protocol):
    """A turn at the install's heavy steps (fetch and verify; load and acceptance check), held for
    their length: ``async with admission: ...``. An ``asyncio.Semaphore`` is one.

    A device has its CPU to itself and needs none (the default admits at once). The simulator
    runs a thousand agents on one loop and one core: without taking turns, every install's
    network timeouts would measure the other agents' work (decision 0030)."""

    async def __aenter__(self) -> object: ...

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None, /
    ) -> object: ...


class Link(Protocol):
    """One device's publish/subscribe connection: receives its ``desired`` topic, publishes the rest.

    The link subscribes to the device's ``desired`` topic, publishes ``online`` on
    every connect and leaves ``offline`` as its last will. Every call happens on
    the agent's asyncio loop; the handlers are called there too.
    """

    @property
    def connected(self) -> bool: ...

    async def start(self, on_message: MessageHandler, on_connected: ConnectHandler) -> None:
        """Connect (in the background, retrying, if the other end is away)."""
        ...

    async def wait_connected(self, timeout: float | None = None) -> bool: ...

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> bool:
        """Send while connected; False when not connected or the send window stayed full."""
        ...

    async def publish_confirmed(self, topic: str, payload: bytes, timeout: float = 10.0) -> bool:
        """Send at QoS 1 and wait for the acknowledgement; False if none came (keep the data)."""
        ...

    async def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every publish so far is acknowledged."""
        ...

    async def stop(self) -> None:
        """Publish ``offline`` and disconnect cleanly."""
        ...

    def abort(self) -> None:
        """Drop the connection as a power cut would (the last will speaks for us)."""
        ...


class Fetcher(Protocol):
    """Where the bytes of an install come from: bundle envelopes, model files, TUF metadata."""

    async def envelope(self, url: str) -> bytes:
        """A bundle's DSSE envelope (small; bounded)."""
        ...

    async def model(self, url: str, part: Path, *, length: int, sha256: str) -> None:
        """Fetch ``url`` into ``part`` (resuming what it holds) and prove ``length`` and ``sha256``.

        Raises IncompleteDownload (keep the partial file), LengthMismatch or
        DigestMismatch (the partial file is gone), or the errors above.
        """
        ...

    def release(
        self, store: TrustStore, base_url: str, ref: ModelRef, hardware_id: str, now: datetime
    ) -> None:
        """TUF: check ``ref`` against the release-signed metadata; advance ``store``. Blocking."""
        ...

    def root(self, store: TrustStore, base_url: str, now: datetime) -> DeliveryError | None:
        """TUF: walk the root chain as far as it verifies; what refused the rest. Blocking."""
        ...


__all__ = ["Admission", "ConnectHandler", "Fetcher", "Link", "MessageHandler"]
