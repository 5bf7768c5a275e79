"""What a compile report shows: integer outputs judged by equality, tables instead of JSON, a log-scale
error histogram with axes, and a terminal summary free of stray library log lines."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler import compile_model
from compiler.evaluate import compare_output
from compiler.examples import DigitsExample
from compiler.gate import Gate
from compiler.html_report import render, svg_histogram
from signing.keyring import KeyDir


@pytest.fixture(scope="module")
def skl_model(digits: DigitsExample, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """skl2onnx's MLP: an int64 ``label`` [N] output beside the float ``probabilities`` [N, 10]."""
    from skl2onnx import to_onnx
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    work = tmp_path_factory.mktemp("skl")
    data = np.load(digits.eval_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf = MLPClassifier((16,), max_iter=100, random_state=0).fit(data["x"], data["y"])
    model = to_onnx(clf, data["x"][:1], options={"zipmap": False}, target_opset=13)
    (work / "skl.onnx").write_bytes(model.SerializeToString())
    np.savez(work / "calib.npz", X=np.load(digits.calib_path)["x"])
    np.savez(work / "eval.npz", X=data["x"], y=data["y"])
    return work / "skl.onnx", work / "calib.npz", work / "eval.npz"


def test_integer_labels_are_compared_for_equality_not_cosine() -> None:
    ref = np.array([3, 1, 4, 1, 5, 9], dtype=np.int64)
    out = np.array([3, 1, 4, 1, 5, 8], dtype=np.int64)  # one label changed: a cosine would still be ~1
    fig = compare_output(ref, out)
    assert fig["kind"] == "integer"
    assert fig["exact_agreement"] == pytest.approx(5 / 6) and fig["changed_samples"] == 1
    assert not {"cosine_mean", "cosine_min", "snr_db", "error_histogram"} & fig.keys()
    masks = compare_output(
        np.zeros((4, 2, 2), np.int32), np.array([[[0, 0], [0, 1]]] + [[[0, 0], [0, 0]]] * 3)
    )
    assert masks["exact_agreement"] == 0.75 and masks["element_agreement"] == pytest.approx(15 / 16)
    assert compare_output(np.ones((3, 4), np.float32), np.ones((3, 4), np.float32))["kind"] == "regression"


def test_the_gate_holds_a_label_output_to_the_agreement_threshold_only() -> None:
    report = {
        "nonfinite_outputs": 0,
        "outputs": {"label": {"kind": "integer", "exact_agreement": 0.5, "changed_samples": 5}},
    }
    assert Gate().check(report) == ["exact agreement of 'label' is 0.5000, min 0.9800"]
    assert Gate(min_top1_agreement=0.5).check(report) == []


def test_a_model_with_a_label_output_compiles_and_its_page_has_no_cosine_for_it(
    skl_model: tuple[Path, Path, Path], release_keys: KeyDir, tmp_path: Path
) -> None:
    model, calib, evals = skl_model
    result = compile_model(
        model,
        target="arm64-cpu",
        calib_path=calib,
        eval_path=evals,
        out_dir=tmp_path / "b",
        release_key=release_keys.key("release"),
        name="skl",
        version="1",
        release=1,
        gate=Gate(),
        latency_repeats=3,
        html_report=tmp_path / "report.html",
    )
    outputs = result.report["outputs"]
    label, probs = outputs["label"], outputs["probabilities"]
    assert label["kind"] == "integer" and "snr_db" not in label and "cosine_mean" not in label
    # the label is the argmax of the probabilities: both agreements count the same changed samples
    assert label["exact_agreement"] == pytest.approx(probs["top1_agreement"])
    assert result.report["gate"]["verdict"] == "passed"
    page = (tmp_path / "report.html").read_text()
    row = re.search(r"<tr><td>label</td><td>integer \(inferred\)</td>(.*?)</tr>", page)
    assert row and "exact 0.98" in row.group(1) and row.group(1).count("n/a") == 2  # no SNR, no cosine
    assert "label: error distribution" not in page and "probabilities: error distribution" in page


def test_the_html_page_is_tables_and_a_log_histogram_with_axes(
    digits: DigitsExample, release_keys: KeyDir, tmp_path: Path
) -> None:
    result = compile_model(
        digits.model_path,
        target="arm64-cpu",
        calib_path=digits.calib_path,
        eval_path=digits.eval_path,
        out_dir=tmp_path / "b",
        release_key=release_keys.key("release"),
        name="d",
        version="1",
        release=1,
        latency_repeats=3,
    )
    page = render(result.report, "d:1")
    assert '{"' not in page and "{'" not in page  # no JSON or dict reprs anywhere
    latency = re.search(r'<table class="latency">(.*?)</table>', page)
    assert latency and "<th>threads</th>" in latency.group(1) and "<td>1</td>" in latency.group(1)
    ops = re.search(r'<table class="ops">(.*?)</table>', page)
    assert ops and "<td>Gemm</td><td>2</td><td>supported</td>" in ops.group(1)
    method = re.search(r'<table class="method">(.*?)</table>', page, re.S)
    assert method and "<td>per_channel</td><td>yes</td>" in method.group(1)
    assert '<table class="calibration">' in page
    assert "elements (log scale)" in page and "fraction of the fp32 output range" in page


def _bar_heights(svg: str) -> list[float]:
    return [float(h) for h in re.findall(r'<rect [^>]*height="([0-9.]+)"', svg)]


def test_a_single_element_in_the_tail_gets_a_visible_bar() -> None:
    hist = {"edges": [-0.4, -0.2, 0.0, 0.2, 0.4], "counts": [1, 5000, 4000, 0]}
    svg = svg_histogram(hist)
    heights = _bar_heights(svg)
    assert len(heights) == 3  # an empty bin draws nothing
    # log axis: one element gets a bar of several pixels (a linear axis gives it 1/5000 of the tallest)
    assert min(heights) >= 8 and max(heights) / min(heights) < 20
    assert [t for t in re.findall(r">(\d+)</text>", svg)][:5] == ["1", "10", "100", "1000", "10000"]
    for tick in ("-0.4", "0", "0.4"):
        assert f">{tick}</text>" in svg


def _gemm_with_a_computed_bias(path: Path) -> Path:
    """A Gemm whose bias is a graph input: onnxruntime's quantizer warns through the root logger."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w", "b"], ["y"], name="g")],
        "gemm",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16]),
            helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 8]),
        ],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 8])],
        [numpy_helper.from_array(rng.normal(0, 0.3, (16, 8)).astype(np.float32), "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


@pytest.mark.slow
def test_the_terminal_summary_is_tables_and_library_warnings_are_attributed(
    release_keys: KeyDir, tmp_path: Path
) -> None:
    """In a fresh process (as a user runs it): no ``WARNING:root:`` line, no JSON, the warning is kept."""
    model = _gemm_with_a_computed_bias(tmp_path / "g.onnx")
    rng = np.random.default_rng(1)
    np.savez(
        tmp_path / "c.npz",
        x=rng.random((100, 16)).astype(np.float32),
        b=rng.random((100, 8)).astype(np.float32),
    )
    base = [sys.executable, "-m", "edgefleet.cli", "compile", str(model), "--calib", str(tmp_path / "c.npz")]
    base += ["--name", "g", "--version", "1", "--keys", str(release_keys.path), "--latency-repeats", "2"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")} | {"COLUMNS": "120"}
    shown = subprocess.run(
        [*base, "--out", str(tmp_path / "b1")], capture_output=True, text=True, env=env, timeout=300
    )
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout + shown.stderr
    assert "WARNING:root" not in text and '{"' not in text
    assert "int8 vs fp32" in shown.stdout and "host latency" in shown.stdout
    # The warning is kept in the report's notes, not printed between the progress bar and the tables.
    assert "is not constant" not in shown.stderr and "toolchain message(s) kept" in shown.stdout
    as_json = subprocess.run(
        [*base, "--out", str(tmp_path / "b2"), "--json"], capture_output=True, text=True, env=env, timeout=300
    )
    assert as_json.returncode == 0, as_json.stderr
    assert "WARNING:root" not in as_json.stderr
    log = json.loads(as_json.stdout)["log"]
    assert {(e["level"], e["source"]) for e in log} >= {
        ("warning", "onnxruntime.quantization.operators.gemm")
    }


def test_the_precision_table_says_what_shipped_and_what_it_cost() -> None:
    from compiler.report_tables import precision, precision_mix

    assert precision_mix({}) == "8-bit" and precision({}) is None
    dynamic = {
        "mixed_precision": {
            "triggered_by": ["relative error after N steps of 'p' is 0.5, max 0.2"],
            "tries": [{"mode": "a16"}, {"mode": "dynamic"}],
            "stopped": "passed",
            "seconds": 7.0,
            "chosen": {"mode": "dynamic", "layers": ["/rnn/LSTM"], "count": 1},
            "cost": {"size_ratio_to_8bit": 1.19, "size_ratio_to_all16": 1.19, "latency_ratio_to_8bit": 9.2},
        }
    }
    assert precision_mix(dynamic) == "1 recurrent layer(s) dynamic int8, the rest float"
    table = precision(dynamic)
    assert table is not None
    cells = {row[0]: row[1] for row in table.rows}
    assert cells["layers kept wider"] == ["/rnn/LSTM"] and "after N steps" in cells["8-bit missed the gate"]
    assert cells["tries"] == "2 in 7 s, passed" and cells["size vs 8-bit / all-16-bit"] == "1.19 / 1.19"
    on_top = {
        "mixed_precision": {"chosen": None, "recurrent": {"ops": ["GRU"], "passed": True, "failures": []}}
    }
    assert precision_mix(on_top) == "8-bit, recurrent layers dynamic int8"
    refused = {
        "mixed_precision": {"chosen": None, "recurrent": {"ops": ["GRU"], "passed": False, "failures": ["x"]}}
    }
    table = precision(refused)
    assert precision_mix(refused) == "8-bit" and table is not None and "not kept: x" in table.rows[-1][1]
