"""Helpers of the console tests: API tokens of each role, and a fleet with a rollout to watch."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from device_agent import protocol
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir
from tests.server.conftest import FakeDevice
from tests.server.test_rollout_flow import directives, serve, status
from tests.server.test_rollout_ops import create, fleet_on_old_model
from tests.support.waiting import wait_for


def mint(client: httpx.Client, role: str, name: str | None = None) -> str:
    r = client.post("/api/v1/tokens", json={"name": name or f"console-{role}", "role": role})
    assert r.status_code == 201, r.text
    return str(r.json()["token"])


@pytest.fixture
def tokens(client: httpx.Client) -> dict[str, str]:
    return {role: mint(client, role) for role in ("viewer", "operator", "labeler")}


def rolled_back_by_errors(
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
    prefix: str,
) -> tuple[str, dict[str, FakeDevice]]:
    """A rollout of det:2 to two devices that serve it with half their inferences failing, waited
    until the error-rate gate rolled it back."""
    _, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, prefix, 2)
    rid = create(client, prefix, stages=[100], min_inferences=10, max_error_rate=0.1, soak_seconds=30)
    for dev in devs.values():
        serve(dev, wait_for(lambda dev=dev: directives(dev, keydir))[-1], inferences=20, errors=10)  # type: ignore[misc]
    wait_for(lambda: status(client, rid)["state"] == "rolled_back", output=lambda: str(status(client, rid)))
    return rid, devs


@dataclass
class ConsoleFleet:
    """What a console test reads pages about: the fleet server, its admin API client, a token of
    each role to sign in with, and fake devices to roll models out to (the ``fleet`` fixture)."""

    server: ServerThread
    client: httpx.Client
    tokens: dict[str, str]
    keydir: KeyDir
    tmp_path: Path
    fake_device: Callable[[str], FakeDevice]

    def on_old_model(
        self, prefix: str, n: int
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, FakeDevice]]:
        """``n`` devices tagged site=<prefix> running det:1, with det:2 uploaded to roll out."""
        return fleet_on_old_model(self.client, self.keydir, self.tmp_path, self.fake_device, prefix, n)

    def rollout(self, prefix: str, n: int, **policy: Any) -> tuple[str, dict[str, FakeDevice]]:
        """det:2 rolled out (``policy``) to ``n`` devices on det:1: the rollout's id and the devices."""
        _, _, devs = self.on_old_model(prefix, n)
        return create(self.client, prefix, **policy), devs

    def rolled_back_by_errors(self, prefix: str) -> str:
        rid, _ = rolled_back_by_errors(self.client, self.keydir, self.tmp_path, self.fake_device, prefix)
        return rid

    def experiment_with_a_winner(self, prefix: str, **options: Any) -> dict[str, Any]:
        """An experiment of det:1 (control) against det:2 (candidate) on four devices, each serving
        its arm with labels (the candidate right more often), waited until it names the candidate
        its winner."""
        from tests.server.test_experiments_api import experiment, serve_arm

        old, _, devs = self.on_old_model(prefix, 4)
        exp = experiment(self.client, prefix, **options)
        got = wait_for(
            lambda: (
                {i: directives(d, self.keydir)[-1] for i, d in devs.items()}
                if all(directives(d, self.keydir) for d in devs.values())
                else None
            )
        )
        for device_id, d in got.items():
            control = d.model is not None and d.model.sha256 == old["sha256"]
            serve_arm(devs[device_id], d, f"{device_id}-1", 300, labels=300, correct=240 if control else 297)
        wait_for(lambda: self.client.get(f"/api/v1/experiments/{exp['id']}").json()["winner"] == "candidate")
        return exp


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


__all__ = [
    "ConsoleFleet",
    "FakeDevice",
    "create",
    "fleet_on_old_model",
    "mint",
    "rolled_back_by_errors",
    "serve_with_shape",
    "tokens",
    "wait_for",
]
