"""Inputs real users bring that the compiler once got wrong, each on a file built here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from tflite_builders import make_signature_tflite

from compiler import InvalidData, InvalidModel, compile_model
from compiler.coverage import onnx_coverage
from compiler.examples import DigitsExample
from compiler.gate import Gate
from compiler.runners import TFLiteRunner
from compiler.tflite_prep import prepare_tflite, read_tflite
from compiler.toolchain_notes import parse_stderr
from signing.keyring import KeyDir
from signing.manifest import ENVELOPE_NAME


def _compile(model: Path, calib: Path, keys: KeyDir, out: Path, target: str, **kw: object):
    return compile_model(
        model,
        target=target,
        calib_path=calib,
        out_dir=out,
        release_key=keys.key("release"),
        name="m",
        version="1",
        release=1,
        latency_repeats=0,
        **kw,  # type: ignore[arg-type]
    )


@pytest.mark.parametrize("fp16", [False, True], ids=["fp32-weights", "fp16-weights"])
def test_a_float_tflite_with_a_signaturedef_compiles(
    fp16: bool, release_keys: KeyDir, tmp_path: Path
) -> None:
    """Converter output: tensor ``serving_default_x:0``, signature key ``x``; the quantizer wants ``x``."""
    model = make_signature_tflite(tmp_path / "m.tflite", fp16=fp16)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", x=rng.uniform(-1, 1, (60, 16)).astype(np.float32))
    result = _compile(
        model, tmp_path / "c.npz", release_keys, tmp_path / "b", "tflite-int8", gate=Gate(min_snr_db=10)
    )
    report = result.report
    assert report["gate"]["verdict"] == "passed"
    assert report["method"]["prepare"]["fp16_constants_folded"] == (1 if fp16 else 0)
    assert report["method"]["prepare"]["signature_added"] is False
    shipped = read_tflite(result.model_path.read_bytes())
    assert "DEQUANTIZE" not in str(report["ops"]["int8"])  # nothing float left behind
    sig = shipped.signatureDefs[0]
    tensors = shipped.subgraphs[0].tensors
    assert [e.name.decode() for e in sig.inputs] == ["x"]
    assert [tensors[e.tensorIndex].name.decode() for e in sig.outputs] == ["StatefulPartitionedCall:0"]


def test_fp16_folding_keeps_the_signature_pointing_at_the_io_tensors(tmp_path: Path) -> None:
    source = make_signature_tflite(tmp_path / "m.tflite", fp16=True).read_bytes()
    prepared, info = prepare_tflite(source)
    assert info.fp16_constants_folded == 1
    model = read_tflite(prepared)
    sg = model.subgraphs[0]
    sig = model.signatureDefs[0]
    assert [e.tensorIndex for e in sig.inputs] == list(sg.inputs)
    assert [e.tensorIndex for e in sig.outputs] == list(sg.outputs)
    x = np.random.default_rng(1).normal(size=(3, 16)).astype(np.float32)
    before, after = (
        TFLiteRunner(source).run({"serving_default_x:0": x}),
        TFLiteRunner(prepared).run({"serving_default_x:0": x}),
    )
    np.testing.assert_array_equal(before[0], after[0])  # fp16 -> fp32 is exact


NOT_MODELS = {
    "text": (b"hello, this is a README\n", "a text file"),
    "html": (b"<!DOCTYPE html><html>404 Not Found</html>", "HTML"),
    "zip": (b"PK\x03\x04" + b"\x00" * 40, "a zip archive"),
    "png": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "a PNG image"),
    "empty": (b"", "an empty file"),
}


@pytest.mark.parametrize("suffix", [".onnx", ".tflite", ".npz"])
@pytest.mark.parametrize("kind", sorted(NOT_MODELS))
def test_a_file_that_is_no_model_is_named_for_what_it_is(
    suffix: str, kind: str, digits: DigitsExample, release_keys: KeyDir, tmp_path: Path
) -> None:
    content, what = NOT_MODELS[kind]
    path = tmp_path / f"file{suffix}"
    path.write_bytes(content)
    for target in ("arm64-cpu", "tflite-int8"):
        with pytest.raises(InvalidModel) as info:
            _compile(path, digits.calib_path, release_keys, tmp_path / "b", target)
        message = str(info.value)
        assert "\n" not in message and what in message and "not a model" in message
        assert "this is ONNX" not in message and "this is TFLITE" not in message
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("kind", ["text", "html", "png", "empty"])
def test_a_calibration_file_that_is_no_npz_is_named_for_what_it_is(
    kind: str, digits: DigitsExample, release_keys: KeyDir, tmp_path: Path
) -> None:
    content, what = NOT_MODELS[kind]
    path = tmp_path / "calib.npz"
    path.write_bytes(content)
    with pytest.raises(InvalidData) as info:
        _compile(digits.model_path, path, release_keys, tmp_path / "b", "arm64-cpu")
    message = str(info.value)
    assert "not an .npz archive" in message and what in message and "pickled" not in message
    model_as_calib = tmp_path / "model.npz"
    model_as_calib.write_bytes(digits.model_path.read_bytes())
    with pytest.raises(InvalidData, match="the file is an ONNX model"):
        _compile(digits.model_path, model_as_calib, release_keys, tmp_path / "b", "arm64-cpu")


def test_qnn_coverage_does_not_call_constant_unsupported() -> None:
    found = onnx_coverage({"Constant": 300, "Conv": 4, "NonMaxSuppression": 1}, "qnn")
    assert set(found["unsupported"]) == {"NonMaxSuppression"}
    assert found["ops"]["Constant"] == 300


def test_native_stderr_lines_are_parsed_into_notes() -> None:
    text = (
        "2026-12-06 10:00:00.123456789 [W:onnxruntime:, graph.cc:1234 Resolve] Removing initializer 'w'.\n"
        "W1206 10:00:00.123456  4242 calibrator.cc:88] moving average disabled\n"
        "INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\n"
        "\n"
        "something else\n"
    )
    assert parse_stderr(text) == [
        ("warning", "onnxruntime", "Removing initializer 'w'."),
        ("warning", "absl calibrator.cc:88", "moving average disabled"),
        ("info", "litert", "Created TensorFlow Lite XNNPACK delegate for CPU."),
        ("output", "stderr", "something else"),
    ]


def _cli(args: list[str], keys: KeyDir, columns: int = 80) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")} | {"COLUMNS": str(columns)}
    base = [sys.executable, "-m", "edgefleet.cli", "compile", "--name", "m", "--version", "1"]
    return subprocess.run(
        [*base, "--keys", str(keys.path), "--latency-repeats", "2", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_npu_table_fits_80_columns_notes_replace_stderr_and_overwrite_exists(
    release_keys: KeyDir, tmp_path: Path
) -> None:
    """A fresh process as a user runs it: LiteRT's and Vela's chatter lands in the report, not on stderr."""
    pytest.importorskip("ethosu.vela")
    model = make_signature_tflite(tmp_path / "m.tflite", fp16=True)
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(0).uniform(-1, 1, (40, 16)).astype(np.float32))
    args = [str(model), "--calib", str(tmp_path / "c.npz"), "-t", "ethos-u55-128", "--min-snr", "10"]
    out = tmp_path / "b"
    first = _cli([*args, "--out", str(out)], release_keys)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert max(len(line) for line in lines) <= 80
    assert not [line for line in lines if "│" in line and "…" in line]  # folded, never cut
    for figure in ("sram_kib", "flash_kib", "cycles_total", "cpu_fraction"):
        assert figure in first.stdout
    assert "XNNPACK" not in first.stderr and "INFO:" not in first.stderr
    assert "toolchain message(s) kept in the report" in first.stdout
    assert (out / ENVELOPE_NAME).is_file()
    again = _cli([*args, "--out", str(out)], release_keys)
    assert again.returncode != 0 and "--overwrite" in again.stderr + again.stdout
    replaced = _cli([*args, "--out", str(out), "--overwrite", "--json"], release_keys)
    assert replaced.returncode == 0, replaced.stderr
    log = json.loads(replaced.stdout)["log"]
    assert any(n["source"] == "litert" and "XNNPACK" in n["message"] for n in log)
    assert "XNNPACK" not in replaced.stderr
