"""Each output is judged by its task's measure: kinds, their figures, the gate that follows them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from compiler import GateFailed, InvalidData, compile_model
from compiler.gate import Gate
from compiler.output_kinds import infer_kind, parse_declarations, resolve
from device_agent import figures as metrics
from signing.keyring import KeyDir

RNG = np.random.default_rng(0)


# --- inference: conservative ---------------------------------------------------------------


def test_a_small_rank2_regression_output_is_not_taken_for_class_scores() -> None:
    landmarks = RNG.uniform(0.4, 0.6, (50, 10)).astype(np.float32)  # 5 (x, y) points, no class
    assert infer_kind("Identity", landmarks, "Gemm", labels=False).kind == "regression"
    assert infer_kind("landmarks", landmarks, None, labels=True).kind == "regression"  # name beats labels
    assert infer_kind("output_0", RNG.normal(size=(50, 1)), None, labels=True).kind == "regression"
    assert infer_kind("y", RNG.normal(size=(50, 2, 8)), "Softmax", labels=False).kind == "regression"


def test_class_scores_need_evidence() -> None:
    logits = RNG.normal(size=(50, 10))
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert infer_kind("Identity", logits, "Softmax", labels=False).source == "inferred: next to Softmax"
    assert infer_kind("Identity", probs, None, labels=False).kind == "classification"
    assert infer_kind("logits", logits, None, labels=False).kind == "classification"
    assert infer_kind("Identity", logits, None, labels=True).kind == "classification"
    assert infer_kind("Identity", logits, "MatMul", labels=False).kind == "regression"
    assert infer_kind("label", np.arange(50), None, labels=False).kind == "integer"


def test_declarations_inline_and_from_files(tmp_path: Path) -> None:
    declared = parse_declarations("scores=classification, boxes=detection:box=cxcywh:threshold=0.3")
    assert declared["scores"].kind == "classification" and declared["scores"].source == "declared"
    assert declared["boxes"].params == {"box": "cxcywh", "threshold": "0.3"}
    toml = tmp_path / "kinds.toml"
    toml.write_text(
        '[outputs]\nmask = "segmentation:threshold=0.3"\n[outputs.state]\nkind = "sequence"\nstep = 10\n'
    )
    from_file = parse_declarations(str(toml))
    assert from_file["mask"].params == {"threshold": "0.3"} and from_file["state"].params == {"step": "10"}
    both = parse_declarations(f"{toml},scores=regression")
    assert set(both) == {"mask", "state", "scores"}
    for bad, message in (
        ("scores=classifier", "unknown kind 'classifier'; kinds: classification"),
        ("scores", "expected name=kind"),
        ("m=segmentation:box=xyxy", "bad segmentation parameter 'box=xyxy'"),
        (str(tmp_path / "missing.json"), "no such output-kind file"),
    ):
        with pytest.raises(InvalidData, match=message):
            parse_declarations(bad)
    with pytest.raises(InvalidData, match=r"'nope', which is not an output of the model \(outputs: a\)"):
        resolve(parse_declarations("nope=regression"), {"a": np.zeros((2, 2))}, {}, labels=False)


# --- figures per kind ----------------------------------------------------------------------


def test_regression_figures_include_max_and_relative_error() -> None:
    ref = np.array([[0.0, 1.0], [2.0, 4.0]])
    fig = metrics.regression(ref, ref + np.array([[0.0, 0.1], [0.0, -0.4]]))
    assert fig["max_abs_error"] == pytest.approx(0.4)
    assert fig["max_relative_error"] == pytest.approx(0.1)  # of the 0..4 range
    assert fig["mean_relative_error"] == pytest.approx(0.125 / 1.75)
    assert metrics.regression(ref, ref)["snr_db"] == metrics.SNR_CAP_DB


def test_detection_matches_boxes_by_iou_and_counts_score_decisions() -> None:
    boxes = np.array([[[0, 0, 10, 10, 0.9], [20, 20, 30, 30, 0.8], [50, 50, 60, 60, 0.1]]], dtype=np.float64)
    same = metrics.detection(boxes, boxes.copy())
    assert same["box_f1"] == 1.0 and same["box_iou_mean"] == 1.0 and same["score_agreement"] == 1.0
    moved = boxes.copy()
    moved[0, 0, :4] = [1, 1, 11, 11]  # IoU 81/119
    moved[0, 1, 4] = 0.2  # the second box drops below the threshold
    fig = metrics.detection(boxes, moved)
    assert fig["boxes_fp32"] == 2 and fig["boxes_int8"] == 1 and fig["boxes_matched"] == 1
    assert fig["box_f1"] == pytest.approx(2 / 3) and fig["box_iou_mean"] == pytest.approx(81 / 119)
    assert fig["score_agreement"] == pytest.approx(2 / 3)
    # scores in their own output, as logits, boxes as centre/size: a face detector's raw heads
    centre = np.array([[[5, 5, 10, 10], [25, 25, 10, 10]]], dtype=np.float64)
    logits = np.array([[[3.0], [-3.0]]])
    split = metrics.detection(centre, centre, box="cxcywh", ref_scores=logits, out_scores=logits)
    assert split["boxes_fp32"] == 1 and split["box_f1"] == 1.0


def test_anchor_offsets_are_paired_by_index_not_by_iou_across_anchors() -> None:
    """Raw SSD heads: box offsets from each anchor. Two anchors with the same small offset look alike
    in raw coordinates; swapping them is a different detection, which IoU pairing would not see."""
    raw = np.array([[[0.0, 0.0, 10, 10], [0.0, 0.0, 10, 10], [3.0, 0.0, 10, 10]]])
    swapped_scores = (np.array([[[4.0], [-4.0], [4.0]]]), np.array([[[-4.0], [4.0], [4.0]]]))
    by_iou = metrics.detection(
        raw, raw, box="cxcywh", ref_scores=swapped_scores[0], out_scores=swapped_scores[1]
    )
    assert by_iou["box_f1"] == 1.0  # the wrong answer for anchor-relative boxes
    by_index = metrics.detection(
        raw, raw, box="cxcywh", ref_scores=swapped_scores[0], out_scores=swapped_scores[1], match="index"
    )
    assert by_index["box_f1"] == pytest.approx(0.5) and by_index["boxes_matched"] == 1
    moved = raw.copy()
    moved[0, 2, 0] = 8.0  # IoU 2/18 with its own anchor's float box: below 0.5
    fig = metrics.detection(
        raw, moved, box="cxcywh", ref_scores=swapped_scores[0], out_scores=swapped_scores[0], match="index"
    )
    assert fig["boxes_matched"] == 1 and fig["box_f1"] == pytest.approx(0.5)
    with pytest.raises(InvalidData, match="match='nearest'"):
        parse_declarations("boxes=detection:match=nearest")
    with pytest.raises(InvalidData, match="box='yxyx'"):
        parse_declarations("boxes=detection:box=yxyx")


def test_a_detections_scores_output_is_judged_through_it() -> None:
    refs = {"boxes": np.zeros((4, 8, 4)), "conf": np.zeros((4, 8))}
    declared = parse_declarations("boxes=detection:scores=conf:match=index")
    kinds = resolve(declared, refs, {}, labels=False)
    assert kinds["conf"].kind == "scores" and "'boxes'" in kinds["conf"].source
    report = {"outputs": {"conf": {"kind": "scores", "snr_db": 3.0, "cosine_mean": 0.5}}}
    assert Gate().check(report) == []  # its SNR is reported, the detection's figures decide
    plain = resolve({}, refs, {}, labels=False)
    assert plain["conf"].kind == "regression"


def test_segmentation_mask_iou_at_a_threshold_and_by_argmax() -> None:
    ref = np.zeros((2, 1, 4, 4))
    ref[:, :, :2, :2] = 0.9
    out = ref.copy()
    out[1, 0, 0, 2] = 0.7  # one more pixel in sample 1: IoU 4/5
    fig = metrics.segmentation(ref, out, threshold=0.5)
    assert fig["mask_iou_min"] == pytest.approx(0.8) and fig["mask_iou_mean"] == pytest.approx(0.9)
    classes = np.stack([1 - ref[:, 0], ref[:, 0]], axis=1)  # [N, 2, H, W]
    by_class = metrics.segmentation(classes, classes, axis=1)
    assert by_class["mask_iou_mean"] == 1.0 and by_class["threshold"] is None


def test_sequence_error_is_taken_after_n_steps() -> None:
    ref = np.ones((3, 20, 4))
    drift = np.linspace(0, 0.5, 20)[None, :, None]  # error grows along the sequence
    fig = metrics.sequence(ref, ref + drift)
    assert fig["steps"] == 20 and fig["step"] == 20 and fig["step_error"] == pytest.approx(0.5)
    early = metrics.sequence(ref, ref + drift, step=5)
    assert early["step_error"] == pytest.approx(drift[0, 4, 0]) and early["step_errors"][0] == [1, 0.0]


# --- the gate follows the kinds -------------------------------------------------------------


def _report(**outputs: dict) -> dict:
    return {"nonfinite_outputs": 0, "outputs": outputs}


def test_the_gate_holds_each_output_to_its_kinds_figures_and_names_the_decider() -> None:
    report = _report(
        scores={"kind": "classification", "top1_agreement": 0.985, "snr_db": 9.0, "cosine_mean": 0.9},
        landmarks={"kind": "regression", "top1_agreement": 0.5, "snr_db": 30.0, "cosine_mean": 0.9995},
        mask={"kind": "segmentation", "mask_iou_mean": 0.9, "snr_db": 11.8, "cosine_mean": 0.95},
        state={"kind": "sequence", "step_error": 0.15, "snr_db": 12.0, "cosine_mean": 0.97},
    )
    decision = Gate().decide(report)
    assert decision["verdict"] == "passed" and decision["failures"] == []
    assert decision["decided_by"]["output"] == "scores"  # least margin: 0.99 vs 0.98
    assert {(c["output"], c["figure"]) for c in decision["checks"]} == {
        ("scores", "top1_agreement"),
        ("landmarks", "cosine_mean"),
        ("landmarks", "snr_db"),
        ("mask", "mask_iou_mean"),
        ("state", "step_error"),
    }
    failing = Gate(max_sequence_error=0.1, min_mask_iou=0.88).decide(report)
    assert failing["failures"] == [
        "relative error after N steps of 'state' is 0.1500, max 0.1000",
    ]
    assert failing["decided_by"] | {"kind": "sequence"} == failing["decided_by"]


def test_a_user_metric_adds_to_or_replaces_the_kinds() -> None:
    report = _report(y={"kind": "regression", "snr_db": 12.0, "cosine_mean": 0.999}) | {
        "user_metric": {"name": "m:f", "value": 0.97}
    }
    added = Gate(metric="m:f", metric_threshold=0.95).check(report)
    assert added == ["SNR (dB) of 'y' is 12.0, min 20.0"]
    replaced = Gate(metric="m:f", metric_threshold=0.95, metric_only=True).decide(report)
    assert replaced["verdict"] == "passed" and replaced["decided_by"]["figure"] == "user_metric"
    assert Gate(metric="m:f", metric_threshold=0.99, metric_only=True).check(report) == [
        "metric m:f of '(all)' is 0.9700, min 0.9900"
    ]
    with pytest.raises(ValueError, match="needs both"):
        Gate(metric="m:f")


# --- end to end on models built here ---------------------------------------------------------


def _landmark_regressor(path: Path) -> Path:
    """x [N, 32] -> Gemm -> Sigmoid -> 5 (x, y) points near the image centre: values close together,
    so which coordinate is largest flips under int8 noise (top-1 agreement ~0.9) at ~58 dB SNR."""
    w = np.random.default_rng(1).normal(0, 0.01, (32, 10)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w", "b"], ["h"]),
            helper.make_node("Sigmoid", ["h"], ["Identity"]),
        ],
        "landmarks",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
        [helper.make_tensor_value_info("Identity", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(np.zeros(10, np.float32), "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _compile(model: Path, calib: Path, keys: KeyDir, out: Path, **kw: object):
    return compile_model(
        model,
        target="arm64-cpu",
        calib_path=calib,
        out_dir=out,
        release_key=keys.key("release"),
        name="m",
        version="1",
        release=1,
        latency_repeats=0,
        **kw,  # type: ignore[arg-type]
    )


def test_a_landmark_regressor_passes_on_its_figures_not_top1(release_keys: KeyDir, tmp_path: Path) -> None:
    model = _landmark_regressor(tmp_path / "lm.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(2).normal(size=(200, 32)).astype(np.float32))
    result = _compile(model, tmp_path / "c.npz", release_keys, tmp_path / "b")
    fig = result.report["outputs"]["Identity"]
    assert fig["kind"] == "regression" and fig["kind_source"].startswith("default")
    assert "top1_agreement" not in fig and fig["snr_db"] > 30
    assert result.report["gate"]["decided_by"]["figure"] in ("snr_db", "cosine_mean")
    # Had it been taken for class scores, the argmax of near-equal coordinates would have refused
    # its 8-bit model (the mixed-precision search off: it would keep layers float to chase the flips):
    with pytest.raises(GateFailed, match="top-1 agreement of 'Identity'"):
        _compile(
            model,
            tmp_path / "c.npz",
            release_keys,
            tmp_path / "b2",
            output_kinds="Identity=classification",
            mixed_precision_seconds=0,
        )


def test_a_user_metric_from_a_module_decides(release_keys: KeyDir, tmp_path: Path) -> None:
    model = _landmark_regressor(tmp_path / "lm.onnx")
    np.savez(tmp_path / "c.npz", x=RNG.normal(size=(100, 32)).astype(np.float32))
    gate = Gate(metric="user_metrics_example:within_tolerance", metric_threshold=0.99, metric_only=True)
    result = _compile(model, tmp_path / "c.npz", release_keys, tmp_path / "b", gate=gate)
    assert result.report["user_metric"] == {"name": "user_metrics_example:within_tolerance", "value": 1.0}
    assert result.report["gate"]["decided_by"]["figure"] == "user_metric"
    with pytest.raises(InvalidData, match="metric user_metrics_example:broken raised RuntimeError"):
        broken = Gate(metric="user_metrics_example:broken", metric_threshold=0.5)
        _compile(model, tmp_path / "c.npz", release_keys, tmp_path / "b2", gate=broken)
    with pytest.raises(InvalidData, match="cannot import"):
        _compile(
            model,
            tmp_path / "c.npz",
            release_keys,
            tmp_path / "b3",
            gate=Gate(metric="nope:f", metric_threshold=1),
        )


def _cumulative_model(path: Path, steps: int = 24) -> Path:
    """x [N, steps, 4] -> running sum over time (MatMul with a lower-triangular matrix): a state that
    accumulates, as a recurrent model's does, so its int8 error compounds with the steps."""
    tri = np.tril(np.ones((steps, steps), np.float32))
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["tri", "x"], ["state"])],
        "cumsum",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", steps, 4])],
        [helper.make_tensor_value_info("state", TensorProto.FLOAT, ["N", steps, 4])],
        [numpy_helper.from_array(tri, "tri")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_sequence_output_is_judged_after_n_steps(release_keys: KeyDir, tmp_path: Path) -> None:
    model = _cumulative_model(tmp_path / "seq.onnx")
    np.savez(tmp_path / "c.npz", x=RNG.normal(size=(64, 24, 4)).astype(np.float32))
    result = _compile(
        model, tmp_path / "c.npz", release_keys, tmp_path / "b", output_kinds="state=sequence:step=12"
    )
    fig = result.report["outputs"]["state"]
    assert fig["kind"] == "sequence" and fig["step"] == 12 and fig["steps"] == 24
    assert fig["step_error"] < 0.2 and len(fig["step_errors"]) == 24
    assert result.report["gate"]["checks"] == [
        {
            "output": "state",
            "figure": "step_error",
            "value": fig["step_error"],
            "threshold": 0.2,
            "bound": "max",
            "passed": True,
        }
    ]


def _segmenter(path: Path) -> Path:
    """x [N, 1, 16, 16] -> 3x3 Conv -> Sigmoid: a probability map, like a text detector's."""
    w = RNG.normal(0, 0.5, (1, 1, 3, 3)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "w"], ["h"], pads=[1, 1, 1, 1]),
            helper.make_node("Sigmoid", ["h"], ["prob"]),
        ],
        "seg",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [helper.make_tensor_value_info("prob", TensorProto.FLOAT, ["N", 1, 16, 16])],
        [numpy_helper.from_array(w, "w")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_a_probability_map_declared_segmentation_is_judged_by_mask_iou(
    release_keys: KeyDir, tmp_path: Path
) -> None:
    model = _segmenter(tmp_path / "seg.onnx")
    np.savez(tmp_path / "c.npz", x=RNG.normal(size=(40, 1, 16, 16)).astype(np.float32))
    result = _compile(
        model,
        tmp_path / "c.npz",
        release_keys,
        tmp_path / "b",
        output_kinds="prob=segmentation:threshold=0.5",
    )
    fig = result.report["outputs"]["prob"]
    assert fig["kind"] == "segmentation" and fig["mask_iou_mean"] > 0.9
    assert [c["figure"] for c in result.report["gate"]["checks"]] == ["mask_iou_mean"]


@pytest.mark.slow
def test_cli_declares_kinds_and_a_metric(release_keys: KeyDir, tmp_path: Path) -> None:
    model = _landmark_regressor(tmp_path / "lm.onnx")
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(2).normal(size=(200, 32)).astype(np.float32))
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env |= {"COLUMNS": "100", "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    base = [sys.executable, "-m", "edgefleet.cli", "compile", str(model), "--calib", str(tmp_path / "c.npz")]
    base += ["--name", "lm", "--version", "1", "--keys", str(release_keys.path), "--latency-repeats", "0"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, env=env, timeout=300)

    inferred = run("--out", str(tmp_path / "b1"))
    assert inferred.returncode == 0, inferred.stderr
    assert "regression (default)" in inferred.stdout and "decided by" in inferred.stdout
    # (the search off: with it, the 8-bit refusal would start a search for float layers)
    declared = run(
        "--out",
        str(tmp_path / "b2"),
        "--output-kind",
        "Identity=classification",
        "--mixed-precision-budget",
        "0",
    )
    assert declared.returncode != 0 and "top-1 agreement of 'Identity'" in declared.stderr + declared.stdout
    metric = run(
        "--out",
        str(tmp_path / "b3"),
        "--output-kind",
        "Identity=classification",
        "--metric",
        "user_metrics_example:within_tolerance",
        "--metric-threshold",
        "0.99",
        "--metric-only",
    )
    assert metric.returncode == 0, metric.stderr + metric.stdout
    assert "user_metric" in metric.stdout
    bad = run("--out", str(tmp_path / "b4"), "--output-kind", "nope=regression")
    assert bad.returncode != 0 and "not an output of the model (outputs: Identity)" in bad.stderr
