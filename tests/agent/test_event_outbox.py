"""Deployment events outlive a lost broker connection: kept in order, sent when the link is back, each
with an id the server stores once."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import col, select

from device_agent import wire
from device_agent.agent import Agent
from device_agent.config import AgentConfig
from device_agent.event_outbox import EventOutbox
from device_agent.http_fetcher import HttpFetcher, fetcher_for
from device_agent.memory_link import MemoryLink
from device_agent.protocol import Channel, topic
from edgefleet.broker import BrokerInfo, SecureBrokerInfo, start_secure_broker
from edgefleet.client import ApiClient
from fleet_server.models import EventRow, TelemetryBatchRow
from fleet_server.runner import ServerThread
from fleet_server.store import new_session
from signing.keyring import KeyDir
from simulator.netem import LinkState, NetworkThread, TcpFaultProxy
from tests.mqtt_clients import server_address, server_client
from tests.server.conftest import server_settings
from tests.support.deploy_files import DEPLOY, env_file, mqtt_session_settings

from .harness import HW, Bundle, LoopThread, X, agent_config, make_bundle, unique_id, wait_for
from .memory_fetcher import MemoryFetcher
from .test_shell import AN_INSTALL, DS, Device


def _event(seq: int, **kw: object) -> wire.Event:
    return wire.Event(device_id="dev-1", seq=seq, state=wire.DeploymentState.SERVING, **kw)  # type: ignore[arg-type]


def test_events_get_ids_of_their_own_and_leave_in_order() -> None:
    box = EventOutbox(prefix="p")
    first, second = box.add(_event(1)), box.add(_event(2))
    kept = box.add(_event(3, event_id="given"))
    assert [first.event_id, second.event_id, kept.event_id] == ["p-1", "p-2", "given"]
    assert box.head() is first and len(box) == 3
    box.sent(second)  # not the head: nothing leaves
    assert box.head() is first and len(box) == 3
    box.sent(first)
    assert box.head() is second and len(box) == 2
    assert len(EventOutbox().prefix) == 12 and EventOutbox().prefix != EventOutbox().prefix


def test_a_full_outbox_lets_the_oldest_go_and_counts_them() -> None:
    box = EventOutbox(capacity=3, prefix="p")
    events = [box.add(_event(seq)) for seq in range(1, 6)]
    assert box.dropped == 2 and len(box) == 3 and box.head() is events[2]
    box.sent(events[0])  # an event that was dropped meanwhile does not take the head with it
    assert box.head() is events[2]
    with pytest.raises(ValueError, match="capacity"):
        EventOutbox(capacity=0)


class _Disconnecting(MemoryFetcher):
    """A fetcher that takes the broker away as the download starts: every event after the first
    happens while the agent cannot publish."""

    def __init__(self, link: MemoryLink) -> None:
        super().__init__()
        self.link = link

    async def envelope(self, url: str) -> bytes:
        self.link.disconnect()
        return await super().envelope(url)


@pytest.fixture
def away_device(keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread) -> Iterator[Device]:
    dev = unique_id()
    link = MemoryLink(dev)
    fetcher = _Disconnecting(link)
    cfg = AgentConfig(dev, HW, tmp_path / "dev", keydir.trust_path, telemetry_interval=0.2)
    agent = Agent(cfg, keydir.trust_root(), link=link, fetcher=fetcher)
    loop_thread.run(agent.start())
    assert loop_thread.run(agent.wait_connected(5))
    yield Device(agent, link, fetcher, loop_thread, keydir)
    loop_thread.run(agent.stop())


def test_events_of_an_install_while_the_broker_is_away_arrive_in_order_once_it_is_back(
    away_device: Device, two_bundles: tuple[Bundle, Bundle]
) -> None:
    a, _ = two_bundles
    d = away_device
    d.direct(1, a)
    wait_for(lambda: d.agent.running_sha256 == a.sha256, what="the install, with the broker away")
    assert [e.state for e in d.events()] == [DS.DOWNLOADING]  # sent before the broker went
    assert d.agent.metrics.get("event_sends_refused", 0) >= 1
    before = len(d.link.published())
    d.link.reconnect()
    d.wait_event(DS.SERVING, 1)
    events = d.events()
    assert [e.state for e in events] == AN_INSTALL
    ids = [e.event_id for e in events]
    assert None not in ids and len(set(ids)) == len(ids)
    # after the reconnect, what happened while away went out before the state it led to
    wait_for(lambda: any(m.topic.endswith("/reported") for m in d.link.published()[before:]), what="a report")
    kinds = [m.topic.rsplit("/", 1)[1] for m in d.link.published()[before:]]
    assert kinds.index("events") < kinds.index("reported"), kinds


class _LinkGoesDown(HttpFetcher):
    """The agent's own HTTP fetcher, which cuts the device's MQTT connection (a partition between
    it and the broker) as the envelope download begins."""

    def __init__(self, config: AgentConfig, cut: Callable[[], None]) -> None:
        base = fetcher_for(config)
        super().__init__(base.device_id, base.https, max_bytes_per_s=base.max_bytes_per_s)
        self.cut: Callable[[], None] | None = cut

    async def envelope(self, url: str) -> bytes:
        if self.cut is not None:
            cut, self.cut = self.cut, None
            cut()
        return await super().envelope(url)


def test_a_device_cut_off_during_an_install_loses_no_event_and_the_server_stores_each_once(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread, broker_info: BrokerInfo
) -> None:
    """The production broker (TLS, a certificate per device, ACLs) and our server; the device's
    connection to the broker is cut as it starts to download, and it installs and serves while
    cut off. Once the link heals, the server has every event of the install, once each, in the
    order they happened."""
    if not isinstance(broker_info, SecureBrokerInfo):
        pytest.skip("needs the production broker")
    net = NetworkThread()
    partition = LinkState()
    proxy = TcpFaultProxy(broker_info.host, broker_info.port, partition)
    net.run(proxy.start())
    # the events in the server process (no ingest workers): what is tested is the device's side
    server = ServerThread(server_settings(tmp_path, keydir, broker_info)).start()
    api = ApiClient(server.url)
    dev = unique_id("cut")
    api.register_device(dev, HW, {"role": dev})
    cfg = agent_config(broker_info, tmp_path / dev, keydir.trust_path, dev, keepalive=2)
    cfg.mqtt_port = proxy.port  # through the proxy, TLS end to end
    agent = Agent(cfg, keydir.trust_root(), fetcher=_LinkGoesDown(cfg, lambda: net.call(partition.partition)))
    try:
        assert server.wait_subscribed(15)
        loop_thread.run(agent.start())
        assert loop_thread.run(agent.wait_connected(10))
        bundle = make_bundle(tmp_path / "b", keydir.key("release"))
        api.push_bundle(bundle.dir)
        selector = {"hardware_id": HW, "tags": {"role": dev}}
        api.create_rollout(model="tiny:1", selector=selector, stages=[100], min_inferences=1)
        wait_for(lambda: agent.running_sha256 == bundle.sha256, 30, "installed while cut off")
        assert agent.link is not None and not agent.link.connected
        assert agent.metrics.get("event_sends_refused", 0) >= 1
        net.call(partition.heal)
        wait_for(lambda: agent.link is not None and agent.link.connected, 30, "the device reconnected")
        agent.infer(X)

        def stored() -> list[EventRow]:
            with new_session(server.context.engine) as session:
                query = select(EventRow).where(EventRow.device_id == dev).order_by(col(EventRow.id))
                return list(session.exec(query).all())

        wait_for(lambda: any(r.state == "serving" for r in stored()), 30, "the serving event stored")
        rows = stored()
        assert [r.state for r in rows] == [state.value for state in AN_INSTALL]
        assert len({r.event_id for r in rows}) == len(rows) and None not in {r.event_id for r in rows}
    finally:
        loop_thread.run(agent.stop())
        api.close()
        server.stop()
        net.close()


def _broker_holds_directive(info: BrokerInfo, device_id: str) -> bool:
    """Whether the broker has a retained directive for ``device_id`` (the server's reading of it)."""
    got = threading.Event()
    client = server_client(info, unique_id("fleet-server-check"))
    client.on_message = lambda *_: got.set()
    client.connect(*server_address(info))
    client.subscribe(topic(device_id, Channel.DESIRED), qos=1)
    client.loop_start()
    try:
        return got.wait(2)
    finally:
        client.disconnect()
        client.loop_stop()


@pytest.mark.slow
def test_what_a_device_sends_after_a_broker_restart_before_the_server_is_back_is_stored(
    keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread
) -> None:
    """A broker of its own (restarted on its data) and our server with its ingest workers, on the
    deployment's session settings, its connections through a proxy that cuts them off. The
    server is cut off, the broker restarts, and a device coming online meanwhile installs the
    directive the broker kept and sends every event of the install and its telemetry before the
    server is back. Once it is, the server stores all of it: its persistent session's
    subscriptions outlived the broker's restart (Mosquitto restores plain ones, not ``$share``)."""
    broker = start_secure_broker(tmp_path / "broker")
    info = broker.info
    assert isinstance(info, SecureBrokerInfo)
    net = NetworkThread()
    server_link = LinkState()
    proxy = TcpFaultProxy(info.host, info.server_port, server_link)
    net.run(proxy.start())
    settings = server_settings(
        tmp_path,
        keydir,
        info,
        ingest_workers=2,
        mqtt_port=proxy.port,
        **mqtt_session_settings(env_file(DEPLOY / "server.env.example")),
    )
    server = ServerThread(settings).start()
    api = ApiClient(server.url)
    dev = unique_id("late")
    agent: Agent | None = None
    try:
        assert server.wait_subscribed(20)
        api.register_device(dev, HW, {"role": dev})
        bundle = make_bundle(tmp_path / "b", keydir.key("release"))
        api.push_bundle(bundle.dir)
        api.create_rollout(model="tiny:1", selector={"hardware_id": HW, "tags": {"role": dev}}, stages=[100])
        wait_for(lambda: _broker_holds_directive(info, dev), 20, "the directive retained on the broker")
        net.call(server_link.partition)
        wait_for(lambda: not server.wait_subscribed(0), 10, "the server cut off from the broker")
        broker.stop()
        broker = start_secure_broker(tmp_path / "broker", port=info.port, server_port=info.server_port)
        cfg = agent_config(info, tmp_path / dev, keydir.trust_path, dev, telemetry_interval=0.3)
        agent = Agent(cfg, keydir.trust_root())
        loop_thread.run(agent.start())
        wait_for(lambda: agent.running_sha256 == bundle.sha256, 30, "installed from the kept directive")
        for _ in range(5):
            agent.infer(X)
        sent = agent.metrics.get("telemetry_batches", 0)
        wait_for(lambda: agent.metrics.get("telemetry_batches", 0) > sent, 10, "telemetry taken")
        assert not server.wait_subscribed(0)  # all of it went out while the server was away
        net.call(server_link.heal)

        def stored(model: type[EventRow] | type[TelemetryBatchRow]) -> list[Any]:
            with new_session(server.context.engine) as session:
                query = select(model).where(model.device_id == dev).order_by(col(model.id))
                return list(session.exec(query).all())

        wait_for(lambda: any(r.state == "serving" for r in stored(EventRow)), 30, "the serving event stored")
        assert [r.state for r in stored(EventRow)] == [state.value for state in AN_INSTALL]
        wait_for(lambda: len(stored(TelemetryBatchRow)) > 0, 10, "telemetry stored")
    finally:
        if agent is not None:
            loop_thread.run(agent.stop())
        api.close()
        server.stop()
        net.close()
        broker.stop()
