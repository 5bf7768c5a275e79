"""The devices' acceptance figures per hardware class, and a bundle's further files (its golden set).

Fake devices report acceptance verdicts over the real broker as an agent does (the retained
``reported`` snapshot); the server groups them per hardware id beside the compiled figures.
The golden set is uploaded, verified and served like the model file, by the name its
signed manifest lists and no other.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from device_agent import protocol
from edgefleet.cli import app
from fleet_server.acceptance_report import summarize
from signing.keyring import KeyDir
from signing.manifest import sign_bundle, verify_bundle
from tests.support.waiting import wait_for

from .conftest import FakeDevice, register, upload

SECTION = {
    "file": "golden.npz",
    "samples": 16,
    "bytes": 900,
    "checks": [
        {"output": "y", "figure": "snr_db", "compiled": 39.6, "tolerance": 3.0, "bound": "min"},
        {"output": "y", "figure": "step_error", "compiled": 0.1, "tolerance": 0.05, "bound": "max"},
    ],
}


def _verdict(snr: float, step: float, passed: bool = True) -> dict[str, Any]:
    return {
        "passed": passed,
        "samples": 16,
        "checks": [
            {"output": "y", "figure": "snr_db", "measured": snr, "passed": passed},
            {"output": "y", "figure": "step_error", "measured": step, "passed": True},
        ],
    }


def test_figures_are_grouped_per_hardware_class_with_the_worst_device_named() -> None:
    out = summarize(
        SECTION,
        [
            ("rpi4", _verdict(39.6, 0.10)),
            ("rpi4", _verdict(39.0, 0.12)),
            ("rpi4", _verdict(39.6, 0.11)),
            ("x86-avx2", _verdict(22.8, 0.3, passed=False)),
        ],
    )
    rpi4, avx2 = out["hardware"]
    assert (rpi4["hardware_id"], rpi4["devices"], rpi4["passed"], rpi4["refused"]) == ("rpi4", 3, 3, 0)
    assert (avx2["devices"], avx2["refused"]) == (1, 1)
    snr = next(f for f in rpi4["figures"] if f["figure"] == "snr_db")
    step = next(f for f in rpi4["figures"] if f["figure"] == "step_error")
    assert (snr["measured_median"], snr["measured_worst"], snr["compiled"]) == (39.6, 39.0, 39.6)
    assert step["measured_worst"] == 0.12  # lower is better: the worst is the highest
    assert "y.snr_db: compiled 39.6 on the host; measured 39.6 (worst 39) on 3 rpi4 devices" in out["summary"]
    assert summarize(None, [])["hardware"] == [] and summarize(None, [])["golden_samples"] is None


def test_the_server_serves_the_golden_set_and_reports_the_devices_checks(
    tmp_path: Path,
    keydir: KeyDir,
    client: httpx.Client,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "model.onnx").write_bytes(b"model-bytes-" * 100)
    (bundle / "golden.npz").write_bytes(b"golden-" * 50)
    fields = {
        "name": "acc",
        "version": "1",
        "release": 1,
        "target": "arm64-cpu",
        "hardware_ids": ["rpi4"],
        "quantization": {"acceptance": SECTION},
    }
    manifest = sign_bundle(bundle, fields, ["model.onnx", "golden.npz"], keydir.key("release"))
    assert upload(client, bundle).status_code == 201
    sha = manifest.model_file.sha256
    got = client.get(f"/api/v1/artifacts/{sha}/files/golden.npz")
    assert got.status_code == 200 and got.content == b"golden-" * 50
    for name in ("model.onnx", "bundle.dsse.json", "..%2Fmodel.onnx", "other.npz"):
        refused = client.get(f"/api/v1/artifacts/{sha}/files/{name}")
        assert refused.status_code == 404, name
    assert client.get(f"/api/v1/artifacts/{'0' * 64}/files/golden.npz").status_code == 404
    # models pull brings the whole bundle back, golden set included, and it verifies
    out = tmp_path / "pulled"
    pull = ["models", "pull", "acc:1", "--out", str(out), "--server", str(client.base_url), "--json"]
    assert CliRunner().invoke(app, pull).exit_code == 0
    assert verify_bundle(out, keydir.trust_root().release_keys).files == manifest.files
    assert (out / "golden.npz").read_bytes() == b"golden-" * 50

    for i, (snr, passed) in enumerate(((39.5, True), (22.8, False))):
        dev = f"acc-{i}"
        register(client, dev)
        reported = protocol.Reported(
            device_id=dev, agent_version="t", hardware_id="rpi4", acceptance={sha: _verdict(snr, 0.1, passed)}
        )
        fake_device(dev).publish("reported", reported.model_dump_json().encode(), retain=True)

    def report() -> dict[str, Any] | None:
        body = dict(client.get("/api/v1/models/acc/1/acceptance").json())
        return body if body["hardware"] and body["hardware"][0]["devices"] == 2 else None

    body = wait_for(report, 10, "both devices' acceptance figures")
    assert body is not None
    (rpi4,) = body["hardware"]
    assert (rpi4["passed"], rpi4["refused"]) == (1, 1) and body["golden_samples"] == 16
    snr = next(f for f in rpi4["figures"] if f["figure"] == "snr_db")
    assert (snr["measured_worst"], snr["compiled"]) == (22.8, 39.6)
    assert client.get("/api/v1/models/acc/9/acceptance").status_code == 404
    shown = CliRunner().invoke(app, ["models", "acceptance", "acc:1", "--server", str(client.base_url)])
    assert shown.exit_code == 0 and "rpi4: 2 devices, 1 passed, 1 refused" in shown.stdout
    assert "y.snr_db: compiled 39.6 on the host; measured" in shown.stdout
