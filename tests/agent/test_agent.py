"""The agent against a real Mosquitto, a real HTTP artifact server and real onnxruntime."""

from __future__ import annotations

import base64
import functools
import json
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from device_agent import protocol
from device_agent.agent import Agent, InferenceResult, NoModelError
from device_agent.config import load_config
from edgefleet.broker import BrokerInfo
from signing.keyring import KeyDir
from signing.keys import generate_keypair

from .harness import (
    ArtifactServer,
    Bundle,
    LoopThread,
    Observer,
    X,
    agent_config,
    make_bundle,
    sign_directive,
    start_agent,
    swapped,
    unique_id,
    wait_for,
)

DS = protocol.DeploymentState


def new_agent(broker: BrokerInfo, keydir: KeyDir, tmp_path: Path, device_id: str, **kw: object) -> Agent:
    cfg = agent_config(broker, tmp_path / device_id, keydir.trust_path, device_id, **kw)
    return Agent(cfg, keydir.trust_root())


@pytest.mark.parametrize("mqtt_version", [5, 4])
def test_valid_directive_installs_swaps_and_serves(
    broker_info: BrokerInfo,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    loop_thread: LoopThread,
    mqtt_version: int,
) -> None:
    dev = unique_id()
    bundle = make_bundle(tmp_path / "b", keydir.key("release"))
    artifacts.add(bundle)
    agent = start_agent(loop_thread, new_agent(broker_info, keydir, tmp_path, dev, mqtt_version=mqtt_version))
    try:
        with pytest.raises(NoModelError):
            agent.infer(X)
        observer.publish(dev, sign_directive(keydir.key("fleet"), dev, 1, artifacts.model_ref(bundle)))
        observer.wait_event(dev, DS.SERVING, seq=1)
        states = [e.state for e in observer.events(dev) if e.seq == 1]
        for s in (DS.DOWNLOADING, DS.VERIFYING, DS.INSTALLING, DS.WARMING, DS.SWAPPING, DS.SERVING):
            assert s in states
        result = agent.infer(X)
        assert result.ok and result.model_sha256 == bundle.sha256 and result.model_version == "1"
        assert result.outputs[0].shape == (1, 10)
        assert agent.history == [bundle.sha256]
        # the proof report: new hash running AND >= 1 ok inference with it
        rep = wait_for(
            lambda: [r for r in observer.reported(dev) if r.served_ok.get(bundle.sha256, 0) >= 1],
            what="Reported with served_ok",
        )[-1]
        assert rep.running is not None and rep.running.sha256 == bundle.sha256
        assert rep.deployment_state == DS.SERVING and rep.deployment_seq == 1
        assert rep.slots[rep.active_slot or ""] == bundle.sha256
        assert rep.capabilities["cores"] >= 1
        # every download carried the device header
        assert all(device == dev for _, _, device in artifacts.requests)
        batch = wait_for(lambda: observer.telemetry(dev), what="telemetry")[0]
        stats = batch.models[bundle.sha256]
        assert stats.inferences >= 1 and sum(stats.latency_buckets) == stats.inferences
        assert len(stats.latency_buckets) == len(protocol.LATENCY_BOUNDS_US) + 1
        statuses = [protocol.decode_status(p) for t, p in observer.messages if t.endswith(f"{dev}/status")]
        assert statuses and statuses[0].state == "online"
    finally:
        loop_thread.run(agent.stop())
    wait_for(
        lambda: any(
            protocol.decode_status(p).state == "offline"
            for t, p in list(observer.messages)
            if t.endswith(f"{dev}/status")
        ),
        what="offline status",
    )


