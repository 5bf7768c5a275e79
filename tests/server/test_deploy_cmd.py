"""`edgefleet deploy` against a real server with the real compiler on the digits model: three
hardware classes compiled in parallel, gated, signed, pushed and rolled out; a class that
cannot be compiled or misses its gate aborts the deploy, or is left out when the policy says so."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from typer.testing import CliRunner

from compiler.examples import DigitsExample, train_digits
from edgefleet.cli import app
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir

from .conftest import register

pytestmark = pytest.mark.slow  # real compiles: a few seconds each

runner = CliRunner()

POLICY = """\
apiVersion: edgefleet.dev/v1
kind: RolloutPolicy
metadata:
  name: canary
spec:
  stages: [50, 100]
  soak_seconds: 0
  on_class_failure: ON_FAILURE
"""
MAPPING = """\
apiVersion: edgefleet.dev/v1
kind: HardwareTargets
metadata: {name: default}
spec:
  targets:
    qcs8550: qnn-htp-a16
    ethos-u55-128-board: ethos-u55-128
---
apiVersion: edgefleet.dev/v1
kind: Model
metadata: {name: digits}
spec:
  source: digits.onnx
  output_kinds: {scores: regression}  # judged by SNR and cosine, so a class's gate can ask too much
  targets:
    rpi5: {gate: {min_snr_db: 200}}
