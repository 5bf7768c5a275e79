"""Fault-injecting network paths between simulated devices and the real broker / artifact server.

The agents stay unmodified: each faulty device's MQTT connection goes through a
:class:`TcpFaultProxy` (one listening port per device, so a fault hits exactly
that device), and every download goes through one :class:`HttpFaultProxy` that
tells devices apart by the ``X-Edgefleet-Device`` header the agent already
sends. The server's ``public_url`` points at the HTTP proxy, so the signed
directives carry its address.

What a profile does to the bytes (applied per chunk read from the socket, in order):

- ``latency_ms`` (+ uniform ``jitter_ms``): a delay before each chunk is forwarded;
- ``bandwidth_kbps``: pacing, ``len(chunk) * 8 / kbps`` ms per chunk;
- ``loss``: the probability that a chunk hits a TCP retransmission timeout
  (``RTO_S`` extra delay): over TCP, loss shows up to the application as stalls,
  not as missing bytes;
- ``partitioned``: open connections are reset and new ones are closed at once
  until :meth:`LinkState.heal`;
- HTTP only: ``corrupt_downloads`` (that many responses get one body byte
  flipped) and ``cut_downloads_after`` (the next response is cut after that many
  body bytes, once: a connection lost mid-download).

All proxies run on one :class:`NetworkThread` loop, apart from the agents' loop,
so a stalled fleet loop does not distort the network and vice versa.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import random
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, TypeVar

RTO_S = 0.2  # a typical minimum TCP retransmission timeout
CHUNK = 16 * 1024
MAX_HEAD = 64 * 1024
DEVICE_HEADER = b"x-edgefleet-device"
_T = TypeVar("_T")


@dataclass(frozen=True)
class NetProfile:
    """Link quality of a device class: latency, jitter, bandwidth (0 = unlimited), loss."""

    latency_ms: float = 0.0
    jitter_ms: float = 0.0
    bandwidth_kbps: float = 0.0
    loss: float = 0.0

    def __post_init__(self) -> None:
        if min(self.latency_ms, self.jitter_ms, self.bandwidth_kbps) < 0:
            raise ValueError("latency_ms, jitter_ms and bandwidth_kbps must be >= 0")
        if not 0.0 <= self.loss < 1.0:
            raise ValueError(f"loss must be in [0, 1), got {self.loss}")

    @property
    def ideal(self) -> bool:
        return self == NetProfile()

    def delay(self, nbytes: int, rng: random.Random) -> float:
        """Seconds to hold a chunk of ``nbytes`` before forwarding it."""
        d = (self.latency_ms + rng.uniform(0.0, self.jitter_ms)) / 1000.0
        if self.bandwidth_kbps > 0:
            d += nbytes * 8 / (self.bandwidth_kbps * 1000.0)
        if self.loss > 0 and rng.random() < self.loss:
            d += RTO_S
        return d


@dataclass
class LinkState:
    """One device's mutable network conditions; proxies read it on every chunk."""

    profile: NetProfile = field(default_factory=NetProfile)
    partitioned: bool = False
    corrupt_downloads: int = 0
    cut_downloads_after: int | None = None
    corrupted: int = 0  # responses actually corrupted (for the report)
    cuts: int = 0
    _writers: set[asyncio.StreamWriter] = field(default_factory=set, repr=False)

    def partition(self) -> None:
        """Reset every open connection; refuse new ones until :meth:`heal`. Call on the network loop."""
        self.partitioned = True
        for w in list(self._writers):
            _abort(w)

    def heal(self) -> None:
        self.partitioned = False


def _abort(writer: asyncio.StreamWriter) -> None:
    transport = writer.transport
    with contextlib.suppress(Exception):
        transport.abort()


async def _pump(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, link: LinkState, rng: random.Random
) -> None:
    """Forward bytes one way, shaped by ``link.profile``, until EOF or a partition."""
    while True:
        data = await reader.read(CHUNK)
        if not data or link.partitioned:
            break
        delay = link.profile.delay(len(data), rng)
        if delay > 0:
            await asyncio.sleep(delay)
        if link.partitioned:
            break
        writer.write(data)
        await writer.drain()


class TcpFaultProxy:
    """A loopback TCP proxy for one device: ``port`` forwards to ``upstream`` through ``link``."""

    def __init__(self, upstream_host: str, upstream_port: int, link: LinkState, seed: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.link = link
        self.rng = random.Random(seed)
        self.port = 0
        self._server: asyncio.AbstractServer | None = None
        self.connections = 0

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0, backlog=16)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self.link._writers):
            _abort(w)

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self.link.partitioned:
            _abort(c_writer)
            return
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(c_writer)  # upstream down (broker restarting): the device sees a reset
            return
        self.link._writers.update((c_writer, u_writer))
        try:
            up = asyncio.ensure_future(_pump(c_reader, u_writer, self.link, self.rng))
            down = asyncio.ensure_future(_pump(u_reader, c_writer, self.link, self.rng))
            _done, pending = await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        except Exception:  # a reset mid-pump is the expected end of a faulty connection
            pass
        finally:
            for w in (c_writer, u_writer):
                self.link._writers.discard(w)
                _abort(w)


