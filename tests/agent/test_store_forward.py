"""Store-and-forward telemetry: a size-capped SQLite queue, and a broker outage under load."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from device_agent import protocol
from device_agent.agent import Agent
from device_agent.telemetry import merge_moments
from device_agent.telemetry_store import BatchStore
from edgefleet.broker import start_mosquitto
from signing.keyring import KeyDir

from .harness import (
    ArtifactServer,
    LoopThread,
    X,
    agent_config,
    make_bundle,
    sign_directive,
    unique_id,
    wait_for,
)


def test_store_drops_oldest_at_cap_and_counts_exactly(tmp_path: Path) -> None:
    store = BatchStore(tmp_path / "q.db", max_bytes=1000)
    carried: dict[str, int] = {}

    def put(i: int) -> None:
        def encode(dropped: int) -> bytes:
            carried[f"b{i}"] = dropped
            return bytes(300)

        store.put(f"b{i}", encode)

    for i in range(10):
        put(i)
    rows = store.oldest(100)
    assert [r[1] for r in rows] == ["b7", "b8", "b9"]  # oldest went first, 3 x 300 fits in 1000
    assert store.dropped_total == 7
    # every dropped batch is reported by exactly one surviving (or later dropped) batch
    assert sum(carried[b] for b in ("b7", "b8", "b9")) == 7
    store.close()
    # closed (a stopped agent's): the counts stay readable at their last values, close again is a no-op
    assert (len(store), store.size_bytes, store.dropped_total) == (3, 900, 7)
    store.close()
    reopened = BatchStore(tmp_path / "q.db", max_bytes=1000)  # survives a restart
    assert len(reopened) == 3 and reopened.dropped_total == 7
    reopened.delete(rows[0][0])
    assert [r[1] for r in reopened.oldest()] == ["b8", "b9"]
    with pytest.raises(ValueError):
        BatchStore(tmp_path / "x.db", max_bytes=0)


def test_moments_merge_like_one_pass() -> None:
    rng = np.random.default_rng(0)
    rows = rng.standard_normal((50, 8))
    n, mean, m2 = merge_moments(0, None, None, rows[:20])
    n, mean, m2 = merge_moments(n, mean, m2, rows[20:])
    assert n == 50
    np.testing.assert_allclose(mean, rows.mean(axis=0))
    np.testing.assert_allclose(m2 / n, rows.var(axis=0))


class Collector:
    """A real MQTT subscriber that dedupes telemetry on batch_id, as the server does."""

    def __init__(self, port: int, device_id: str) -> None:
        self.batches: dict[str, protocol.TelemetryBatch] = {}
        self.duplicates = 0
        self._lock = threading.Lock()
        self.topic = protocol.topic(device_id, "telemetry")
        # A persistent session (clean_session=False on a broker with persistence), like the server's:
        # what arrives while the collector reconnects is queued for it, not lost.
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=unique_id("collector"), clean_session=False
        )
        self.client.on_connect = lambda c, *a: c.subscribe(self.topic, qos=1)
        self.client.on_message = self._on_message
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        batch = protocol.decode_telemetry(bytes(msg.payload))
        with self._lock:
            if batch.batch_id in self.batches:
                self.duplicates += 1
            self.batches[batch.batch_id] = batch

    def inferences(self) -> int:
        with self._lock:
            return sum(st.inferences for b in self.batches.values() for st in b.models.values())

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


@pytest.mark.slow
def test_broker_down_30s_under_load_every_batch_arrives_once(
    keydir: KeyDir, tmp_path: Path, artifacts: ArtifactServer, loop_thread: LoopThread
) -> None:
    # mosquitto drops to its own user, which cannot enter pytest's 0700 tmp dirs
    persist = Path(tempfile.mkdtemp(prefix="ef-mq-persist-"))
    persist.chmod(0o777)
    conf = f"persistence true\npersistence_location {persist}/\nautosave_interval 1\n"
    broker = start_mosquitto(workdir=tmp_path / "mq", extra_conf=conf)  # a taken free port: another
    port = broker.info.port
    dev = unique_id()
    bundle = make_bundle(tmp_path, keydir.key("release"))
    artifacts.add(bundle)
    cfg = agent_config(
        broker.info, tmp_path / dev, keydir.trust_path, dev, keepalive=2, telemetry_interval=0.2
    )
    agent = Agent(cfg, keydir.trust_root())
    collector = Collector(port, dev)
    stop = threading.Event()
    done = [0, 0]

    def load(i: int) -> None:
        while not stop.is_set():
            assert agent.infer(X).ok
            done[i] += 1
            time.sleep(0.002)

    loop_thread.run(agent.start())
    threads = [threading.Thread(target=load, args=(i,)) for i in range(2)]
    try:
        assert loop_thread.run(agent.wait_connected(10))
        pub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=unique_id("fleet"))
        pub.connect("127.0.0.1", port)
        pub.loop_start()
        payload = sign_directive(keydir.key("fleet"), dev, 1, artifacts.model_ref(bundle))
        pub.publish(protocol.topic(dev, "desired"), payload, qos=1, retain=True).wait_for_publish(5)
        wait_for(lambda: agent.running_sha256 == bundle.sha256, what="model installed")
        pub.loop_stop()
        pub.disconnect()
        for t in threads:
            t.start()
        wait_for(lambda: len(collector.batches) >= 3, what="batches before the outage")
        broker.stop()
        t_down = time.monotonic()
        wait_for(lambda: len(agent.telemetry.store) >= 20, timeout=30, what="batches queued on disk")
        wait_for(lambda: time.monotonic() - t_down >= 30, timeout=40, what="30 s outage")
        queued = len(agent.telemetry.store)
        broker = start_mosquitto(port=port, workdir=tmp_path / "mq", extra_conf=conf)
        wait_for(lambda: len(agent.telemetry.store) <= 2, timeout=60, what="queue drained")
        stop.set()
        for t in threads:
            t.join(10)
        total = sum(done)
        loop_thread.run(agent.stop())  # cuts and sends the last window
        wait_for(
            lambda: collector.inferences() >= total,
            timeout=30,
            what=f"every inference reported ({collector.inferences()} of {total})",
        )
        assert collector.inferences() == total  # exactly once after dedupe: nothing lost, nothing twice
        assert len(agent.telemetry.store) == 0
        assert all(b.dropped_batches == 0 for b in collector.batches.values())
        assert agent.telemetry.dropped_batches == 0
        assert queued >= 100  # ~30 s at 5 batches/s sat on disk
    finally:
        stop.set()
        collector.close()
        broker.stop()
        shutil.rmtree(persist, ignore_errors=True)
