"""The telemetry uplink without polling: a full window wakes it, acknowledged batches go in one delete."""

from __future__ import annotations

import asyncio
import json
import threading
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from device_agent import wire
from device_agent.config import AgentConfig
from device_agent.memory_link import MemoryLink
from device_agent.metrics import Metrics
from device_agent.telemetry import Telemetry
from device_agent.telemetry_store import BatchStore
from device_agent.uplink import TelemetryUplink


def _batches(link: MemoryLink) -> list[dict[str, object]]:
    return [json.loads(zlib.decompress(m.payload)) for m in link.published(wire.Channel.TELEMETRY)]


def test_a_full_window_is_sent_at_once_and_an_idle_one_at_its_interval(tmp_path: Path) -> None:
    """The uplink sleeps for the whole interval: only the window reaching ``telemetry_batch_max``
    (recorded on another thread, as the local API does) wakes it early."""

    async def main() -> None:
        link = MemoryLink("dev-uplink")
        await link.start(lambda *_: None, lambda: None)
        telemetry = Telemetry("dev-uplink", BatchStore(tmp_path / "q.db"))
        config = AgentConfig(
            "dev-uplink", "rpi4", tmp_path, tmp_path / "trust.json", telemetry_interval=3.0,
            telemetry_batch_max=5,
        )  # fmt: skip
        metrics = Metrics()
        task = asyncio.get_running_loop().create_task(
            TelemetryUplink(config, telemetry, metrics, lambda: link).run()
        )
        try:
            for _ in range(4):
                telemetry.record("a" * 64, 120.0, None, [1])
            await asyncio.sleep(0.3)
            assert _batches(link) == []  # 4 of 5: nothing to cut yet
            await asyncio.to_thread(telemetry.record, "a" * 64, 120.0, None, [1])
            assert await link.wait_until(lambda: len(_batches(link)) == 1, timeout=1.0)
            first = _batches(link)[0]
            assert first["models"]["a" * 64]["inferences"] == 5  # type: ignore[index]
            for _ in range(100):  # acknowledged, then deleted (off the loop)
                if len(telemetry.store) == 0:
                    break
                await asyncio.sleep(0.01)
            assert len(telemetry.store) == 0

            telemetry.record("a" * 64, 120.0, None, [2])  # a window that never fills...
            await asyncio.sleep(0.5)
            assert len(_batches(link)) == 1
            assert await link.wait_until(lambda: len(_batches(link)) == 2, timeout=5.0)  # ...at the interval
            assert _batches(link)[1]["models"]["a" * 64]["inferences"] == 1  # type: ignore[index]
            for _ in range(100):  # counted sent once forgotten (off the loop)
                if metrics.get("telemetry_batches") == 2:
                    break
                await asyncio.sleep(0.01)
            assert metrics.get("telemetry_batches") == 2
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        assert telemetry._on_full is None  # a stopped uplink leaves no callback on the recorder
        telemetry.store.close()

    asyncio.run(main())


def test_delete_many_forgets_exactly_the_named_batches(tmp_path: Path) -> None:
    store = BatchStore(tmp_path / "q.db")
    for i in range(700):  # more than one chunk of parameters
        store.put(f"b{i}", lambda dropped: b"x")
    rows = store.oldest(700)
    keep = {rows[3][0], rows[650][0]}
    assert store.delete_many([r[0] for r in rows if r[0] not in keep]) == 698
    assert sorted(r[1] for r in store.oldest(10)) == ["b3", "b650"]
    assert store.delete_many([]) == 0
    assert store.delete_many([r[0] for r in rows]) == 2  # the others were forgotten already
    assert len(store) == 0
    store.close()


class _HeldLink(MemoryLink):
    """Holds every acknowledgement until released: a send under way, frozen mid-flight."""

    def __init__(self, device_id: str) -> None:
        super().__init__(device_id)
        self.release = asyncio.Event()

    async def publish_confirmed(self, topic: str, payload: bytes, timeout: float = 10.0) -> bool:
        sent = await self.publish(topic, payload)
        await self.release.wait()
        return sent and self.acks


