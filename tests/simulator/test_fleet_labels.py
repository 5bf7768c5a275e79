"""The label source in a running fleet: real agents join the labels to their predictions and count
them in their telemetry at the configured accuracy; a device that is off drops its app's labels."""

from __future__ import annotations

from pathlib import Path

from agent.harness import ArtifactServer, Observer, wait_for

from edgefleet.broker import BrokerInfo, fleet_mqtt_keys
from fleet_server.accuracy_stats import wilson
from signing.keyring import KeyDir
from simulator.fleet import Fleet
from simulator.labels import LabelDelay, LabelPlan

from .lab import direct_all, lab_fleet


def test_agents_count_the_labels_at_the_configured_accuracy(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path, artifacts: ArtifactServer, observer: Observer
) -> None:
    specs, bundle, samples = lab_fleet("lab", 4, keydir, tmp_path, artifacts, rows=16)
    plan = LabelPlan(share=0.5, delay=LabelDelay("uniform", 0.05, 0.3), accuracy={bundle.sha256: 0.8}, seed=1)
    fleet = Fleet(
        specs, broker_info, keydir.trust_path, tmp_path / "fleet", workload_hz=50.0, sample_inputs=samples,
        telemetry_interval=0.5, credentials=fleet_mqtt_keys(broker_info, [s.device_id for s in specs]),
        labels=plan,
    )  # fmt: skip
    fleet.start()
    try:
        direct_all(observer, keydir, artifacts, specs, bundle)

        def counted() -> tuple[int, int]:
            stats = [
                b.models[bundle.sha256]
                for s in specs
                for b in observer.telemetry(s.device_id)
                if bundle.sha256 in b.models
            ]
            return sum(m.labels for m in stats), sum(m.labels_correct for m in stats)

        wait_for(lambda: counted()[0] >= 600, timeout=60, what="600 labels in the agents' telemetry")
        labels, correct = counted()
        low, high = wilson(correct, labels, confidence=0.999) or (0.0, 1.0)
        assert low <= 0.8 <= high, (correct, labels)
        assert set(fleet.label_counts) == {"matched"}
        assert fleet.workload_errors == 0
        # a device switched off drops what its app would have posted meanwhile. It is switched off
        # at an instant its app has labels due (checked on the fleet's loop, so none is posted in
        # between): however slowly a loaded machine runs the workload, there is one to drop.
        off = specs[0].device_id
        wait_for(
            lambda: fleet.power_off(off, only_with_labels_due=True), timeout=30, what="off with labels due"
        )
        wait_for(lambda: fleet.labels_due(off) == 0, timeout=30, what="the off device's due labels")
        assert fleet.label_counts["dropped"] >= 1
    finally:
        fleet.stop()
    assert fleet.totals().labels == dict(fleet.label_counts)