def test_a_busy_server_is_retried_within_the_time_budget(
    keydir: KeyDir,
    artifacts: ArtifactServer,
    observer: Observer,
    two_bundles: tuple[Bundle, Bundle],
    running_agent: Callable[..., Agent],
) -> None:
    """502/503 from a proxy while the server restarts is not a verdict: the envelope and the
    model are fetched again (with jittered backoff) until ``delivery_retry_s`` runs out."""
    dev = unique_id()
    fleet = keydir.key("fleet")
    a, b = two_bundles
    agent = running_agent(dev, delivery_retry_s=30.0)
    artifacts.busy[f"/e/{a.sha256}"] = (3, 503)
    artifacts.busy[f"/m/{a.sha256}"] = (2, 502)
    observer.publish(dev, sign_directive(fleet, dev, 1, artifacts.model_ref(a)))
    observer.wait_event(dev, DS.SERVING, seq=1, timeout=30)
    assert agent.infer(X).model_sha256 == a.sha256
    assert artifacts.busy[f"/e/{a.sha256}"][0] == 0 and artifacts.busy[f"/m/{a.sha256}"][0] == 0
    # a server that stays busy past the budget fails the install with the reason; v1 keeps serving
    agent.config.delivery_retry_s = 1.0
    artifacts.busy[f"/e/{b.sha256}"] = (10_000, 503)
    observer.publish(dev, sign_directive(fleet, dev, 2, artifacts.model_ref(b)))
    event = observer.wait_event(dev, DS.FAILED, seq=2, timeout=20)
    assert "503" in f"{event.reason} {event.detail}"
    assert agent.infer(X).model_sha256 == a.sha256


def test_refusals_keep_the_old_model(
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    two_bundles: tuple[Bundle, Bundle],
    running_agent: Callable[..., Agent],
) -> None:
    dev = unique_id()
    fleet, release = keydir.key("fleet"), keydir.key("release")
    a, b = two_bundles
    agent = running_agent(dev)
    observer.publish(dev, sign_directive(fleet, dev, 10, artifacts.model_ref(a)))
    observer.wait_event(dev, DS.SERVING, seq=10)

    def refused(payload: bytes, state: protocol.DeploymentState, reason: str) -> None:
        observer.publish(dev, payload)
        wait_for(
            lambda: any(e.state == state and e.reason == reason for e in observer.events(dev)),
            what=f"{state} {reason}",
        )
        r = agent.infer(X)
        assert r.ok and r.model_sha256 == a.sha256

    ref_b = artifacts.model_ref(b)
    refused(sign_directive(fleet, "someone-else", 11, ref_b), DS.REJECTED, "wrong_device")
    refused(sign_directive(fleet, dev, 9, ref_b), DS.REJECTED, "stale_sequence")
    refused(sign_directive(fleet, dev, 12, ref_b, ttl=-5), DS.REJECTED, "expired")
    refused(sign_directive(generate_keypair(), dev, 13, ref_b), DS.REJECTED, "unknown_key")
    # tampered envelope: swap in another payload under the original signature
    env = json.loads(sign_directive(fleet, dev, 14, ref_b))
    forged = protocol.Directive.model_validate_json(base64.b64decode(env["payload"]))
    forged = forged.model_copy(update={"seq": 99})
    env["payload"] = base64.b64encode(forged.model_dump_json().encode()).decode()
    refused(json.dumps(env).encode(), DS.REJECTED, "bad_signature")

    # accepted directives whose install fails
    good_bytes = artifacts.files[b.sha256]
    artifacts.overrides[b.sha256] = bytes([good_bytes[0] ^ 0xFF]) + good_bytes[1:]
    refused(sign_directive(fleet, dev, 20, ref_b), DS.FAILED, "digest_mismatch")
    artifacts.overrides[b.sha256] = good_bytes + b"x" * 100
    refused(sign_directive(fleet, dev, 21, ref_b), DS.FAILED, "length_mismatch")
    del artifacts.overrides[b.sha256]
    rogue = make_bundle(tmp_path / "b", generate_keypair(), seed=3, version="3")
    artifacts.add(rogue)
    refused(sign_directive(fleet, dev, 22, artifacts.model_ref(rogue)), DS.FAILED, "unknown_key")
    jetson = make_bundle(tmp_path / "b", release, seed=4, version="4", hardware_ids=["jetson"])
    artifacts.add(jetson)
    refused(sign_directive(fleet, dev, 23, artifacts.model_ref(jetson)), DS.FAILED, "hardware_mismatch")
    refused(
        sign_directive(fleet, dev, 24, artifacts.model_ref(b, length=b.length + 1)),
        DS.FAILED,
        "directive_mismatch",
    )
    other_target = artifacts.model_ref(b, target="ethos-u55")
    refused(sign_directive(fleet, dev, 25, other_target), DS.FAILED, "unsupported_target")

    assert agent.history == [a.sha256]
    m = agent.metrics
    assert m["rejected_directives"] == 5 and m["failed_directives"] == 6
    # the reported state follows the event on another topic: wait for it rather than race it
    rep = wait_for(
        lambda: next(
            (r for r in observer.reported(dev)[-1:] if r.deployment_error == "unsupported_target"), None
        ),
        what="the reported failure of seq 25",
    )
    assert rep.running is not None and rep.running.sha256 == a.sha256
    assert rep.deployment_state == DS.FAILED

    # after all that, a valid directive still installs
    observer.publish(dev, sign_directive(fleet, dev, 30, ref_b))
    observer.wait_event(dev, DS.SERVING, seq=30)
    assert agent.infer(X).model_sha256 == b.sha256


