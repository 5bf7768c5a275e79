"""The transport attacks, made with OUR server and OUR agent on the production broker.

``test_broker_acl.py`` shows the broker configuration holds against raw MQTT clients; here
the same attacks come from the product's own code paths, and what is checked is what the
fleet server believes afterwards. The broker is the session's production Mosquitto
(``edgefleet.broker.start_secure_broker``: TLS only, client certificates from the fleet CA,
the per-device ACL, the server on its own listener), plus one in password mode. The victim is
a real agent that installed a model through the real server; the attacker is another
provisioned device, speaking through the agent's own MQTT link (``MqttLink``).

Every attack is counted in docs/trust.md ("Transport").
"""

from __future__ import annotations

import asyncio
import shutil
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from device_agent import protocol
from device_agent.agent import Agent
from device_agent.mqtt_link import MqttLink
from device_agent.mqtt_security import MqttSecurity
from edgefleet.broker import (
    BrokerInfo,
    SecureBrokerInfo,
    device_mqtt_keys,
    device_security,
    server_mqtt_settings,
    start_secure_broker,
)
from edgefleet.client import ApiClient
from edgefleet.provision import fleet_ca, issue_cert, write_cert_and_key
from fleet_server.runner import ServerThread
from fleet_server.settings import ServerSettings
from signing.keyring import KeyDir, init_keys
from tests.agent.harness import (
    LoopThread,
    Observer,
    X,
    agent_config,
    make_bundle,
    sign_directive,
    unique_id,
    wait_for,
)

NOT_AUTHORIZED = 0x87
HW = "rpi4"


@dataclass
class Stack:
    broker: BrokerInfo
    keydir: KeyDir
    server: ServerThread
    api: ApiClient
    loop: LoopThread
    victim: Agent
    mallory: Agent
    model_sha: str

    def device(self, device_id: str) -> dict[str, Any]:
        return dict(self.api.device(device_id))

    def telemetry_of(self, device_id: str) -> dict[str, Any]:
        """The victim's row in the telemetry aggregates (per model and hardware class)."""
        rows = self.api.telemetry()
        return {r["sha256"]: (r["inferences"], r["errors"], r["devices"]) for r in rows}


def _secure(broker_info: BrokerInfo) -> SecureBrokerInfo:
    if not isinstance(broker_info, SecureBrokerInfo):
        pytest.skip("needs the production broker")
    return broker_info


def _server(tmp_path: Path, keydir: KeyDir, broker: BrokerInfo, **over: Any) -> ServerThread:
    settings = ServerSettings(
        data_dir=tmp_path / "server",
        keys_dir=keydir.path,
        **server_mqtt_settings(broker),
        tick_interval=0.1,
        auth_required=False,
        **over,
    )
    return ServerThread(settings).start()


def _agent(broker: BrokerInfo, keydir: KeyDir, tmp_path: Path, device_id: str, **kw: Any) -> Agent:
    return Agent(
        agent_config(broker, tmp_path / device_id, keydir.trust_path, device_id, **kw), keydir.trust_root()
    )


@pytest.fixture
def stack(tmp_path: Path, keydir: KeyDir, broker_info: BrokerInfo) -> Iterator[Stack]:
    """Our server; a victim serving a model it installed through it; mallory, another device."""
    broker = _secure(broker_info)
    server = _server(tmp_path, keydir, broker)
    assert server.wait_subscribed(15), "server subscribed"
    api = ApiClient(server.url)
    loop = LoopThread()
    victim_id, mallory_id = unique_id("victim"), unique_id("mallory")
    api.register_device(victim_id, HW, {"role": "victim"})
    api.register_device(mallory_id, HW, {"role": "attacker"})
    victim = _agent(broker, keydir, tmp_path, victim_id)
    mallory = _agent(broker, keydir, tmp_path, mallory_id)
    try:
        for a in (victim, mallory):
            loop.run(a.start())
            assert loop.run(a.wait_connected(10)), f"{a.device_id} did not connect"
        bundle = make_bundle(tmp_path / "b", keydir.key("release"), seed=1)
        api.push_bundle(bundle.dir)
        api.create_rollout(
            model="tiny:1",
            selector={"hardware_id": HW, "tags": {"role": "victim"}},
            stages=[100],
            min_inferences=1,
        )
        wait_for(lambda: victim.running_sha256 == bundle.sha256, 30, "the victim installed the model")
        victim.infer(X)

        def served() -> bool:
            d = api.device(victim_id)
            return bool(d["deployment_state"] == "serving" and d["running_model"] is not None)

        wait_for(served, 20, "the server saw it serve")
        yield Stack(broker, keydir, server, api, loop, victim, mallory, bundle.sha256)
    finally:
        for a in (victim, mallory):
            loop.run(a.stop())
        loop.close()
        api.close()
        server.stop()