class HttpFaultProxy:
    """One HTTP/1.1 proxy in front of the artifact server, faulting per device by request header.

    Each request gets its own upstream connection with ``Connection: close``,
    so the client never reuses a connection the proxy is about to end.
    ``max_upstream`` (0 = unlimited) bounds concurrent upstream requests, as a
    reverse proxy in front of the server would; the others wait their turn.
    """

    def __init__(self, upstream_host: str, upstream_port: int, seed: int = 0, max_upstream: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.max_upstream = max_upstream
        self._slots: asyncio.Semaphore | None = None
        self.links: dict[str, LinkState] = {}
        self.default = LinkState()
        self.rng = random.Random(seed)
        self.port = 0
        self.requests = 0
        self.bad_requests = 0
        self.bytes_out = 0  # response bytes (head and body) relayed to the devices
        self._server: asyncio.AbstractServer | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def link(self, device_id: str) -> LinkState:
        return self.links.get(device_id, self.default)

    async def start(self, port: int = 0) -> None:
        if self.max_upstream > 0:
            self._slots = asyncio.Semaphore(self.max_upstream)
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", port, backlog=1024)
        self.port = int(self._server.sockets[0].getsockname()[1])

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()

    async def _handle(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        if self._slots is None:
            await self._serve(c_reader, c_writer)
            return
        async with self._slots:
            await self._serve(c_reader, c_writer)

    async def _serve(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        self.requests += 1
        try:
            head = await c_reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            self.bad_requests += 1
            _abort(c_writer)
            return
        lines = head.split(b"\r\n")
        device = ""
        kept = [lines[0]]
        for line in lines[1:]:
            if not line:
                continue
            name, _, value = line.partition(b":")
            lname = name.strip().lower()
            if lname == DEVICE_HEADER:
                device = value.strip().decode("ascii", "replace")
            if lname in (b"connection", b"keep-alive"):
                continue
            kept.append(line)
        kept.append(b"Connection: close")
        link = self.link(device)
        if link.partitioned:
            _abort(c_writer)
            return
        try:
            u_reader, u_writer = await asyncio.open_connection(*self.upstream)
        except OSError:
            _abort(c_writer)  # server down (restarting): the device sees a reset
            return
        link._writers.update((c_writer, u_writer))
        try:
            u_writer.write(b"\r\n".join(kept) + b"\r\n\r\n")
            await u_writer.drain()
            path = lines[0].split(b" ")[1] if len(lines[0].split(b" ")) > 1 else b""
            await self._respond(u_reader, c_writer, link, model_bytes=not path.endswith(b"/envelope"))
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            for w in (c_writer, u_writer):
                link._writers.discard(w)
            with contextlib.suppress(Exception):
                u_writer.close()
            with contextlib.suppress(Exception):
                await c_writer.drain()
                c_writer.close()

    async def _respond(
        self,
        u_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        link: LinkState,
        *,
        model_bytes: bool = True,
    ) -> None:
        """Relay the response; faults hit model bytes only (a broken envelope is another test)."""
        head = await u_reader.readuntil(b"\r\n\r\n")
        c_writer.write(head)
        self.bytes_out += len(head)
        status_ok = model_bytes and head.split(b" ", 2)[1:2] in ([b"200"], [b"206"])
        corrupt = status_ok and link.corrupt_downloads > 0
        if corrupt:
            link.corrupt_downloads -= 1
        cut_after = link.cut_downloads_after if status_ok else None
        if cut_after is not None:
            link.cut_downloads_after = None
        sent = 0
        while True:
            data = await u_reader.read(CHUNK)
            if not data or link.partitioned:
                break
            if corrupt and data:
                flipped = bytearray(data)
                flipped[len(flipped) // 2] ^= 0xFF
                data = bytes(flipped)
                corrupt = False
                link.corrupted += 1
            if cut_after is not None and sent + len(data) > cut_after:
                c_writer.write(data[: max(0, cut_after - sent)])
                await c_writer.drain()
                link.cuts += 1
                _abort(c_writer)
                return
            delay = link.profile.delay(len(data), self.rng)
            if delay > 0:
                await asyncio.sleep(delay)
            c_writer.write(data)
            await c_writer.drain()
            sent += len(data)
            self.bytes_out += len(data)


class NetworkThread:
    """An asyncio loop in a daemon thread that hosts every proxy of a simulation."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="edgefleet-netem", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, _T], timeout: float | None = 30.0) -> _T:
        fut: concurrent.futures.Future[_T] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def call(self, fn: Any, *args: Any) -> None:
        """Run a plain callable on the network loop (e.g. ``link.partition``) and wait for it."""

        async def _call() -> None:
            fn(*args)

        self.run(_call())

    def close(self) -> None:
        if self.loop.is_running():

            async def _cancel_all() -> None:
                me = asyncio.current_task()
                tasks = [t for t in asyncio.all_tasks() if t is not me]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            with contextlib.suppress(Exception):
                self.run(_cancel_all(), timeout=5)
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        if not self.loop.is_running():
            self.loop.close()


__all__ = ["HttpFaultProxy", "LinkState", "NetProfile", "NetworkThread", "TcpFaultProxy"]
