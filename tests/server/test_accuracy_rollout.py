"""The accuracy gate through the real server: label counts arrive in telemetry over MQTT, the
ingest sums them per (device, model), the ticker reads them with the replaced model's as the
baseline, and the rollout's decisions carry the figures."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from device_agent import protocol
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir

from .conftest import FakeDevice, make_bundle, register, upload, wait_for
from .test_mqtt import reported
from .test_rollout_flow import directed, directives, serve, status

NOW = datetime(2026, 3, 1, tzinfo=UTC)


def labelled_batch(device_id: str, batch_id: str, sha: str, labels: int, correct: int) -> bytes:
    stats = protocol.ModelStats(inferences=labels, labels=labels, labels_correct=correct)
    batch = protocol.TelemetryBatch(
        device_id=device_id, batch_id=batch_id, window_start=NOW, window_end=NOW, models={sha: stats}
    )
    return protocol.encode_telemetry(batch)


def serve_labelled(dev: FakeDevice, d: protocol.Directive, labels: int, correct: int) -> None:
    """An agent that installed the directive's model, served with it, and got labels back."""
    assert d.model is not None
    serve(dev, d, inferences=labels)
    dev.publish("telemetry", labelled_batch(dev.device_id, f"l{d.seq}", d.model.sha256, labels, correct))


def fleet_on_v1(
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
    prefix: str,
) -> tuple[dict[str, Any], dict[str, FakeDevice]]:
    """Four devices running det:1, each with 500 labelled predictions at 95%; det:2 uploaded."""
    old = upload(client, make_bundle(tmp_path, keydir.key("release"), version="1", content=b"o" * 90)).json()
    upload(client, make_bundle(tmp_path, keydir.key("release"), version="2", content=b"n" * 90))
    devs = {}
    for i in range(4):
        register(client, f"{prefix}-{i}")
        dev = devs[f"{prefix}-{i}"] = fake_device(f"{prefix}-{i}")
        running = protocol.RunningModel(name="det", version="1", sha256=old["sha256"])
        dev.publish(
            "reported", reported(dev.device_id, running=running, served_ok={old["sha256"]: 500}), retain=True
        )
        dev.publish("telemetry", labelled_batch(dev.device_id, "old", old["sha256"], 500, 475))
        dev.subscribe_desired()
    wait_for(lambda: all(client.get(f"/api/v1/devices/{d}").json()["running_model"] for d in devs))
    wait_for(lambda: sum(r["inferences"] for r in client.get("/api/v1/telemetry").json()["items"]) >= 2000)
    return old, devs


def start_v2(client: httpx.Client, **policy: Any) -> str:
    """det:2 in two stages (2 canaries, then all 4) with the accuracy gate on, over 300 labels."""
    body = {"model": "det:2", "stages": [50, 100], "soak_seconds": 0, "max_accuracy_drop": 0.0}
    return str(client.post("/api/v1/rollouts", json={**body, "min_labels": 300, **policy}).json()["id"])


def test_a_less_accurate_model_is_rolled_back_from_its_canaries(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    old, devs = fleet_on_v1(client, keydir, tmp_path, fake_device, "acc")
    rid = start_v2(client)
    canaries = directed(devs.values(), keydir, 2)
    for dev in canaries:  # 85% on 400 labels against 95% on 2,000
        serve_labelled(dev, directives(dev, keydir)[-1], labels=200, correct=170)
    final = wait_for(lambda: (s := status(client, rid))["state"] == "rolled_back" and s)
    decision = final["decisions"][-1]
    assert decision["action"] == "roll_back"
    f = decision["figures"]
    assert f["gate"] == "accuracy"
    assert (f["labels"], f["accuracy"], f["baseline_labels"], f["baseline_accuracy"]) == (
        400,
        0.85,
        2000,
        0.95,
    )
    assert f["accuracy_p_value"] < 0.05 and f["accuracy_change_upper"] < 0
    assert "accuracy 85.0% over 400 labels vs 95.0% over 2000" in decision["reason"]
    for dev in devs.values():
        if dev in canaries:

            def two(dev: FakeDevice = dev) -> list[protocol.Directive] | None:
                got = directives(dev, keydir)
                return got if len(got) == 2 else None

            back = wait_for(two)[-1]
            assert back.model is not None and back.model.sha256 == old["sha256"]
        else:
            assert directives(dev, keydir) == []  # the rest of the fleet never got the model


def test_a_stage_without_labels_waits_then_pauses_for_a_human(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    _, devs = fleet_on_v1(client, keydir, tmp_path, fake_device, "wait")
    rid = start_v2(client, max_label_wait_seconds=1.5)
    canaries = directed(devs.values(), keydir, 2)
    for dev in canaries:  # they serve, but only 40 of their predictions were labelled
        serve_labelled(dev, directives(dev, keydir)[-1], labels=20, correct=20)
    final = wait_for(lambda: (s := status(client, rid))["state"] == "paused" and s)
    actions = [d["action"] for d in final["decisions"]]
    assert "next_stage" not in actions and actions[-2:] == ["stage_finished", "pause"]
    pause = final["decisions"][-1]
    assert pause["figures"]["gate"] == "label_wait" and pause["figures"]["labels"] == 40
    assert "only 40 labelled predictions of the new model" in pause["reason"]
    # a human accepts the stage without the labels: the next stage starts
    assert client.post(f"/api/v1/rollouts/{rid}/approve").status_code == 200
    wait_for(lambda: status(client, rid)["current_stage"] == 1)