def _puback(loop: LoopThread, link: MqttLink, topic: str, payload: bytes, retain: bool = False) -> int:
    """Publish QoS 1 through an agent's own link; the broker's PUBACK reason code (0 = accepted)."""

    async def go() -> int:
        fut: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        info_mid: list[int] = []
        original = link.client.on_publish

        def on_publish(c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
            if info_mid and mid == info_mid[0] and not fut.done():
                fut.set_result(int(getattr(reason, "value", 0)))
            original(c, u, mid, reason, props)

        link.client.on_publish = on_publish
        try:
            info = link.client.publish(topic, payload, qos=1, retain=retain)
            info_mid.append(info.mid)
            return await asyncio.wait_for(fut, 10)
        finally:
            link.client.on_publish = original

    return loop.run(go())


def _unchanged(read: Any, before: Any, seconds: float = 1.0) -> None:
    """What the server shows stays ``before`` for ``seconds`` (a refused message has no late effect)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert read() == before
        time.sleep(0.1)


def _view(d: dict[str, Any]) -> tuple[Any, ...]:
    return (d["online"], d["running_model"], d["deployment_state"], d["deployment_seq"])


# ---------------------------------------------------------------- spoofing another device


def test_spoofed_reported_and_status_for_another_device_are_refused(stack: Stack) -> None:
    victim = stack.victim.device_id
    before = _view(stack.device(victim))
    assert before[0] is True and before[2] == "serving"
    link = stack.mallory.link
    assert link is not None
    lie = protocol.Reported(
        device_id=victim, agent_version="0.1.0", hardware_id=HW,
        running=protocol.RunningModel(name="evil", version="9", sha256="e" * 64),
        deployment_seq=99, deployment_state=protocol.DeploymentState.FAILED,
    )  # fmt: skip
    offline = protocol.Status(device_id=victim, state="offline")
    assert (
        _puback(stack.loop, link, protocol.topic(victim, "reported"), protocol.encode(lie), True)
        == NOT_AUTHORIZED
    )
    assert (
        _puback(stack.loop, link, protocol.topic(victim, "status"), protocol.encode(offline), True)
        == NOT_AUTHORIZED
    )
    _unchanged(lambda: _view(stack.device(victim)), before)
    # mallory's own reports still go through: it is refused as the victim, not broken
    own = protocol.encode(protocol.Status(device_id=stack.mallory.device_id, state="online"))
    assert _puback(stack.loop, link, protocol.topic(stack.mallory.device_id, "status"), own, True) == 0


def test_a_telemetry_flood_as_another_device_is_refused(stack: Stack) -> None:
    victim = stack.victim.device_id
    # the victim's own inference (in the fixture) is in the aggregates first
    wait_for(lambda: stack.telemetry_of(victim).get(stack.model_sha, (0,))[0] >= 1, 20, "its own telemetry")
    before_agg, before_batches = stack.telemetry_of(victim), stack.api.stats()["telemetry_batches"]
    link = stack.mallory.link
    assert link is not None
    stats = protocol.ModelStats(inferences=1000, errors={"non_finite": 1000})
    now = datetime.now(UTC)
    refused = 0
    for k in range(200):
        batch = protocol.TelemetryBatch(
            device_id=victim, batch_id=f"forged-{k}", window_start=now, window_end=now,
            models={stack.model_sha: stats},
        )  # fmt: skip
        payload = zlib.compress(batch.model_dump_json().encode())
        refused += _puback(stack.loop, link, protocol.topic(victim, "telemetry"), payload) == NOT_AUTHORIZED
    event = protocol.Event(device_id=victim, seq=1, state=protocol.DeploymentState.FAILED, reason="forged")
    refused += (
        _puback(stack.loop, link, protocol.topic(victim, "events"), protocol.encode(event)) == NOT_AUTHORIZED
    )
    assert refused == 201
    _unchanged(lambda: stack.telemetry_of(victim), before_agg)
    assert stack.api.stats()["telemetry_batches"] - before_batches < 5  # only the real devices' own windows


# ---------------------------------------------------------------- directives


def test_a_retained_directive_from_a_non_server_identity_never_reaches_the_device(stack: Stack) -> None:
    victim = stack.victim
    bridge = stack.server.context.bridge
    assert bridge is not None
    current = bridge.reconciler.directive(victim.device_id)
    assert current is not None
    received = victim.metrics.get("directives_received", 0)
    seq = stack.device(victim.device_id)["deployment_seq"]
    # even signed by the fleet key (as if it were stolen), with a higher seq: only the server may write it
    forged = sign_directive(stack.keydir.key("fleet"), victim.device_id, seq + 10, None)
    link = stack.mallory.link
    assert link is not None
    topic = protocol.topic(victim.device_id, "desired")
    assert _puback(stack.loop, link, topic, forged, retain=True) == NOT_AUTHORIZED
    # nor may a device direct itself
    own = protocol.topic(stack.mallory.device_id, "desired")
    self_directed = sign_directive(stack.keydir.key("fleet"), stack.mallory.device_id, 50, None)
    assert _puback(stack.loop, link, own, self_directed, retain=True) == NOT_AUTHORIZED
    time.sleep(1.0)
    assert victim.metrics.get("directives_received", 0) == received
    assert (
        stack.device(victim.device_id)["deployment_seq"] == seq and victim.running_sha256 == stack.model_sha
    )
    # the retained directive on the broker is still the server's own
    observer = Observer(stack.broker)
    try:
        observer.client.on_message = lambda _c, _u, m: observer.messages.append((m.topic, bytes(m.payload)))
        observer.client.subscribe(topic, qos=1)
        mine = lambda: [m for m in observer.messages if m[0] == topic]  # noqa: E731
        wait_for(mine, 10, "the retained directive")
        assert mine() == [(topic, current)]
    finally:
        observer.close()


def test_taking_another_devices_client_id_neither_kicks_it_off_nor_reads_its_messages(stack: Stack) -> None:
    victim, mallory = stack.victim, stack.mallory
    assert victim.link is not None
    reconnects = victim.link.reconnects
    got: list[tuple[str, bytes, bool]] = []
    # the agent's own link with the victim's id, and mallory's credentials
    impostor = MqttLink(
        victim.device_id, stack.broker.host, stack.broker.port,
        security=device_security(stack.broker, mallory.device_id),
    )  # fmt: skip
    stack.loop.run(impostor.start(on_message=lambda t, p, r: got.append((t, p, r))))
    try:
        assert stack.loop.run(impostor.wait_connected(10))  # it gets in, as mallory (client id = mallory)
        # a live directive for the victim (the server publishes it again): only the victim gets it
        bridge = stack.server.context.bridge
        assert bridge is not None
        duplicates = victim.metrics.get("duplicate_directives", 0)
        current = bridge.reconciler.directive(victim.device_id)
        assert current is not None
        bridge.publish_desired(victim.device_id, current)
        wait_for(lambda: victim.metrics.get("duplicate_directives", 0) > duplicates, 10, "the victim got it")
        time.sleep(0.5)
        assert got == []  # nothing of the victim's: its retained directive, nor the live one
        assert victim.link.connected and victim.link.reconnects == reconnects
    finally:
        stack.loop.run(asyncio.sleep(0))
        impostor.abort()  # dies: its will ("offline" for the victim's id) is no message for the victim
    _unchanged(lambda: stack.device(victim.device_id)["online"], True)
    assert victim.link.connected and victim.link.reconnects == reconnects


# ---------------------------------------------------------------- getting in


def _connects(
    loop: LoopThread,
    broker: BrokerInfo,
    device_id: str,
    security: MqttSecurity,
    port: int | None = None,
    control: bool = False,
) -> bool:
    """Whether ``device_id`` gets a session with ``security``; "no" is the broker's answer (the
    link saw its attempt fail: TLS refused, CONNACK refused, or hung up on), never a timeout. A
    ``control`` (an identity that must get in) rides out a transient failure with the link's
    reconnects instead."""
    link = MqttLink(device_id, broker.host, port or broker.port, security=security)
    loop.run(link.start(on_message=lambda *_: None))
    try:
        if loop.run(link.wait_connected(10, until_refused=not control)):
            return True
        assert link.connect_failures >= 1 and link.last_connect_failure, "no answer from the broker in 10 s"
        return False
    finally:
        loop.run(link.stop())


def test_no_certificate_a_foreign_certificate_or_plaintext_gets_no_device_in(
    broker_info: BrokerInfo, tmp_path: Path
) -> None:
    broker = _secure(broker_info)
    device = unique_id("dev")
    own = device_security(broker, device)
    loop = LoopThread()
    try:
        assert _connects(loop, broker, device, own, control=True)  # its own certificate works
        assert not _connects(loop, broker, device, MqttSecurity(tls=True, ca_file=broker.ca_file))
        init_keys(tmp_path / "rogue")
        rogue = fleet_ca(KeyDir(tmp_path / "rogue"))
        pem, key = issue_cert(rogue, device)
        write_cert_and_key(pem, key, tmp_path / "rogue.crt", tmp_path / "rogue.key")
        foreign = MqttSecurity(tls=True, ca_file=broker.ca_file, cert_file=tmp_path / "rogue.crt",
                               key_file=tmp_path / "rogue.key")  # fmt: skip
        assert not _connects(loop, broker, device, foreign)
        assert not _connects(loop, broker, device, MqttSecurity())  # plaintext to the TLS port
        # a device certificate is no way onto the server listener
        assert not _connects(loop, broker, "fleet-server-x", own, port=broker.server_port)
    finally:
        loop.close()


@pytest.fixture(scope="module")
def password_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecureBrokerInfo]:
    from edgefleet.broker import mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    broker = start_secure_broker(tmp_path_factory.mktemp("pw-broker"), auth="password")
    assert isinstance(broker.info, SecureBrokerInfo)
    yield broker.info
    broker.stop()


def test_a_wrong_password_gets_no_device_in(password_broker: SecureBrokerInfo, tmp_path: Path) -> None:
    a, b = unique_id("pw"), unique_id("pw")
    keys_a = device_mqtt_keys(password_broker, a)
    device_mqtt_keys(password_broker, b)
    assert keys_a["mqtt_username"] == a and keys_a["mqtt_password_file"]
    # its certificate is for HTTP (signed capture uploads): on this broker it is no way in alone
    cert_only = MqttSecurity(
        tls=True,
        ca_file=password_broker.ca_file,
        cert_file=Path(keys_a["mqtt_cert_file"]),
        key_file=Path(keys_a["mqtt_key_file"]),
    )
    loop = LoopThread()
    try:
        assert _connects(loop, password_broker, a, device_security(password_broker, a), control=True)
        sec_b = device_security(password_broker, b)
        wrong = MqttSecurity(tls=True, ca_file=password_broker.ca_file, username=a, password="guess")
        others = MqttSecurity(tls=True, ca_file=password_broker.ca_file, username=a, password=sec_b.password)
        for bad in (wrong, others, cert_only, MqttSecurity(tls=True, ca_file=password_broker.ca_file)):
            assert not _connects(loop, password_broker, a, bad)
    finally:
        loop.close()


def test_the_agent_process_in_password_mode_gets_in_from_its_own_config(
    password_broker: SecureBrokerInfo, keydir: KeyDir, tmp_path: Path
) -> None:
    """Our agent, configured by the keys provisioning writes (username + password file), connects;
    with another device's password file it does not."""
    device = unique_id("pwagent")
    loop = LoopThread()
    try:
        agent = _agent(password_broker, keydir, tmp_path, device)
        loop.run(agent.start())
        assert loop.run(agent.wait_connected(10))
        loop.run(agent.stop())
        other = unique_id("pwother")
        keys = device_mqtt_keys(password_broker, other)
        impostor = _agent(
            password_broker, keydir, tmp_path / "x", device, mqtt_password_file=keys["mqtt_password_file"]
        )
        loop.run(impostor.start())
        link = impostor.link
        assert isinstance(link, MqttLink)
        assert not loop.run(link.wait_connected(10, until_refused=True))  # the broker's "no"
        assert link.connect_failures >= 1 and "refused" in (link.last_connect_failure or "")
        loop.run(impostor.stop())
    finally:
        loop.close()