def test_malformed_payloads_are_counted_and_survived(
    broker_info: BrokerInfo,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    loop_thread: LoopThread,
) -> None:
    from signing.dsse import sign_envelope

    dev = unique_id()
    fleet = keydir.key("fleet")
    bundle = make_bundle(tmp_path / "b", keydir.key("release"))
    artifacts.add(bundle)
    agent = start_agent(loop_thread, new_agent(broker_info, keydir, tmp_path, dev))
    try:
        wrong_shape = json.dumps(sign_envelope(b'{"hello": 1}', protocol.DIRECTIVE_PAYLOAD_TYPE, [fleet]))
        for payload in (b"\x00\xffgarbage", b'{"device_id": 3}', b"[1,2]", wrong_shape.encode(), b""):
            observer.publish(dev, payload)
        wait_for(lambda: agent.metrics.get("malformed_messages", 0) >= 5, what="5 malformed messages")
        observer.publish(dev, sign_directive(fleet, dev, 1, artifacts.model_ref(bundle)))
        observer.wait_event(dev, DS.SERVING, seq=1)
        assert agent.infer(X).ok
    finally:
        loop_thread.run(agent.stop())


def test_hot_swap_under_load(
    keydir: KeyDir,
    artifacts: ArtifactServer,
    observer: Observer,
    two_bundles: tuple[Bundle, Bundle],
    running_agent: Callable[..., Agent],
) -> None:
    dev = unique_id()
    fleet = keydir.key("fleet")
    a, b = two_bundles
    agent = running_agent(dev)
    refs = [artifacts.model_ref(a), artifacts.model_ref(b)]
    stop = threading.Event()
    results: list[list[InferenceResult]] = [[] for _ in range(3)]
    failures: list[BaseException] = []

    def hammer(out: list[InferenceResult]) -> None:
        x = np.random.default_rng(len(out)).standard_normal((4, 64)).astype(np.float32)
        while not stop.is_set():
            try:
                out.append(agent.infer(x))
            except BaseException as exc:
                failures.append(exc)

    try:
        observer.publish(dev, sign_directive(fleet, dev, 1, refs[0]))
        observer.wait_event(dev, DS.SERVING, seq=1)
        threads = [threading.Thread(target=hammer, args=(r,)) for r in results]
        for t in threads:
            t.start()
        swaps = 60
        for seq in range(2, swaps + 2):
            observer.publish(dev, sign_directive(fleet, dev, seq, refs[(seq - 1) % 2]))
            wait_for(functools.partial(swapped, agent, seq), what=f"swap {seq}")
        stop.set()
        for t in threads:
            t.join(10)
        flat = [r for rs in results for r in rs]
        assert not failures
        assert len(flat) > 1000
        assert all(r.ok for r in flat)
        assert {r.model_sha256 for r in flat} <= {a.sha256, b.sha256}
        assert len(agent.history) == swaps + 1
        # both models came over HTTP once; every later swap came from a slot
        assert sum(1 for p, _, _ in artifacts.requests if p.startswith("/m/")) == 2
        served = agent.served_ok
        assert served[a.sha256] + served[b.sha256] == len(flat)
    finally:
        stop.set()


