"""The link survives its broker going away: backoff, reconnect, and the directive still applies."""

from __future__ import annotations

from pathlib import Path

from device_agent import protocol
from device_agent.agent import Agent
from device_agent.mqtt_link import MqttLink, backoff_delay
from edgefleet.broker import free_port, start_mosquitto
from signing.keyring import KeyDir

from .harness import (
    ArtifactServer,
    LoopThread,
    Observer,
    X,
    agent_config,
    make_bundle,
    sign_directive,
    unique_id,
    wait_for,
)


def test_backoff_is_capped_full_jitter() -> None:
    delays = [backoff_delay(a, base=0.5, cap=4.0) for a in range(50) for _ in range(20)]
    assert all(0 <= d <= 4.0 for d in delays)
    assert max(backoff_delay(0, base=0.5, cap=4.0) for _ in range(100)) <= 0.5


def test_agent_reconnects_after_broker_restart(
    keydir: KeyDir, tmp_path: Path, artifacts: ArtifactServer, loop_thread: LoopThread
) -> None:
    port = free_port()
    broker = start_mosquitto(port=port, workdir=tmp_path / "mq1")
    dev = unique_id()
    cfg = agent_config(broker.info, tmp_path / dev, keydir.trust_path, dev, keepalive=2)
    agent = Agent(cfg, keydir.trust_root())
    loop_thread.run(agent.start())
    try:
        assert loop_thread.run(agent.wait_connected(10))
        broker.stop()
        assert agent.link is not None
        wait_for(lambda: not agent.link.connected, timeout=10, what="disconnect noticed")  # type: ignore[union-attr]
        broker = start_mosquitto(port=port, workdir=tmp_path / "mq2")  # same port, fresh broker, no session
        wait_for(lambda: agent.link.connected, timeout=20, what="reconnect")  # type: ignore[union-attr]
        assert isinstance(agent.link, MqttLink) and agent.link.reconnects >= 1
        bundle = make_bundle(tmp_path / "b", keydir.key("release"))
        artifacts.add(bundle)
        obs = Observer(broker.info)
        try:
            obs.publish(dev, sign_directive(keydir.key("fleet"), dev, 1, artifacts.model_ref(bundle)))
            obs.wait_event(dev, protocol.DeploymentState.SERVING, seq=1, timeout=15)
        finally:
            obs.close()
        assert agent.infer(X).ok
    finally:
        loop_thread.run(agent.stop())
        broker.stop()
