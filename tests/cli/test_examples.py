"""`edgefleet examples digits`: a new user's model and data, good enough for `edgefleet compile` as is."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from edgefleet.cli import app
from signing.keyring import init_keys

runner = CliRunner()


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """In a fresh process, as a user runs it (a wide terminal, so a message is never wrapped)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")} | {"COLUMNS": "200"}
    cmd = [sys.executable, "-m", "edgefleet.cli", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)


def test_digits_writes_the_three_files_and_they_compile(tmp_path: Path) -> None:
    out = tmp_path / "new" / "dir"
    made = runner.invoke(app, ["examples", "digits", "--out", str(out), "--json"])
    assert made.exit_code == 0, made.output
    listed = json.loads(made.stdout)
    assert listed["files"] == {
        "model": str(out / "model.onnx"),
        "calib": str(out / "calib.npz"),
        "eval": str(out / "eval.npz"),
    }
    assert sorted(p.name for p in out.iterdir()) == ["calib.npz", "eval.npz", "model.onnx"]  # no leftovers
    evals = np.load(out / "eval.npz")
    assert evals["x"].shape == (listed["evaluation_samples"], 64) and len(evals["y"]) == len(evals["x"])
    assert np.load(out / "calib.npz")["x"].shape == (listed["calibration_samples"], 64)
    assert listed["fp32_accuracy"] > 0.9

    init_keys(tmp_path / "keys")
    compiled = runner.invoke(
        app,
        [
            "compile",
            listed["files"]["model"],
            "--calib",
            listed["files"]["calib"],
            "--eval",
            listed["files"]["eval"],
            "--name",
            "digits",
            "--version",
            "1",
            "--keys",
            str(tmp_path / "keys"),
            "--out",
            str(tmp_path / "digits-1.bundle"),
            "--latency-repeats",
            "0",
            "--json",
        ],
    )
    assert compiled.exit_code == 0, compiled.output
    manifest = json.loads(compiled.stdout)["manifest"]
    assert manifest["quantization"]["gate"]["verdict"] == "passed"
    assert manifest["quantization"]["accuracy"]["int8"] > 0.9


def test_existing_files_are_kept_unless_forced(tmp_path: Path) -> None:
    (tmp_path / "model.onnx").write_bytes(b"my own model")
    refused = _cli("examples", "digits", "--out", str(tmp_path))
    assert refused.returncode == 1
    assert refused.stderr.strip().splitlines() == [
        f"error: {tmp_path} has model.onnx already (--force overwrites)"
    ]
    assert (tmp_path / "model.onnx").read_bytes() == b"my own model"
    assert not (tmp_path / "calib.npz").exists()
    forced = runner.invoke(app, ["examples", "digits", "--out", str(tmp_path), "--force"])
    assert forced.exit_code == 0, forced.output
    assert (tmp_path / "model.onnx").read_bytes().startswith(b"\x08")  # an ONNX protobuf now
    assert "edgefleet compile" in forced.stdout


def test_an_unwritable_directory_is_one_line_and_exit_1(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("not a directory")
    for target in (tmp_path / "a-file", tmp_path / "a-file" / "below"):
        result = _cli("examples", "digits", "--out", str(target))
        assert result.returncode == 1
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: cannot write to {target}: "), result.stderr
        assert "Traceback" not in result.stderr and result.stdout == ""
    assert (tmp_path / "a-file").read_text() == "not a directory"


def test_help_names_the_files() -> None:
    result = runner.invoke(app, ["examples", "digits", "--help"])
    assert result.exit_code == 0
    assert "model.onnx" in result.output and "eval.npz" in result.output
    assert "digits" in runner.invoke(app, ["examples", "--help"]).output
