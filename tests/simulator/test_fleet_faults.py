"""Device faults on real agents: pull the plug mid-download and reboot, NaN on one hardware class only."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from agent.harness import ArtifactServer, Bundle, Observer, make_bundle, sign_directive, unique_id, wait_for

from device_agent import protocol
from device_agent.runtime import SharedRuntimeFactory
from edgefleet.broker import BrokerInfo, fleet_mqtt_keys
from signing.keyring import KeyDir
from simulator.faults import ClassRuntime
from simulator.fleet import DeviceSpec, Fleet
from simulator.netem import HttpFaultProxy, LinkState, NetProfile, NetworkThread


@pytest.fixture
def net() -> Iterator[NetworkThread]:
    n = NetworkThread()
    yield n
    n.close()


def _send(observer: Observer, keydir: KeyDir, device: str, seq: int, ref: protocol.ModelRef) -> None:
    observer.publish(device, sign_directive(keydir.key("fleet"), device, seq, ref))


def _ref_via(proxy: HttpFaultProxy, artifacts: ArtifactServer, bundle: Bundle) -> protocol.ModelRef:
    return artifacts.model_ref(
        bundle,
        model_url=f"{proxy.url}/m/{bundle.sha256}",
        envelope_url=f"{proxy.url}/e/{bundle.sha256}",
    )


def test_crash_mid_download_then_reboot_installs(
    broker_info: BrokerInfo,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    net: NetworkThread,
) -> None:
    device = unique_id("crash")
    bundle = make_bundle(tmp_path / "b", keydir.key("release"))
    artifacts.add(bundle)
    proxy = HttpFaultProxy("127.0.0.1", int(artifacts.base.rsplit(":", 1)[1]))
    net.run(proxy.start())
    # a slow link: the model takes ~1 s to arrive, so "downloading" lasts long enough to crash in
    proxy.links[device] = LinkState(profile=NetProfile(bandwidth_kbps=bundle.length * 8 / 1000))
    fleet = Fleet(
        [DeviceSpec(device, "rpi4")], broker_info, keydir.trust_path, tmp_path / "f", workload_hz=5,
        credentials=fleet_mqtt_keys(broker_info, [device]),
    )  # fmt: skip
    fleet.start()
    try:
        _send(observer, keydir, device, 1, _ref_via(proxy, artifacts, bundle))
        wait_for(lambda: str(fleet.agents[device].deployment_state) == "downloading", what="downloading")
        fleet.crash(device)
        assert device in fleet.down
        assert fleet.snapshot()[device]["state"] == "down"
        # no clean shutdown: the agent never published "offline" itself; the broker's will may
        assert fleet.agents[device].running_sha256 is None
        proxy.links[device] = LinkState()  # the link is fine after the reboot
        fleet.power_on(device, wait=True)
        wait_for(lambda: fleet.agents[device].running_sha256 == bundle.sha256, timeout=20, what="installed")
        wait_for(lambda: fleet.snapshot()[device]["inferences_ok"] > 0, what="serving after reboot")
        assert fleet.lifecycle == {"crashes": 1, "power_ons": 1}
        assert fleet.snapshot()[device]["ever_ran"] == [bundle.sha256]
    finally:
        fleet.stop()


def test_power_off_is_clean_and_power_on_restores_the_model(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path, artifacts: ArtifactServer, observer: Observer
) -> None:
    device = unique_id("pwr")
    bundle = make_bundle(tmp_path / "b", keydir.key("release"))
    artifacts.add(bundle)
    fleet = Fleet(
        [DeviceSpec(device, "rpi4")], broker_info, keydir.trust_path, tmp_path / "f", workload_hz=5,
        credentials=fleet_mqtt_keys(broker_info, [device]),
    )  # fmt: skip
    fleet.start()
    try:
        _send(observer, keydir, device, 1, artifacts.model_ref(bundle))
        wait_for(lambda: fleet.agents[device].running_sha256 == bundle.sha256, what="installed")
        wait_for(lambda: fleet.snapshot()[device]["inferences_ok"] > 0, what="served")
        before = fleet.metric_total("telemetry_batches")
        fleet.power_off(device)
        assert fleet.metric_total("telemetry_batches") >= before  # counters survive the reboot
        fleet.power_on(device, wait=True)
        # the new agent restores the model from its slot without downloading again
        assert fleet.agents[device].running_sha256 == bundle.sha256
        assert len([r for r in artifacts.requests if r[0].startswith("/m/")]) == 1
    finally:
        fleet.stop()


def test_a_model_fails_only_on_its_hardware_class(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path, artifacts: ArtifactServer, observer: Observer
) -> None:
    prefix = unique_id("hw")
    bundle = make_bundle(tmp_path / "b", keydir.key("release"), hardware_ids=["rpi4", "jetson"])
    artifacts.add(bundle)
    shared = SharedRuntimeFactory()
    specs = [DeviceSpec(f"{prefix}-a", "rpi4", hw_class="rpi4"), DeviceSpec(f"{prefix}-b", "jetson")]
    fleet = Fleet(
        specs,
        broker_info,
        keydir.trust_path,
        tmp_path / "f",
        workload_hz=10,
        runtime=shared,
        class_runtimes={"rpi4": ClassRuntime(shared, failing_shas=frozenset({bundle.sha256}))},
        credentials=fleet_mqtt_keys(broker_info, [s.device_id for s in specs]),
    )
    fleet.start()
    try:
        for spec in specs:
            _send(observer, keydir, spec.device_id, 1, artifacts.model_ref(bundle))
        wait_for(
            lambda: all(s["running"] == bundle.sha256 for s in fleet.snapshot().values()),
            what="both installed",
        )
        wait_for(lambda: fleet.snapshot()[f"{prefix}-a"]["inference_errors"] >= 5, what="NaN on rpi4")
        wait_for(lambda: fleet.snapshot()[f"{prefix}-b"]["inferences_ok"] >= 5, what="ok on jetson")
        snap = fleet.snapshot()
        assert snap[f"{prefix}-a"]["inferences_ok"] == 0
        assert snap[f"{prefix}-b"]["inference_errors"] == 0
        x = np.zeros((1, 64), dtype=np.float32)
        bad = fleet.agents[f"{prefix}-a"].infer(x)
        assert not bad.ok and bad.error == "non_finite"
        assert fleet.agents[f"{prefix}-b"].infer(x).ok
        assert shared.loads == 1  # one real session, wrapped for the failing class
    finally:
        fleet.stop()