"""


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> DigitsExample:
    return train_digits(tmp_path_factory.mktemp("digits"))


def deploy(server: ServerThread, keydir: KeyDir, digits: DigitsExample, policy: Path, *extra: str) -> Any:
    return runner.invoke(
        app,
        [
            "deploy", str(digits.model_path), "--selector", "app=ocr", "--policy", str(policy),
            "--calib", str(digits.calib_path), "--eval", str(digits.eval_path), "--version", "7",
            "--keys", str(keydir.path), "--mixed-precision-budget", "0", "--server", server.url, "--json",
            *extra,
        ],
    )  # fmt: skip


def apply(server: ServerThread, path: Path, text: str) -> None:
    path.write_text(text)
    result = runner.invoke(app, ["apply", "-f", str(path), "--server", server.url])
    assert result.exit_code == 0, result.output


def test_deploy_compiles_gates_pushes_and_rolls_out_three_hardware_classes(
    server: ServerThread, client: httpx.Client, keydir: KeyDir, digits: DigitsExample, tmp_path: Path
) -> None:
    for device, hw in (("pi-1", "rpi4"), ("pi-2", "rpi4"), ("qc-1", "qcs6490"), ("qc-2", "qcs8550")):
        register(client, device, hw, app="ocr")
    register(client, "pi-other", "rpi4", app="billing")  # not selected
    apply(server, tmp_path / "fleet.yaml", MAPPING)
    # the applied policy, by name, swapping in only inside a named maintenance window
    night = {"days": ["mon", "tue"], "start": "01:00", "end": "05:00"}
    nights = (
        "kind: MaintenanceWindow\nmetadata: {name: nights}\n"
        'spec: {windows: [{days: [mon, tue], start: "01:00", end: "05:00"}]}\n'
    )
    named = POLICY.replace("ON_FAILURE", "abort") + "  maintenance_windows: [nights]\n"
    apply(server, tmp_path / "canary.yaml", named + "---\napiVersion: edgefleet.dev/v1\n" + nights)

    result = deploy(server, keydir, digits, Path("canary"))
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    print("deploy:", report["seconds"], "s; compiles:", [c["compile_seconds"] for c in report["classes"]])
    classes = {c["hardware_class"]: c for c in report["classes"]}
    assert {hw: (c["target"], c["target_from"], c["state"], c["devices"]) for hw, c in classes.items()} == {
        "rpi4": ("arm64-cpu", "built-in", "rolling_out", 2),
        "qcs6490": ("qnn-htp", "built-in", "rolling_out", 1),
        "qcs8550": ("qnn-htp-a16", "hardware-targets", "rolling_out", 1),
    }
    models = {m["version"]: m for m in client.get("/api/v1/models").json()["items"]}
    assert {v: (m["target"], m["hardware_ids"]) for v, m in models.items()} == {
        "7-rpi4": ("arm64-cpu", ["rpi4"]),
        "7-qcs6490": ("qnn-htp", ["qcs6490"]),
        "7-qcs8550": ("qnn-htp-a16", ["qcs8550"]),
    }
    for hw, c in classes.items():
        rollout = client.get(f"/api/v1/rollouts/{c['rollout']}").json()
        assert rollout["model"] == f"digits:7-{hw}"
        assert rollout["selector"]["hardware_id"] == hw and rollout["selector"]["tags"] == {"app": "ocr"}
        assert [s["percent"] for s in rollout["stages"]] == [50.0, 100.0] and rollout["policy"][
            "on_class_failure"
        ] == "abort"
        assert rollout["policy"]["windows"] == [night] and rollout["policy"]["maintenance_windows"] == []


def test_a_failing_class_aborts_the_deploy_or_is_left_out_as_the_policy_says(
    server: ServerThread, client: httpx.Client, keydir: KeyDir, digits: DigitsExample, tmp_path: Path
) -> None:
    for device, hw in (
        ("pi-1", "rpi4"),
        ("pi5-1", "rpi5"),
        ("npu-1", "ethos-u55-128-board"),
        ("t-1", "toaster"),
    ):
        register(client, device, hw, app="ocr")
    apply(server, tmp_path / "fleet.yaml", MAPPING)
    policy = tmp_path / "canary.yaml"

    policy.write_text(POLICY.replace("ON_FAILURE", "abort"))
    aborted = deploy(server, keydir, digits, policy)
    assert aborted.exit_code == 1
    error = json.loads(aborted.stderr)["error"]
    assert error["code"] == "deploy_refused" and error["message"].startswith("deploy aborted, nothing pushed")
    for expected in (
        "ethos-u55-128-board: compile_failed: ",  # an ONNX model for a TFLite target: the compiler refuses
        "takes TFLITE models",
        "rpi5: gate_failed: SNR (dB) of 'scores' is",  # the per-class gate asks more than int8 gives
        "toaster: no_target: ",
    ):
        assert expected in error["message"], error["message"]
    states = {c["hardware_class"]: c["state"] for c in json.loads(aborted.stdout)["classes"]}
    assert states == {
        "rpi4": "not_started",
        "rpi5": "failed",
        "ethos-u55-128-board": "failed",
        "toaster": "failed",
    }
    assert client.get("/api/v1/models").json()["items"] == []  # nothing pushed
    assert client.get("/api/v1/rollouts").json()["items"] == []

    apply(server, tmp_path / "policy.yaml", POLICY.replace("ON_FAILURE", "skip"))
    skipped = deploy(server, keydir, digits, Path("canary"))  # the applied RolloutPolicy, by name
    assert skipped.exit_code == 0, skipped.output
    report = json.loads(skipped.stdout)
    assert report["ok"] is True
    got = {c["hardware_class"]: (c["state"], c["code"]) for c in report["classes"]}
    assert got == {
        "rpi4": ("rolling_out", ""),
        "rpi5": ("skipped", "gate_failed"),
        "ethos-u55-128-board": ("skipped", "compile_failed"),
        "toaster": ("skipped", "no_target"),
    }
    (rollout,) = client.get("/api/v1/rollouts").json()["items"]
    assert rollout["model"] == "digits:7-rpi4"

    # a refusal by the server names the class too: the rpi4 devices are busy with that rollout
    again = deploy(server, keydir, digits, Path("canary"), "--version", "8")
    assert again.exit_code == 1
    message = json.loads(again.stderr)["error"]["message"]
    assert message.startswith("deploy refused: rpi4: rollout_refused: "), message


def test_a_tflite_model_goes_to_the_cpu_and_two_ethos_u_npus_by_the_compilers_defaults(
    server: ServerThread, client: httpx.Client, keydir: KeyDir, tmp_path: Path
) -> None:
    """The model's format picks the targets: a TFLite model on rpi4 is tflite-int8, and each
    Ethos-U board gets its Vela-compiled target, with no mapping applied."""
    pytest.importorskip("ethosu.vela", reason="the ethos extra (ethos-u-vela) is not installed")
    from tests.compiler.tflite_builders import make_signature_tflite

    model = make_signature_tflite(tmp_path / "fc.tflite", features=16, outputs=4)
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.random.default_rng(0).normal(0, 1, (200, 16)).astype(np.float32))
    for device, hw in (("pi-1", "rpi4"), ("npu-1", "ethos-u55-128-board"), ("npu-2", "ethos-u65-256-board")):
        register(client, device, hw, app="ocr")
    policy = tmp_path / "canary.yaml"
    policy.write_text(POLICY.replace("ON_FAILURE", "abort"))
    result = runner.invoke(
        app,
        [
            "deploy", str(model), "--selector", "app=ocr", "--policy", str(policy), "--calib", str(calib),
            "--version", "1", "--keys", str(keydir.path), "--mixed-precision-budget", "0",
            "--server", server.url, "--json",
        ],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    got = {
        c["hardware_class"]: (c["target"], c["target_from"], c["state"])
        for c in json.loads(result.stdout)["classes"]
    }
    assert got == {
        "rpi4": ("tflite-int8", "built-in", "rolling_out"),
        "ethos-u55-128-board": ("ethos-u55-128", "built-in", "rolling_out"),
        "ethos-u65-256-board": ("ethos-u65-256", "built-in", "rolling_out"),
    }
    models = {m["version"]: m["target"] for m in client.get("/api/v1/models").json()["items"]}
    assert models == {
        "1-rpi4": "tflite-int8",
        "1-ethos-u55-128-board": "ethos-u55-128",
        "1-ethos-u65-256-board": "ethos-u65-256",
    }
