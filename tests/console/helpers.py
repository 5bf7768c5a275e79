"""Helpers of the console tests: API tokens of each role, and a fleet with a rollout to watch."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_agent import protocol
from signing.keyring import KeyDir
from tests.server.conftest import FakeDevice, make_bundle, register, upload
from tests.server.test_mqtt import reported
from tests.support.waiting import wait_for


def mint(client: httpx.Client, role: str, name: str | None = None) -> str:
    r = client.post("/api/v1/tokens", json={"name": name or f"console-{role}", "role": role})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


@pytest.fixture
def tokens(client: httpx.Client) -> dict[str, str]:
    return {role: mint(client, role) for role in ("viewer", "operator", "labeler")}


def fleet_on_old_model(
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
    prefix: str,
    n: int,
) -> tuple[dict[str, Any], dict[str, Any], dict[str, FakeDevice]]:
    """``n`` devices tagged site=<prefix> running det:1, and det:2 uploaded to roll out."""
    old = upload(client, make_bundle(tmp_path, keydir.key("release"), version="1", content=b"o" * 99)).json()
    new = upload(client, make_bundle(tmp_path, keydir.key("release"), version="2", content=b"n" * 99)).json()
    devs = {}
    for i in range(n):
        register(client, f"{prefix}-{i}", site=prefix)
        dev = devs[f"{prefix}-{i}"] = fake_device(f"{prefix}-{i}")
        running = protocol.RunningModel(name="det", version="1", sha256=old["sha256"])
        dev.publish(
            "reported", reported(dev.device_id, running=running, served_ok={old["sha256"]: 100}), retain=True
        )
        dev.subscribe_desired()
    wait_for(lambda: all(client.get(f"/api/v1/devices/{i}").json()["running_model"] for i in devs))
    return old, new, devs


def create(client: httpx.Client, prefix: str, **over: Any) -> str:
    body = {"model": "det:2", "selector": {"tags": {"site": prefix}}, "soak_seconds": 0, **over}
    r = client.post("/api/v1/rollouts", json=body)
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def serve_with_shape(devs: list[FakeDevice], sha: str, rounds: int, pause: float = 0.25) -> None:
    """Telemetry batches as agents send them, with latency and output histograms and labels, a
    round every ``pause`` seconds, so the observability charts have a line to draw (each device
    a little slower than the one before, its outputs drifting round by round)."""
    import random
    import time
    from datetime import UTC, datetime

    rng = random.Random(7)
    for i in range(rounds):
        for n, dev in enumerate(devs):
            latency = [0] * 40
            for _ in range(200):
                latency[max(0, min(39, 14 + 2 * n + i % 3 + int(rng.gauss(0, 1.5))))] += 1
            output = [0] * 67
            for _ in range(200):
                output[max(0, min(66, 30 + i + int(rng.gauss(0, 3))))] += 1
            stats = protocol.ModelStats(
                inferences=200,
                errors={"non_finite": rng.randint(0, 4)},
                latency_buckets=latency,
                output_hist=output,
                labels=20 + 4 * i,
                labels_correct=18 + 3 * i - rng.randint(0, 3),
            )
            now = datetime.now(UTC)
            batch = protocol.TelemetryBatch(
                device_id=dev.device_id,
                batch_id=f"shape-{i}",
                window_start=now,
                window_end=now,
                models={sha: stats},
            )
            dev.publish("telemetry", protocol.encode_telemetry(batch))
        time.sleep(pause)


__all__ = ["FakeDevice", "create", "fleet_on_old_model", "mint", "serve_with_shape", "tokens", "wait_for"]
