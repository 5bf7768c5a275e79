"""20 real agents on one loop in one process, against a real broker, sharing ONNX sessions."""

from __future__ import annotations

import asyncio
import resource
import time
from pathlib import Path

import pytest
from agent.harness import ArtifactServer, Observer, unique_id, wait_for

from device_agent import protocol
from edgefleet.broker import BrokerInfo, fleet_mqtt_keys
from signing.keyring import KeyDir
from simulator.fleet import DeviceSpec, Fleet

from .lab import direct_all, lab_fleet


def test_twenty_agents_install_a_directive(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path, artifacts: ArtifactServer, observer: Observer
) -> None:
    specs, bundle, samples = lab_fleet("sim", 20, keydir, tmp_path, artifacts, tags={"site": "lab"})
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    fleet = Fleet(
        specs, broker_info, keydir.trust_path, tmp_path / "fleet", workload_hz=20.0, sample_inputs=samples,
        credentials=fleet_mqtt_keys(broker_info, [s.device_id for s in specs]),
        installs_at_once=4,  # the 20 take turns, four at a time
    )  # fmt: skip
    fleet.start()
    try:
        assert all(s["connected"] for s in fleet.snapshot().values())
        direct_all(observer, keydir, artifacts, specs, bundle)
        wait_for(
            lambda: all(s["running"] == bundle.sha256 for s in fleet.snapshot().values()),
            timeout=30,
            what="all 20 agents running the model",
        )
        wait_for(
            lambda: all(s["inferences_ok"] > 0 for s in fleet.snapshot().values()),
            what="workload inferences on every device",
        )
        # identical models are loaded once for the whole fleet
        assert fleet.runtime.loads == 1
        snap = fleet.snapshot()
        assert all(s["history"] == [bundle.sha256] for s in snap.values())
        assert all(s["state"] == protocol.DeploymentState.SERVING for s in snap.values())
        assert fleet.workload_errors == 0
        # the server's "done" signal reaches the broker for every device
        wait_for(
            lambda: all(
                any(r.served_ok.get(bundle.sha256, 0) >= 1 for r in observer.reported(s.device_id))
                for s in specs
            ),
            what="proof reports",
        )
    finally:
        fleet.stop()
    proc = fleet.totals().processes[0]
    assert proc["gc"]["0"][0] > 0 and proc["gc_longest_s"] > 0  # young collections, clocked
    rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"max RSS grew {(rss_after - rss_before) / 1024:.1f} MB for 20 agents")


def test_the_workload_rate_changes_while_the_fleet_runs(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path, artifacts: ArtifactServer, observer: Observer
) -> None:
    """The demo's few canaries label as fast as a large fleet's: the rate applies at once."""
    specs, bundle, samples = lab_fleet("rate", 2, keydir, tmp_path, artifacts)
    fleet = Fleet(
        specs, broker_info, keydir.trust_path, tmp_path / "fleet", workload_hz=2.0, sample_inputs=samples,
        credentials=fleet_mqtt_keys(broker_info, [s.device_id for s in specs]),
    )  # fmt: skip

    def answered() -> int:
        return sum(s["inferences_ok"] for s in fleet.snapshot().values())

    def answered_in(seconds: float) -> int:
        before = answered()
        time.sleep(seconds)
        return answered() - before

    fleet.start()
    try:
        direct_all(observer, keydir, artifacts, specs, bundle)
        wait_for(lambda: answered() > 0, timeout=30, what="the first workload inferences")
        slow = answered_in(1.5)  # 2 devices at 2 Hz: ~6
        fleet.set_workload_hz(40.0)
        time.sleep(0.6)  # each device's next inference was scheduled at the old rate
        fast = answered_in(1.5)  # at 40 Hz: ~120
        assert slow <= 12 and fast >= 5 * max(slow, 6), (slow, fast)
        with pytest.raises(ValueError, match="positive"):
            fleet.set_workload_hz(0)
    finally:
        fleet.stop()
    idle = Fleet(specs, broker_info, keydir.trust_path, tmp_path / "idle", workload_hz=0)
    with pytest.raises(ValueError, match="without a workload"):
        idle.set_workload_hz(10.0)


def test_each_device_waits_on_its_own_slow_step(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path
) -> None:
    """Agents run their slow steps (a load, a slow inference, a connect) off the fleet's one loop;
    16 devices each waiting 0.5 s there wait side by side, not six at a time (asyncio's default
    on 2 cores: three rounds, 1.5 s)."""
    prefix = unique_id("wait")
    specs = [DeviceSpec(f"{prefix}-{i:03d}", "rpi4") for i in range(16)]  # no model: none is installed
    fleet = Fleet(
        specs, broker_info, keydir.trust_path, tmp_path / "fleet", workload_hz=0,
        credentials=fleet_mqtt_keys(broker_info, [s.device_id for s in specs]),
    )  # fmt: skip

    async def each_waits() -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.5) for _ in specs))
        return time.monotonic() - t0

    fleet.start()
    try:
        took = fleet.run(each_waits(), timeout=30)
    finally:
        fleet.stop()
    assert took < 1.2, took


def test_a_device_spec_with_clock_skew_gets_a_skewed_agent_clock(keydir: KeyDir, tmp_path: Path) -> None:
    from signing.trust import TrustRoot

    specs = [DeviceSpec("skew-fast", "rpi4", clock_skew_s=3600.0), DeviceSpec("skew-none", "rpi4")]
    fleet = Fleet(specs, BrokerInfo("127.0.0.1", 1), keydir.trust_path, tmp_path / "f", workload_hz=0)
    fleet._trust = TrustRoot.load_file(keydir.trust_path)  # what start() loads; no broker needed here
    fast, plain = (fleet._make_agent(s) for s in specs)
    assert abs(fast.clock() - time.time() - 3600.0) < 5
    assert abs(plain.clock() - time.time()) < 5
    assert (fast.now() - plain.now()).total_seconds() > 3590