def test_restart_serves_the_installed_model(
    broker_info: BrokerInfo,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    loop_thread: LoopThread,
) -> None:
    dev = unique_id()
    bundle = make_bundle(tmp_path / "b", keydir.key("release"))
    artifacts.add(bundle)
    agent = start_agent(loop_thread, new_agent(broker_info, keydir, tmp_path, dev))
    observer.publish(dev, sign_directive(keydir.key("fleet"), dev, 1, artifacts.model_ref(bundle)))
    observer.wait_event(dev, DS.SERVING, seq=1)
    loop_thread.run(agent.stop())

    again = new_agent(broker_info, keydir, tmp_path, dev)
    loop_thread.run(again.start())
    try:
        r = again.infer(X)  # served straight from the active slot, before any MQTT traffic
        assert r.ok and r.model_sha256 == bundle.sha256
        assert loop_thread.run(again.wait_connected(10))
        # the retained directive arrives again and is recognised as already applied
        wait_for(lambda: again.metrics.get("duplicate_directives", 0) == 1, what="duplicate directive")
        assert again.history == [bundle.sha256]
        assert again.slots.state.last_seq == 1
    finally:
        loop_thread.run(again.stop())


def test_non_finite_outputs_are_errors(
    broker_info: BrokerInfo,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    loop_thread: LoopThread,
) -> None:
    dev = unique_id()
    bundle = make_bundle(tmp_path / "b", keydir.key("release"), nan=True)
    artifacts.add(bundle)
    agent = start_agent(loop_thread, new_agent(broker_info, keydir, tmp_path, dev))
    try:
        observer.publish(dev, sign_directive(keydir.key("fleet"), dev, 1, artifacts.model_ref(bundle)))
        observer.wait_event(dev, DS.SERVING, seq=1)
        r = agent.infer(X)
        assert not r.ok and r.error == "non_finite"
        bad = agent.infer(np.zeros((1, 3), dtype=np.float32))
        assert not bad.ok and bad.error == "runtime_error"
        assert agent.served_ok.get(bundle.sha256, 0) == 0
        batch = wait_for(lambda: observer.telemetry(dev), what="telemetry")[0]
        assert batch.models[bundle.sha256].errors == {"non_finite": 1, "runtime_error": 1}
    finally:
        loop_thread.run(agent.stop())


def test_load_config_from_toml(tmp_path: Path) -> None:
    (tmp_path / "device.toml").write_text(
        '[agent]\ndevice_id = "cam-1"\nhardware_id = "rpi4"\ndata_dir = "data"\n'
        'trust_path = "/etc/ef/trust.json"\nmqtt_port = 1884\ntags = {site = "berlin"}\n'
    )
    cfg = load_config(tmp_path / "device.toml")
    assert cfg.data_dir == tmp_path / "data" and cfg.trust_path == Path("/etc/ef/trust.json")
    assert cfg.mqtt_port == 1884 and cfg.tags == {"site": "berlin"} and cfg.targets == ["arm64-cpu"]
    (tmp_path / "bad.toml").write_text(
        'device_id = "x"\nhardware_id = "y"\ndata_dir = "d"\ntrust_path = "t"\nbogus = 1\n'
    )
    with pytest.raises(ValueError, match="bogus"):
        load_config(tmp_path / "bad.toml")