def test_flush_sends_the_last_window_behind_a_send_already_under_way(tmp_path: Path) -> None:
    """A reconnect's "send what is queued" can hold the queue when the agent stops: the stop's
    last window must queue behind it and leave too, not wait on disk for the next start."""

    async def main() -> None:
        link = _HeldLink("dev-flush")
        await link.start(lambda *_: None, lambda: None)
        telemetry = Telemetry("dev-flush", BatchStore(tmp_path / "q.db"))
        config = AgentConfig("dev-flush", "rpi4", tmp_path, tmp_path / "trust.json", max_inflight=4)
        uplink = TelemetryUplink(config, telemetry, Metrics(), lambda: link)
        telemetry.record("a" * 64, 120.0, None, [1])
        assert telemetry.cut() is not None
        under_way = asyncio.create_task(uplink.send())
        assert await link.wait_until(lambda: len(_batches(link)) == 1, timeout=1.0)
        telemetry.record("a" * 64, 120.0, None, [2])
        telemetry.record("a" * 64, 120.0, None, [2])
        flush = asyncio.create_task(uplink.flush())
        await asyncio.sleep(0.1)
        link.release.set()
        await asyncio.wait_for(asyncio.gather(under_way, flush), timeout=5.0)
        counts = [b["models"]["a" * 64]["inferences"] for b in _batches(link)]  # type: ignore[index]
        assert counts == [1, 2]
        assert len(telemetry.store) == 0  # both acknowledged, both forgotten

        link.disconnect()  # the broker is away: the last window is kept on disk, not dropped
        await asyncio.sleep(0.05)
        telemetry.record("a" * 64, 120.0, None, [3])
        await asyncio.wait_for(uplink.flush(), timeout=5.0)
        assert len(telemetry.store) == 1 and len(_batches(link)) == 2
        telemetry.store.close()

    asyncio.run(main())


class _PausedStore(BatchStore):
    """The first ``oldest`` read returns, then holds its caller's thread until released: the
    tick's trip to its worker thread, outrun by the loop (a loaded machine)."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.read = threading.Event()
        self.release = threading.Event()
        self._paused = False

    def oldest(self, limit: int = 20) -> list[tuple[int, str, bytes]]:
        rows = super().oldest(limit)
        if not self._paused:
            self._paused = True
            self.read.set()
            self.release.wait(5.0)
        return rows


def test_a_tick_sends_nothing_a_send_meanwhile_delivered(tmp_path: Path) -> None:
    """A tick reads the queue's oldest batches off the loop, while no send is under way; a reconnect's
    "send what is queued" may start after that read and deliver and forget the same batches before
    the tick is back on the loop. The tick must not publish them again: the server would store them
    once and the agent would count them sent twice (sent exceeds stored: a batch seems lost)."""

    async def main() -> None:
        link = MemoryLink("dev-race")
        await link.start(lambda *_: None, lambda: None)
        store = _PausedStore(tmp_path / "q.db")
        telemetry = Telemetry("dev-race", store)
        config = AgentConfig("dev-race", "rpi4", tmp_path, tmp_path / "trust.json", max_inflight=4)
        metrics = Metrics()
        uplink = TelemetryUplink(config, telemetry, metrics, lambda: link)
        telemetry.record("a" * 64, 120.0, None, [1])
        assert telemetry.cut() is not None  # queued while the broker was away
        tick = asyncio.create_task(uplink._cut_and_send())
        assert await asyncio.to_thread(store.read.wait, 5.0)  # the tick holds the queue's oldest
        await asyncio.wait_for(uplink.send(), timeout=5.0)  # the reconnect's send: delivered, forgotten
        assert len(_batches(link)) == 1 and len(store) == 0
        store.release.set()
        await asyncio.wait_for(tick, timeout=5.0)
        ids = [b["batch_id"] for b in _batches(link)]
        assert len(ids) == 1, f"published again: {ids}"
        assert metrics.get("telemetry_batches") == 1
        store.close()

    asyncio.run(main())


def test_a_stop_cancelling_a_send_before_its_delete_counts_the_batch_once(tmp_path: Path) -> None:
    """A clean stop cancels the uplink, possibly after the broker acknowledged a send's batches and
    before their delete left the busy worker-thread queue: the delete never runs and the stop's
    flush sends them again. The agent must count them sent once, as the server stores them."""

    async def main() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=1))  # one worker: a queue we can hold
        link = MemoryLink("dev-stop")
        await link.start(lambda *_: None, lambda: None)
        telemetry = Telemetry("dev-stop", BatchStore(tmp_path / "q.db"))
        config = AgentConfig("dev-stop", "rpi4", tmp_path, tmp_path / "trust.json", max_inflight=4)
        metrics = Metrics()
        uplink = TelemetryUplink(config, telemetry, metrics, lambda: link)
        telemetry.record("a" * 64, 120.0, None, [1])
        assert telemetry.cut() is not None
        rows = telemetry.store.oldest()
        busy = threading.Event()
        blocker = asyncio.ensure_future(asyncio.to_thread(busy.wait, 5.0))  # the worker is taken
        send = asyncio.create_task(uplink.send(rows))
        assert await link.wait_until(lambda: len(_batches(link)) == 1, timeout=1.0)  # acknowledged
        await asyncio.sleep(0.05)  # the delete waits behind the busy worker
        send.cancel()  # the stop
        await asyncio.gather(send, return_exceptions=True)
        busy.set()
        await blocker
        await asyncio.wait_for(uplink.flush(), timeout=5.0)
        assert len(telemetry.store) == 0
        assert len({b["batch_id"] for b in _batches(link)}) == 1
        assert metrics.get("telemetry_batches") == 1, f"{len(_batches(link))} deliveries of one batch"
        telemetry.store.close()

    asyncio.run(main())
