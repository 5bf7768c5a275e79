"""A fleet split over two worker processes: directives reach every worker's agents, faults reach the
worker that holds the device, and the coordinator gets states, snapshots and counters back."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from agent.harness import ArtifactServer, Observer, unique_id, wait_for

from edgefleet.broker import BrokerInfo, fleet_mqtt_keys
from signing.keyring import KeyDir
from simulator.fleet import DeviceSpec
from simulator.procfleet import FleetPlan, ProcessFleet, WorkerError

from .lab import direct_all, lab_fleet


def test_two_worker_processes_run_one_fleet(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path, artifacts: ArtifactServer, observer: Observer
) -> None:
    specs, bundle, samples = lab_fleet("proc", 4, keydir, tmp_path, artifacts, hw_class="rpi4")
    plan = FleetPlan(
        specs, broker_info, keydir.trust_path, tmp_path / "f", workload_hz=10, sample_inputs=samples,
        credentials=fleet_mqtt_keys(broker_info, [s.device_id for s in specs]),
    )  # fmt: skip
    fleet = ProcessFleet(plan, processes=2, log_dir=tmp_path)
    assert [len(p.specs) for p in fleet.parts] == [2, 2]
    assert {fleet.owner[s.device_id] for s in specs} == {0, 1}
    fleet.start()
    try:
        direct_all(observer, keydir, artifacts, specs, bundle)
        wait_for(
            lambda: all(st.running == bundle.sha256 for st in fleet.status().values()),
            timeout=30,
            what="every device in both workers runs the model",
        )
        a, b = specs[0].device_id, specs[1].device_id  # one in each worker
        assert fleet.owner[a] != fleet.owner[b]
        assert not fleet.crash(a, only_in_state="downloading")  # it is serving: not hit
        assert fleet.crash(a, only_in_state="serving")
        assert fleet.power_off(b)
        status = fleet.status([a, b])
        assert status[a].state == "down" and status[b].state == "down"
        fleet.power_on(a, wait=True)
        fleet.power_on(b, wait=True)
        wait_for(lambda: fleet.status([a])[a].running == bundle.sha256, what="restored after the reboot")
        wait_for(
            lambda: all(s["inferences_ok"] > 0 for s in fleet.snapshot().values()),
            what="workload inferences in both workers",
        )
        snap = fleet.snapshot()
        assert set(snap) == {s.device_id for s in specs}
        assert all(s["ever_ran"] == [bundle.sha256] for s in snap.values())
        pids = {p.pid for p in fleet._procs}
        assert len(pids) == 2 and os.getpid() not in pids
    finally:
        fleet.stop()
    totals = fleet.totals()
    assert totals.lifecycle == {"crashes": 1, "power_offs": 1, "power_ons": 2}
    assert set(totals.device_metrics) == {s.device_id for s in specs}
    assert totals.metric_total("telemetry_batches") > 0
    assert [p["devices"] for p in totals.processes] == [2, 2]
    assert all(p["peak_rss_mb"] > 0 for p in totals.processes)
    assert all(p["gc"]["0"][0] > 0 for p in totals.processes)  # each worker clocks its own collector
    assert (tmp_path / "fleet-worker-0.log").exists()
    with pytest.raises(WorkerError):
        fleet.crash(a)  # the workers are gone


def test_a_worker_that_cannot_start_fails_the_start(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path
) -> None:
    plan = FleetPlan(
        [DeviceSpec(f"{unique_id('bad')}-{i}", "rpi4") for i in range(2)],
        broker_info,
        tmp_path / "missing-trust.json",  # every worker fails to load it
        tmp_path / "f",
    )
    fleet = ProcessFleet(plan, processes=2)
    with pytest.raises(WorkerError, match="worker 0"):
        fleet.start()
    assert fleet._procs == []


def test_a_worker_that_dies_is_named(broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path) -> None:
    specs = [DeviceSpec(f"{unique_id('die')}-{i}", "rpi4") for i in range(2)]
    plan = FleetPlan(
        specs,
        broker_info,
        keydir.trust_path,
        tmp_path / "f",
        workload_hz=0,
        credentials=fleet_mqtt_keys(broker_info, [s.device_id for s in specs]),
    )
    fleet = ProcessFleet(plan, processes=2)
    fleet.start()
    try:
        fleet._procs[1].kill()
        fleet._procs[1].wait(10)
        with pytest.raises(WorkerError, match="worker 1 exited"):
            fleet.status()
        with pytest.raises(WorkerError, match="worker 1"):
            fleet.stop()
    finally:
        fleet.close()
    assert fleet._procs == []
