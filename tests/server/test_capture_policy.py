"""A rollout's capture policy reaches its devices in the signed directive, with this server's upload
URL; a shadow directive and a roll back carry none (a device captures what it serves, for the
rollout that put it there); the policy is refused whole when malformed."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from device_agent import protocol
from edgefleet.cli import app
from fleet_server.directives import build_directive
from fleet_server.models import Model
from fleet_server.policy import CapturePolicy, Policy
from fleet_server.runner import ServerThread
from signing.dsse import verify_envelope
from signing.keyring import KeyDir

from .conftest import FakeDevice, make_bundle, register, upload, wait_for

MODEL = Model(
    id=1, name="det", version="1", release=1, target="arm64-cpu", sha256="a" * 64, length=1, storage_path="/x"
)
NOW = datetime(2026, 12, 1, tzinfo=UTC)


def _directive(policy: Policy | None, **kw: Any) -> protocol.Directive:
    return build_directive(
        "d", 1, MODEL, public_url="https://fleet.example/", ttl_seconds=60, now=NOW, policy=policy, **kw
    )


def test_the_directive_carries_the_capture_policy_with_this_servers_url() -> None:
    policy = Policy(capture=CapturePolicy(sample_rate=0.05, keep="outputs", quota_bytes=1 << 20))
    capture = _directive(policy).capture
    assert capture is not None
    assert capture.upload_url == "https://fleet.example/api/v1/captures"
    assert (capture.sample_rate, capture.keep, capture.quota_bytes) == (0.05, "outputs", 1 << 20)
    assert _directive(policy, shadow=MODEL).capture is None  # shadowing: the old model serves
    assert _directive(None).capture is None  # a roll back: sampling stops
    assert _directive(Policy()).capture is None  # not asked for


@pytest.mark.parametrize(
    "capture",
    [{"sample_rate": 0}, {"sample_rate": 1.5}, {"keep": "everything"}, {"quota_bytes": 10}, {"url": "x"}],
)
def test_a_malformed_capture_policy_is_refused(client: httpx.Client, capture: dict[str, Any]) -> None:
    r = client.post("/api/v1/rollouts", json={"model": "det:1", "stages": [100], "capture": capture})
    assert r.status_code == 400 and r.json()["detail"]["code"] == "invalid_request", r.text
    assert "capture" in r.json()["detail"]["message"]


def test_a_rollout_with_capture_publishes_it_to_its_devices(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    upload(client, make_bundle(tmp_path, keydir.key("release")))
    register(client, "cap-1")
    args = ["rollouts", "create", "--model", "det:1", "--stages", "100", "--server", server.url, "--json"]
    r = CliRunner().invoke(app, [*args, "--capture-rate", "0.25", "--capture-keep", "inputs"])
    assert r.exit_code == 0, r.output
    wait_for(lambda: client.get("/api/v1/devices/cap-1").json()["desired_seq"] == 1)
    dev = fake_device("cap-1")
    dev.subscribe_desired()
    _, raw, _ = wait_for(lambda: dev.received and dev.received[0])
    payload = verify_envelope(raw, protocol.DIRECTIVE_PAYLOAD_TYPE, keydir.trust_root().fleet_keys)
    capture = protocol.decode_directive(payload).capture
    assert capture is not None and capture.upload_url == f"{server.url}/api/v1/captures"
    assert (capture.sample_rate, capture.keep) == (0.25, "inputs")
    bad = CliRunner().invoke(app, ["rollouts", "create", "--model", "det:1", "--capture-keep", "both"])
    assert bad.exit_code == 2 and "--capture-rate" in bad.output