def test_our_server_without_the_server_certificate_stays_out(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path
) -> None:
    """A device's credentials are no way in as the fleet server: the server listener wants the
    server CA's certificate."""
    broker = _secure(broker_info)
    keys = device_mqtt_keys(broker, unique_id("notserver"))
    server = _server(
        tmp_path, keydir, broker,
        mqtt_cert_file=Path(keys["mqtt_cert_file"]), mqtt_key_file=Path(keys["mqtt_key_file"]),
    )  # fmt: skip
    try:
        time.sleep(3.0)
        assert server.context.bridge is not None and not server.context.bridge.connected
    finally:
        server.stop()


# ---------------------------------------------------------------- the server keeps devices honest


def test_the_server_brings_a_wiped_device_back_to_its_desired_seq(keydir: KeyDir, tmp_path: Path) -> None:
    """The issue's replay: a device installed seq 2; an attacker re-publishes the older seq-1
    directive (refused by the ACL); the device's data dir is wiped and the broker loses its store
    (no retained directive any more). The device comes back idle at seq 0 and installs seq 2 only
    because the server put it back: when the broker returned without it (the reconnect sweep), or
    when the device reported itself behind its desired seq (drift)."""
    from edgefleet.broker import mosquitto_binary

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    broker = start_secure_broker(tmp_path / "broker")  # its own: it loses its store below
    info = broker.info
    assert isinstance(info, SecureBrokerInfo)
    server = _server(tmp_path, keydir, info, reconcile_grace_seconds=0.5, reconcile_interval_seconds=2.0)
    api, loop = ApiClient(server.url), LoopThread()
    dev, mallory_id = unique_id("wiped"), unique_id("mallory")
    api.register_device(dev, HW, {"role": "victim"})
    api.register_device(mallory_id, HW, {"role": "attacker"})
    agents: list[Agent] = []
    try:
        agent = _agent(info, keydir, tmp_path, dev)
        mallory = _agent(info, keydir, tmp_path, mallory_id)
        agents += [agent, mallory]
        for a in agents:
            loop.run(a.start())
            assert loop.run(a.wait_connected(10))
        bridge = server.context.bridge
        assert bridge is not None
        seqs: dict[int, bytes] = {}
        for version in (1, 2):
            b = make_bundle(tmp_path / "b", keydir.key("release"), seed=version, version=str(version))
            api.push_bundle(b.dir)
            rid = api.create_rollout(
                model=f"tiny:{version}", selector={"hardware_id": HW, "tags": {"role": "victim"}},
                stages=[100], min_inferences=1,
            )["id"]  # fmt: skip
            wait_for(lambda b=b: agent.running_sha256 == b.sha256, 30, f"v{version} installed")
            agent.infer(X)
            wait_for(lambda rid=rid: api.rollout(rid)["state"] == "completed", 30, f"rollout {version}")
            held = bridge.reconciler.directive(dev)
            assert held is not None
            seqs[version] = held
        v2_sha = agent.running_sha256
        assert api.device(dev)["deployment_seq"] == 2
        # the attacker replays the older, validly signed directive: refused
        assert mallory.link is not None
        assert (
            _puback(loop, mallory.link, protocol.topic(dev, "desired"), seqs[1], retain=True)
            == NOT_AUTHORIZED
        )
        # the device's data dir is wiped, and the broker loses its store
        loop.run(agent.stop())
        shutil.rmtree(tmp_path / dev)
        broker.stop()
        shutil.rmtree(info.files_dir / "data")
        broker = start_secure_broker(tmp_path / "broker", port=info.port, server_port=info.server_port)
        wait_for(lambda: bridge.connected, 20, "the server reconnected")
        fresh = _agent(info, keydir, tmp_path, dev)
        agents[0] = fresh
        loop.run(fresh.start())
        assert loop.run(fresh.wait_connected(10))
        wait_for(lambda: fresh.running_sha256 == v2_sha, 30, "the server brought it back to seq 2")
        fresh.infer(X)
        wait_for(lambda: api.device(dev)["deployment_seq"] == 2, 10, "the server sees seq 2")
        assert fresh.history == [v2_sha]  # never the replayed seq 1
        s = api.stats()
        assert s["directives_republished"] + s["directives_restored"] >= 1 and s["drift_detected"] >= 1
        row = next(r for r in api.drift() if r["device_id"] == dev)
        assert row["republished"] + row["restored"] >= 1
    finally:
        for a in agents:
            loop.run(a.stop())
        loop.close()
        api.close()
        server.stop()
        broker.stop()
