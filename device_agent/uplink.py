"""Telemetry upstream: cut windows on time or size, send queued batches oldest first.

A window is cut every ``telemetry_interval`` or as soon as it holds
``telemetry_batch_max`` inferences, and queued on disk
(:mod:`device_agent.telemetry_store`). Batches go out oldest first, at most
``max_inflight`` at a time, and each is deleted only once the broker acknowledged
it, so a broker outage loses nothing that fits in the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
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

    async def run(self) -> None:
        """Cut and send windows until cancelled; one bad window never ends telemetry for good."""
        interval = self.config.telemetry_interval
        tick = min(interval, 0.25)
        last = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            if (
                time.monotonic() - last < interval
                and self.telemetry.window_inferences < self.config.telemetry_batch_max
            ):
                continue
            last = time.monotonic()
            try:
                await asyncio.to_thread(self.telemetry.cut)
                await self.send()
            except asyncio.CancelledError:
                raise
            except Exception:
                self.metrics.count("telemetry_errors")
                log.exception("%s: telemetry window failed", self.config.device_id)

    async def send(self) -> None:
        """Send queued batches oldest first, deleting each only once the broker acknowledged it."""
        link = self.link()
        if link is None or self._sending.locked():
            return
        store = self.telemetry.store
        async with self._sending:
            while link.connected:
                rows = await asyncio.to_thread(store.oldest, max(1, self.config.max_inflight))
                if not rows:
                    return
                acks = await asyncio.gather(
                    *(link.publish_confirmed(self.topic, payload) for _, _, payload in rows)
                )
                deleted = True
                for (row_id, _, _), acked in zip(rows, acks, strict=True):
                    if acked:
                        self.metrics.count("telemetry_batches")
                        deleted = await asyncio.to_thread(store.delete, row_id) and deleted
                if not all(acks) or not deleted:
                    return  # broker away, or a disk too full to forget sent batches: next tick


__all__ = ["TelemetryUplink"]
