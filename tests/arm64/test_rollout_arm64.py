"""An x86 fleet server updates an agent running in an arm64 userland (qemu-user emulation).

Nothing in between is a stand-in: the server on loopback with the project's TLS Mosquitto,
``python -m device_agent`` as an aarch64 process (its own Python, numpy and onnxruntime
wheels for aarch64, an emulated Cortex-A72) under ``scripts/arm64_rootfs.py``. It serves a
first model, the server rolls out a compiled bundle with a golden set, the agent downloads,
verifies, runs the acceptance check on its ARM runtime, swaps, serves, and reports; then it
exits cleanly on SIGTERM.

Runs in ``make test-arm64`` (which builds the rootfs and sets ``EDGEFLEET_ARM64_ROOTFS``);
elsewhere it skips and says why.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from compiler import compile_model
from compiler.examples import train_digits
from edgefleet.broker import BrokerInfo, device_mqtt_keys
from edgefleet.client import ApiClient
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir
from tests.agent.field_device import write_agent_toml
from tests.agent.harness import make_bundle, unique_id, wait_for
from tests.server.conftest import server_settings

PROJECT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(PROJECT / "scripts"))
import arm64_rootfs  # noqa: E402  (a script, not a package)

pytestmark = [pytest.mark.arm64, pytest.mark.mosquitto]
EMULATED = 180.0  # s: the agent's imports and first loads run ~10x slower under qemu


@pytest.fixture(scope="module")
def arm64_root() -> Path:
    """The rootfs ``make test-arm64`` built; the normal suite skips (the lane costs minutes, see
    docs/decisions/0022-aarch64-lane-and-on-device-acceptance.md)."""
    given = os.environ.get("EDGEFLEET_ARM64_ROOTFS")
    if not given:
        pytest.skip("arm64 lane: runs under make test-arm64 (EDGEFLEET_ARM64_ROOTFS unset)")
    return Path(given)


def start_agent(
    root: Path, tmp_path: Path, keydir: KeyDir, broker: BrokerInfo, dev: str
) -> subprocess.Popen[bytes]:
    """``python -m device_agent`` in the arm64 userland (an emulated Cortex-A72), its config, keys
    and data in host directories mounted at the same paths; stderr to ``agent.log``."""
    conf = write_agent_toml(tmp_path, keydir, broker, dev)
    files = [Path(v) for k, v in device_mqtt_keys(broker, dev).items() if k.endswith("_file")]
    binds = sorted({tmp_path, keydir.path, *(f.parent for f in files)})
    argv = ["python", "-m", "device_agent", "--config", str(conf), "--workload-hz", "5"]
    cmd = arm64_rootfs.chroot_command(root, arm64_rootfs.inside(argv), cpu="cortex-a72", binds=binds)
    with open(tmp_path / "agent.log", "wb") as log:
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def test_an_x86_server_updates_an_agent_on_arm64(
    arm64_root: Path, tmp_path: Path, keydir: KeyDir, broker_info: BrokerInfo
) -> None:
    dev = unique_id("arm")
    keys = device_mqtt_keys(broker_info, dev)
    srv = ServerThread(server_settings(tmp_path, keydir, broker_info, device_ca_file=keys["mqtt_ca_file"]))
    srv.start()
    assert srv.wait_subscribed(30), "the server subscribed before the device speaks"
    proc: subprocess.Popen[bytes] | None = None

    def log() -> str:
        path = tmp_path / "agent.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    try:
        first = make_bundle(tmp_path / "b", keydir.key("release"), seed=4)
        ex = train_digits(tmp_path / "digits")
        digits = compile_model(
            ex.model_path,
            target="arm64-cpu",
            calib_path=ex.calib_path,
            eval_path=ex.eval_path,
            out_dir=tmp_path / "digits-bundle",
            release_key=keydir.key("release"),
            name="digits",
            version="2",
            release=2,
            hardware_ids=["rpi4"],
            latency_repeats=0,
            mixed_precision_seconds=0,
        )
        new_sha = digits.manifest.model_file.sha256
        with ApiClient(srv.url) as api:
            api.register_device(dev, "rpi4")
            api.push_bundle(first.dir)
            api.push_bundle(digits.bundle_dir)
            proc = start_agent(arm64_root, tmp_path, keydir, broker_info, dev)

            def inventory() -> dict[str, Any] | None:
                found = api.device(dev)
                return found["inventory"] if found["agent_version"] else None

            first_report = wait_for(inventory, EMULATED, "the arm64 agent's report", proc=proc, output=log)
            assert first_report["capabilities"]["arch"] == "aarch64"
            one = api.create_rollout(model="tiny:1", stages=[100], soak_seconds=0)
            done = "completed"
            wait_for(
                lambda: api.rollout(one["id"])["state"] == done, EMULATED, "the first rollout", output=log
            )
            two = api.create_rollout(model="digits:2", stages=[100], soak_seconds=0)
            started = time.monotonic()
            wait_for(lambda: api.rollout(two["id"])["state"] == done, EMULATED, "the update", output=log)
            update_s = time.monotonic() - started
            after = api.device(dev)
        assert after["running_model"]["sha256"] == new_sha
        verdict = wait_for(lambda: api_acceptance(srv.url, dev, new_sha), 30, "the acceptance figures")
        report = httpx.get(f"{srv.url}/api/v1/models/digits/2/acceptance", timeout=10).json()
        assert [(h["hardware_id"], h["passed"], h["refused"]) for h in report["hardware"]] == [("rpi4", 1, 0)]
        assert verdict["passed"] and verdict["hardware_id"] == "rpi4"
        assert {c["figure"] for c in verdict["checks"]} >= {"top1_agreement"}
        took = f"acceptance {verdict['seconds']} s on {verdict['samples']} samples"
        print(f"arm64 update: {update_s:.1f} s; {took}; report: {report['summary']}")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0, log()
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
        srv.stop()


def api_acceptance(url: str, dev: str, sha: str) -> dict[str, Any] | None:
    with ApiClient(url) as api:
        found = api.device(dev)["inventory"].get("acceptance", {}).get(sha)
    return dict(found) if found else None
