"""Inputs and outputs of the new targets on small, fast cases: sources, preprocessing, refusals, report."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compiler import InvalidData, InvalidModel, compile_model, known_targets
from compiler.examples import DigitsExample
from compiler.gate import Gate
from compiler.signature import TensorSpec
from compiler.sources import Preprocess, load_source
from compiler.tflite_prep import read_tflite
from compiler.vela import parse_summary
from signing.keyring import KeyDir

SPEC = (TensorSpec("img", (None, 3, 4, 6), "float32"),)


def digits_samples() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    return (d.data[:200] / 16.0).astype(np.float32), d.target[:200]


def test_registry_has_every_target_family() -> None:
    assert {"arm64-cpu", "qnn-htp", "qnn-htp-a16", "tflite-int8", "ethos-u55-128", "ethos-u65-256"} <= set(
        known_targets()
    )


def test_image_folder_with_preprocessing_and_labels(tmp_path: Path) -> None:
    for label, colour in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
        (tmp_path / label).mkdir()
        Image.new("RGB", (12, 8), colour).save(tmp_path / label / "x.png")
    s = load_source(
        tmp_path, SPEC, Preprocess.parse("layout=NCHW,scale=0.00392156862745098,mean=0.5,std=0.5")
    )
    assert s.inputs["img"].shape == (2, 3, 4, 6)
    assert list(s.labels) == [0, 1]  # type: ignore[arg-type]
    np.testing.assert_allclose(s.inputs["img"][0, :, 0, 0], [1.0, -1.0, -1.0], atol=1e-6)
    (tmp_path / "a" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(InvalidData, match="not a readable image"):
        load_source(tmp_path, SPEC, Preprocess())


def test_preprocess_and_callable_errors() -> None:
    with pytest.raises(InvalidData, match="unknown key"):
        Preprocess.parse("colour=rgb")
    with pytest.raises(InvalidData, match="layout"):
        Preprocess.parse("layout=CHW")
    with pytest.raises(InvalidData, match="cannot import"):
        load_source("no_such_module_xyz:make", SPEC)
    with pytest.raises(InvalidData, match="raised ZeroDivisionError"):
        load_source(lambda: 1 / 0, SPEC)


def test_digits_from_a_callable_with_latency_and_html(
    digits: DigitsExample, release_keys: KeyDir, tmp_path: Path
) -> None:
    html = tmp_path / "report.html"
    result = compile_model(
        digits.model_path,
        target="arm64-cpu",
        calib_path=digits_samples,
        out_dir=tmp_path / "b",
        release_key=release_keys.key("release"),
        name="d",
        version="1",
        release=1,
        latency_repeats=5,
        html_report=html,
    )
    r = result.report
    assert r["accuracy"]["int8"] > 0.85 and r["evaluation_source"].startswith("split")
    assert r["latency"]["threads_1"]["fp32_ms"] > 0 and r["latency"]["threads_2"]["int8_ms"] > 0
    assert r["ops"]["ops"] == {"Gemm": 2, "Relu": 1}
    assert sum(r["outputs"]["scores"]["error_histogram"]["counts"]) == r["evaluation_samples"] * 10
    assert "<svg" in html.read_text() and "passed" in html.read_text()


def test_qnn_target_on_digits(digits: DigitsExample, release_keys: KeyDir, tmp_path: Path) -> None:
    result = compile_model(
        digits.model_path,
        target="qnn-htp",
        calib_path=digits.calib_path,
        eval_path=digits.eval_path,
        out_dir=tmp_path / "q",
        release_key=release_keys.key("release"),
        name="d",
        version="1",
        release=1,
        latency_repeats=0,
    )
    assert result.report["outputs"]["scores"]["top1_agreement"] >= 0.98
    assert result.report["method"]["weight_type"] == "QUInt8" and result.report["ops"]["unsupported"] == {}


def test_format_mismatch_and_corrupt_tflite(
    digits: DigitsExample, release_keys: KeyDir, tmp_path: Path
) -> None:
    kw = dict(
        calib_path=digits.calib_path,
        release_key=release_keys.key("release"),
        name="d",
        version="1",
        release=1,
    )
    with pytest.raises(InvalidModel, match="takes TFLITE models, this is ONNX"):
        compile_model(digits.model_path, target="tflite-int8", out_dir=tmp_path / "x", **kw)  # type: ignore[arg-type]
    bad = tmp_path / "bad.tflite"
    bad.write_bytes(b"\x00\x00\x00\x00TFL3" + b"\xff" * 40)
    with pytest.raises(InvalidModel, match=r"corrupt TFLite|no operators"):
        compile_model(bad, target="tflite-int8", out_dir=tmp_path / "y", **kw)  # type: ignore[arg-type]
    with pytest.raises(InvalidModel, match="not a TFLite"):
        read_tflite(b"garbage!")
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


def test_vela_summary_parsing_and_budget_gate(tmp_path: Path) -> None:
    csv_path = tmp_path / "s.csv"
    csv_path.write_text(
        "accelerator_configuration,sram_memory_used,off_chip_flash_memory_used,on_chip_flash_memory_used,"
        "dram_memory_used,cycles_total,cycles_npu,inference_time,nn_macs\n"
        "Ethos_U55_128,300.5,90.25,0,0,970427,809489,0.0019,1000\n"
    )
    stdout = (
        "Warning (supported operators) operator: PRELU, ofm: 'p'\nReason: Float32 tensor\n\n"
        "CPU operators = 1 (25.0%)\nNPU operators = 3 (75.0%)\n"
    )
    s = parse_summary(csv_path, stdout)
    assert s["sram_kib"] == 300.5 and s["flash_kib"] == 90.25 and s["cpu_fraction"] == 0.25
    assert s["cpu_ops_by_type"] == {"PRELU": 1}
    report = {
        "outputs": {},
        "npu": {"vela": s, "budgets": Gate(max_sram_kib=256).budgets({"max_cpu_fraction": 0.2})},
    }
    failures = Gate().check(report)
    assert any("KiB SRAM" in f for f in failures) and any("PRELU x1" in f for f in failures)
