"""Telemetry upstream: cut windows on time or size, send queued batches oldest first.

A window is cut every ``telemetry_interval`` or as soon as it holds
``telemetry_batch_max`` inferences, and queued on disk
(:mod:`device_agent.telemetry_store`). Batches go out oldest first, at most
``max_inflight`` at a time, and each is deleted only once the broker acknowledged
it, so a broker outage loses nothing that fits in the queue.

The uplink sleeps until the window's interval ends and is woken early only by a
full window (:meth:`Telemetry.notify_full`): one timer per window instead of a
poll four times a second, which on a device is wakeups for nothing and in a
simulated fleet of thousands of agents on one loop was the largest part of its
idle CPU. Cutting a window and reading the queue's oldest batches is one trip to
a worker thread, and forgetting the acknowledged batches one more (one SQLite
transaction), instead of a trip per step and per batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from device_agent import wire
from device_agent.config import AgentConfig
from device_agent.metrics import Metrics
from device_agent.ports import Link
from device_agent.telemetry import Telemetry

log = logging.getLogger(__name__)


class TelemetryUplink:
    def __init__(
        self, config: AgentConfig, telemetry: Telemetry, metrics: Metrics, link: Callable[[], Link | None]
    ) -> None:
        self.config, self.telemetry, self.metrics, self.link = config, telemetry, metrics, link
        self.topic = wire.topic(config.device_id, wire.Channel.TELEMETRY)
        self._sending = asyncio.Lock()
        self._cuts = 0  # windows this uplink queued: a send that read the queue before one re-reads
        self._sends = 0  # sends that took the queue: rows a tick read before one began may be gone

    async def run(self) -> None:
        """Cut and send windows until cancelled; one bad window never ends telemetry for good."""
        loop = asyncio.get_running_loop()
        interval = self.config.telemetry_interval
        batch_max = self.config.telemetry_batch_max
        wake: asyncio.Future[None] | None = None

        def wake_now() -> None:  # on the loop: reads the future the uplink waits on now
            _wake(wake)

        def full() -> None:  # any thread: the window reached batch_max
            with contextlib.suppress(RuntimeError):  # the loop is closing
                loop.call_soon_threadsafe(wake_now)

        self.telemetry.notify_full(batch_max, full)
        try:
            last = loop.time()
            while True:
                left = last + interval - loop.time()
                if left > 0 and self.telemetry.window_inferences < batch_max:
                    wake = loop.create_future()
                    timer = loop.call_later(left, _wake, wake)
                    try:
                        await wake
                    finally:
                        timer.cancel()
                    continue  # the interval ended, or the window filled: both checked above
                last = loop.time()
                try:
                    await self._cut_and_send()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    self.metrics.count("telemetry_errors")
                    log.exception("%s: telemetry window failed", self.config.device_id)
        finally:
            self.telemetry.notify_full(0, None)

    async def _cut_and_send(self) -> None:
        store, limit = self.telemetry.store, max(1, self.config.max_inflight)

        def cut() -> tuple[bool, list[tuple[int, str, bytes]]]:
            queued = self.telemetry.cut() is not None
            return queued, store.oldest(limit) if self._ready() else []

        sends = self._sends
        queued, rows = await asyncio.to_thread(cut)
        self._cuts += queued
        if rows and self._sends == sends:
            await self.send(rows)
        elif rows or queued:
            # A send under way sees the new batch (or none could start). One that began while the
            # rows were read (a reconnect's) may have delivered and forgotten them already: the
            # queue is read again rather than deliver them twice.
            await self.send()

    def _forget(self, row_ids: list[int]) -> bool:
        """Delete acknowledged batches and count those this removed as sent, in one worker-thread trip.

        A batch counts once, when the queue forgets it: ``telemetry_batches`` is what the server
        should have stored. Counting acknowledgements counted a batch twice when it went out twice
        (a stop cancels a send between its acknowledgements and its delete, the delete never
        runs, and the stop's flush sends the batch again). Counting on the loop after the delete
        would miss a delete that ran while its send was cancelled; here both happen or neither."""
        gone = self.telemetry.store.delete_many(row_ids)
        if gone is None:
            return False
        self.metrics.count("telemetry_batches", gone)
        return True

    def _ready(self) -> bool:
        """Whether :meth:`send` would send now (connected, no send under way)."""
        link = self.link()
        return link is not None and link.connected and not self._sending.locked()

    async def flush(self) -> None:
        """Cut the open window and send everything queued: a clean stop's last word.

        Unlike a tick, it waits for a send under way (a reconnect's "send what is
        queued" may hold the queue for as long as new windows keep arriving) and then
        reads the queue again, so the window cut here leaves before the link closes
        instead of waiting on disk for the next start."""
        queued = await asyncio.to_thread(self.telemetry.cut) is not None
        self._cuts += queued  # read after the await: a tick's cut meanwhile is not lost
        await self.send(wait=True)

    async def send(self, rows: list[tuple[int, str, bytes]] | None = None, *, wait: bool = False) -> None:
        """Send queued batches oldest first, deleting each only once the broker acknowledged it.

        ``rows``: the queue's oldest batches, read by the caller since the last send began (None: read
        here).
        ``wait``: queue behind a send under way instead of leaving the work to it."""
        link = self.link()
        if link is None or (self._sending.locked() and not wait):
            return
        store = self.telemetry.store
        limit = max(1, self.config.max_inflight)
        async with self._sending:
            self._sends += 1
            seen = self._cuts
            while link.connected:
                if rows is None:
                    seen = self._cuts
                    rows = await asyncio.to_thread(store.oldest, limit)
                if not rows:
                    return
                acks = await asyncio.gather(
                    *(link.publish_confirmed(self.topic, payload) for _, _, payload in rows)
                )
                acked = [row_id for (row_id, _, _), ok in zip(rows, acks, strict=True) if ok]
                deleted = True
                if acked:
                    deleted = await asyncio.to_thread(self._forget, acked)
                if not all(acks) or not deleted:
                    return  # broker away, or a disk too full to forget sent batches: next tick
                if len(rows) < limit and self._cuts == seen:
                    return  # the read emptied the queue and nothing was queued since
                rows = None


def _wake(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


__all__ = ["TelemetryUplink"]
