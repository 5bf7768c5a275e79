"""The link survives its broker going away: backoff, reconnect, and the directive still applies."""

from __future__ import annotations

from pathlib import Path

from device_agent import protocol
from device_agent.agent import Agent
from device_agent.mqtt_link import MqttLink, backoff_delay
from edgefleet.broker import start_mosquitto
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
    broker = start_mosquitto(workdir=tmp_path / "mq1")  # on a free port (a taken one: another)
    port = broker.info.port
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


def test_a_silent_broker_never_stalls_the_agents_loop(tmp_path: Path) -> None:
    """A broker host that takes the TCP connection and never answers the TLS handshake: the connect
    waits out paho's socket timeout (5 s) in a thread, while the loop (the agent's local API,
    inferences, telemetry) keeps its pace. Blocking there stalled every device on the loop."""
    import asyncio
    import socket
    import time

    import certifi

    from device_agent.mqtt_security import MqttSecurity

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)  # accepted by the kernel, never read: the ClientHello gets no answer
    port = silent.getsockname()[1]

    async def scenario() -> tuple[float, bool]:
        link = MqttLink(
            unique_id(), "127.0.0.1", port, security=MqttSecurity(tls=True, ca_file=Path(certifi.where()))
        )
        link.client.connect_timeout = 2.0
        worst, last, stop = 0.0, time.monotonic(), asyncio.Event()

        async def pace() -> None:
            nonlocal worst, last
            while not stop.is_set():
                await asyncio.sleep(0.02)
                now = time.monotonic()
                worst, last = max(worst, now - last), now

        ticker = asyncio.create_task(pace())
        await link.start(lambda *_: None)  # the handshake times out in its thread; a retry is scheduled
        connected = await link.wait_connected(0.5)
        stop.set()
        await ticker
        await link.stop()
        return worst, connected

    try:
        worst, connected = asyncio.run(scenario())
    finally:
        silent.close()
    assert not connected
    assert worst < 1.0, f"the loop stood still for {worst:.1f} s during a connect"
