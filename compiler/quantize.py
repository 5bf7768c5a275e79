"""ONNX float -> static QDQ int8, with the workarounds onnxruntime.quantization needs.

Settings (see docs/DESIGN): QDQ format, per-channel weights, U8S8 (activations
QUInt8, weights QInt8; S8S8 is slow on x86 and no better on ARM), MinMax
calibration (as good as Entropy/Percentile on the models tried, far faster).

Pitfalls handled here, each measured with onnxruntime 1.32:

- per-channel QDQ on an opset < 13 model writes an invalid model, so the
  model is upgraded with ``onnx.version_converter`` first;
- ``quant_pre_process``'s symbolic shape inference asserts on some real
  models; we retry with ``skip_symbolic_shape=True``;
- a Gemm bias of shape ``[1, N]`` (skl2onnx) with per-channel weights raises
  ValueError in the int32-bias weight adjustment; we retry with
  ``QDQDisableWeightAdjustForInt32Bias``. We do not set it up front because
  the adjustment protects against int32 bias overflow on the models it works on.
  The quantizer then dequantizes that ``[1, N]`` bias per channel along axis 0,
  whose length is 1: an invalid DequantizeLinear that onnxruntime only runs
  because its optimizer folds it away (with optimizations off, as the
  evaluation runs, it fails; the QNN config writes the same node). ``finish_qdq``
  has ``repair_per_axis`` point such a DQ at the one axis whose length matches
  its scales (``Gemm`` broadcasts ``[1, N]`` either way), for every ONNX target;
- a tensor whose calibrated range is NaN/inf makes ``compute_scale_zp``
  assert. We calibrate ourselves (same MinMax calibrator), keep such tensors
  and the nodes touching them in float, and hand the cleaned ranges to
  ``quantize_static`` as a calibration cache. The model then still computes
  what it computed (NaN stays NaN, for the gate to see) instead of failing or
  silently quantizing garbage. The cache also spares the retry a second
  calibration pass.

Calibration is chosen, not fixed: plain MinMax over many samples lets a few
outlier activations stretch the ranges (PaddleOCR's MobileNetV3 text
classifier, on the out-of-distribution text lines we first had: MinMax over 200 samples gave
top-1 agreement 0.95 / SNR 13.5 dB),
while onnxruntime's own ``moving_average`` MinMax (per-sample ranges averaged,
i.e. ``CalibMovingAverage``) gave 0.99 / 19.7 dB on the same data; on other
models plain MinMax is the better one. So every candidate of ``CALIBRATIONS``
is tried and the one with the best figures on the *calibration* samples wins
(``score``); the held-out evaluation set never takes part in the choice, so
the gate stays an honest test. Entropy (= MinMax here) and Percentile
(99.99: 0.97 / 18.5 dB, 99.9: 0.985 / 17.5 dB, 4x slower) were measured and
not kept. Keeping the worst 1-5 layers in float (by per-layer SNR drop from
``qdq_loss_debug``) did not help that model: its error is spread over its
~50 quantized activations.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import version_converter
from onnxruntime.quantization import (
    CalibrationDataReader,
    CalibrationMethod,
    QuantFormat,
    QuantType,
    TensorsData,
    create_calibrator,
    quantize_static,
    save_tensors_data,
)
from onnxruntime.quantization.shape_inference import quant_pre_process

from compiler.errors import InvalidModel, QuantizationError
from compiler.onnx_compact import compact_qdq

log = logging.getLogger(__name__)

MIN_OPSET = 13
QNN_UINT16_OPSET = 21  # first opset whose QuantizeLinear/DequantizeLinear take uint16
DEFAULT_DOMAINS = ("", "ai.onnx")
# name -> extra options of onnxruntime's MinMaxCalibrater (what quantize_static's Calib* options set).
CALIBRATIONS: dict[str, dict[str, Any]] = {
    "MinMax": {},
    "MinMax moving average": {"moving_average": True, "averaging_constant": 0.01},
}
ReaderFactory = Callable[[], CalibrationDataReader]
# Figures of a candidate int8 model on the calibration samples; higher is better (compared as tuples).
Score = Callable[[Path], tuple[float, ...]]


@dataclass
class QuantizeInfo:
    """How the model was quantized; goes into the manifest's quantization report."""

    source_opset: int
    opset: int
    symbolic_shape_inference: bool = True
    extra_options: dict[str, Any] = field(default_factory=dict)
    nonfinite_tensors: list[str] = field(default_factory=list)
    float_nodes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    format: str = "QDQ"
    activation_type: str = "QUInt8"
    weight_type: str = "QInt8"
    calibrate_method: str = "MinMax"
    calibration_candidates: dict[str, list[float]] = field(default_factory=dict)
    compaction: dict[str, Any] = field(default_factory=dict)
    calibration_cache: Path | None = None  # the chosen ranges, to re-quantize (mixed precision)
    mixed_precision: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.format,
            "activation_type": self.activation_type,
            "weight_type": self.weight_type,
            "per_channel": True,
            "calibrate_method": self.calibrate_method,
            "calibration_candidates": {
                "chosen_by": "(min SNR dB, top-1 agreement) on calibration samples, never held-out ones",
                "figures": dict(self.calibration_candidates),
            },
            "compaction": dict(self.compaction),
            "source_opset": self.source_opset,
            "opset": self.opset,
            "symbolic_shape_inference": self.symbolic_shape_inference,
            "extra_options": dict(self.extra_options),
            "nonfinite_calibration_tensors": list(self.nonfinite_tensors),
            "nodes_kept_float": list(self.float_nodes),
            "notes": list(self.notes),
        }


def load_model(path: Path) -> onnx.ModelProto:
    """Load and check an ONNX model; anything unreadable or invalid becomes ``InvalidModel``."""
    path = Path(path)
    if not path.is_file():
        raise InvalidModel(f"{path}: no such file")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises several unrelated classes on garbage input
        raise InvalidModel(f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc})") from exc
    if not model.graph.node:
        raise InvalidModel(f"{path}: the ONNX graph is empty (not a model, or a corrupt file)")
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InvalidModel(f"{path}: invalid ONNX model: {exc}") from exc
    return model


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in DEFAULT_DOMAINS:
            return int(imp.version)
    raise InvalidModel("model imports no default (ai.onnx) opset")


def upgrade_opset(model: onnx.ModelProto, minimum: int = MIN_OPSET) -> onnx.ModelProto:
    """Return the model at opset >= ``minimum`` (unchanged when it already is)."""
    if default_opset(model) >= minimum:
        return model
    try:
        upgraded = version_converter.convert_version(model, minimum)
        onnx.checker.check_model(upgraded)
    except Exception as exc:  # the converter raises RuntimeError/ValidationError/... per op adapter
        raise InvalidModel(
            f"cannot upgrade the model from opset {default_opset(model)} to {minimum} "
            f"(needed for per-channel QDQ): {exc}"
        ) from exc
    return upgraded


def prepare(model: onnx.ModelProto, work_dir: Path, info: QuantizeInfo) -> Path:
    """Upgrade the opset and run ``quant_pre_process``; returns the path of the float model to quantize.

    It runs inside ``work_dir``: when symbolic shape inference gives up, onnxruntime saves
    ``sym_shape_infer_temp.onnx`` and its weights as ``<uuid>.data`` into the *current* directory
    (PP-OCRv6's detector left 10 MB per compile in the user's folder).
    """
    upgraded = upgrade_opset(model)
    info.opset = default_opset(upgraded)
    upgraded_path = work_dir / "upgraded.onnx"
    onnx.save(upgraded, str(upgraded_path))
    prepared = work_dir / "prepared.onnx"
    if importlib.util.find_spec("sympy") is None:
        # onnxruntime's symbolic shape inference needs sympy, an optional dependency of ours.
        info.symbolic_shape_inference = False
        info.notes.append("symbolic shape inference skipped: sympy is not installed")
    else:
        try:
            with contextlib.chdir(work_dir):  # scratch files of a failed inference land here
                quant_pre_process(str(upgraded_path), str(prepared))
        except Exception as exc:  # symbolic shape inference asserts (AssertionError) on some real models
            log.warning("symbolic shape inference failed (%s); retrying without it", exc)
            info.symbolic_shape_inference = False
            info.notes.append(f"symbolic shape inference failed, skipped: {type(exc).__name__}: {exc}"[:300])
    if not info.symbolic_shape_inference:
        try:
            with contextlib.chdir(work_dir):
                quant_pre_process(str(upgraded_path), str(prepared), skip_symbolic_shape=True)
        except Exception as exc:
            raise QuantizationError(f"quant_pre_process failed even without symbolic shapes: {exc}") from exc
    return prepared


def calibrate_candidates(
    prepared: Path, reader: CalibrationDataReader, work_dir: Path, candidates: dict[str, dict[str, Any]]
) -> dict[str, TensorsData]:
    """The ranges of each of ``candidates`` (name -> ``MinMaxCalibrater`` options) from one pass.

    The augmented model's per-sample minima and maxima are all the calibrator keeps; plain MinMax
    takes their extremes and ``moving_average`` their mean (with no ``max_intermediate_outputs``
    nothing is merged in between, so ``averaging_constant`` plays no part). The model therefore runs
    over the calibration samples once, not once per candidate, for the same ranges bit for bit.
    """
    calibrator = create_calibrator(
        Path(prepared),
        None,
        augmented_model_path=str(work_dir / "augmented.onnx"),
        calibrate_method=CalibrationMethod.MinMax,
    )
    # collect_data reduces what it collected and then drops it; the other candidates need it still.
    calibrator.clear_collected_data = lambda: None
    found: dict[str, TensorsData] = {}
    with warnings.catch_warnings():
        # All-NaN tensors make nanmin/nanmax warn; nonfinite_tensors() reports them properly.
        warnings.simplefilter("ignore", RuntimeWarning)
        calibrator.collect_data(reader)
        for name, options in candidates.items():
            calibrator.moving_average = bool(options.get("moving_average", False))
            calibrator.averaging_constant = options.get("averaging_constant", 0.01)
            calibrator.calibrate_tensors_range = None
            found[name] = calibrator.compute_data()
    return found


def nonfinite_tensors(ranges: TensorsData) -> list[str]:
    """Tensors whose calibrated min or max is NaN or infinite."""
    bad = []
    for name, data in ranges.items():
        low, high = data.range_value
        if not (np.isfinite(np.asarray(low)).all() and np.isfinite(np.asarray(high)).all()):
            bad.append(name)
    return sorted(bad)


def quantize_int8(
    prepared: Path,
    output: Path,
    readers: ReaderFactory,
    info: QuantizeInfo,
    work_dir: Path,
    score: Score | None = None,
) -> None:
    """Write the best QDQ int8 model over ``CALIBRATIONS`` to ``output``; scratch files go to ``work_dir``.

    ``readers`` makes the calibration reader (one pass serves every candidate). Without ``score``
    only the first candidate (plain MinMax) is tried.
    """
    best: tuple[tuple[float, ...], str, Path, list[str], list[str], Path] | None = None
    names = list(CALIBRATIONS) if score is not None else list(CALIBRATIONS)[:1]
    try:
        ranges = calibrate_candidates(prepared, readers(), work_dir, {n: CALIBRATIONS[n] for n in names})
    except Exception as exc:
        raise QuantizationError(f"calibration failed: {type(exc).__name__}: {exc}") from exc
    for index, name in enumerate(names):
        candidate = work_dir / f"candidate{index}.onnx"
        _quantize_calibrated(prepared, candidate, ranges[name], info, work_dir)
        figures = score(candidate) if score is not None else ()
        info.calibration_candidates[name] = [round(f, 4) for f in figures]
        if best is None or figures > best[0]:
            cache = work_dir / f"calibration-{index}.json"
            best = (figures, name, candidate, info.nonfinite_tensors, info.float_nodes, cache)
    assert best is not None
    _, info.calibrate_method, chosen, info.nonfinite_tensors, info.float_nodes, info.calibration_cache = best
    os.replace(chosen, output)


def _quantize_calibrated(
    prepared: Path, output: Path, ranges: TensorsData, info: QuantizeInfo, work_dir: Path
) -> None:
    bad = set(nonfinite_tensors(ranges))
    model = onnx.load(str(prepared), load_external_data=False)
    float_nodes = sorted(n.name for n in model.graph.node if bad & {*n.input, *n.output})
    if bad:
        log.warning(
            "non-finite calibration ranges for %s; keeping nodes %s in float", sorted(bad), float_nodes
        )
        ranges = TensorsData(CalibrationMethod.MinMax, {k: v for k, v in ranges.items() if k not in bad})
    info.nonfinite_tensors, info.float_nodes = sorted(bad), float_nodes
    cache = work_dir / f"calibration-{output.stem.removeprefix('candidate')}.json"
    save_tensors_data(ranges, cache)
    quantize_from_cache(prepared, output, cache, info, float_nodes)


def quantize_from_cache(
    prepared: Path,
    output: Path,
    cache: Path,
    info: QuantizeInfo,
    float_nodes: list[str],
    overrides: dict[str, Any] | None = None,
    *,
    finish: bool = True,
) -> None:
    """``quantize_static`` on saved ranges: U8S8 per-channel QDQ, ``float_nodes`` left float,
    ``overrides`` as onnxruntime's ``TensorQuantOverrides`` (16-bit activations for chosen tensors).

    ``finish``: repair, compact (``finish_qdq``); without it only the per-axis repair, names kept.
    """
    attempts: list[dict[str, Any]] = [{}, {"QDQDisableWeightAdjustForInt32Bias": True}]
    base: dict[str, Any] = {}
    if overrides:
        base["TensorQuantOverrides"] = overrides
        if info.opset < QNN_UINT16_OPSET:  # 16-bit Q/DQ below opset 21 live in the com.microsoft domain
            base["UseQDQContribOps"] = True
    last: Exception | None = None
    for extra in attempts:
        try:
            quantize_static(
                str(prepared),
                str(output),
                None,
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibrate_method=CalibrationMethod.MinMax,
                nodes_to_exclude=float_nodes,
                extra_options=base | extra,
                calibration_cache_path=str(cache),
            )
        except ValueError as exc:
            log.info("quantize_static failed with extra_options=%s: %s", extra, exc)
            note = f"quantize_static with extra_options={extra} failed: {exc}"[:300]
            if note not in info.notes:
                info.notes.append(note)
            last = exc
            continue
        except Exception as exc:
            raise QuantizationError(f"quantize_static failed: {type(exc).__name__}: {exc}") from exc
        if not finish:
            repair_per_axis(output)
            return
        info.extra_options = extra
        finish_qdq(output, info, drop_zero_points=True)
        return
    raise QuantizationError(f"quantize_static failed: {last}") from last


def finish_qdq(output: Path, info: QuantizeInfo, *, drop_zero_points: bool) -> None:
    """What every quantizer output gets before it is scored or evaluated: invalid per-channel DQ axes
    repaired, unused opsets dropped, the file compacted (``compact_qdq``)."""
    repaired = repair_per_axis(output)
    note = f"{repaired} per-channel DequantizeLinear axis fixed (a [1, N] Gemm bias)"
    if repaired and note not in info.notes:  # once, though each calibration candidate is finished
        info.notes.append(note)
    drop_unused_opsets(output)
    info.compaction = compact_qdq(output, drop_zero_points=drop_zero_points)


def repair_per_axis(path: Path) -> int:
    """Fix per-channel DQ nodes whose ``axis`` is not as long as their scales; returns how many.

    Only the unambiguous case: a constant input with exactly one axis of the scales' length and every
    other axis of length 1, so the values and their scales are unchanged and only the axis is right.
    """
    model = onnx.load(str(path))
    inits = {i.name: i for i in model.graph.initializer}
    fixed = 0
    for node in model.graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) < 2:
            continue
        data, scale = inits.get(node.input[0]), inits.get(node.input[1])
        if data is None or scale is None or len(scale.dims) != 1 or scale.dims[0] <= 1:
            continue
        dims, channels = list(data.dims), int(scale.dims[0])
        axis_attr = next((a for a in node.attribute if a.name == "axis"), None)
        axis = (axis_attr.i if axis_attr is not None else 1) % max(len(dims), 1)
        if not dims or dims[axis] == channels:
            continue
        matching = [d for d, n in enumerate(dims) if n == channels]
        if len(matching) != 1 or any(n != 1 for d, n in enumerate(dims) if d != matching[0]):
            continue
        if axis_attr is None:
            node.attribute.append(onnx.helper.make_attribute("axis", matching[0]))
        else:
            axis_attr.i = matching[0]
        fixed += 1
    if fixed:
        onnx.save(model, str(path))
    return fixed


def drop_unused_opsets(path: Path) -> None:
    """Remove opset imports no node uses (``quant_pre_process`` adds training/preview/aten domains).

    Fewer declared domains means fewer reasons for an older device runtime to
    refuse the model; the default domain always stays.
    """
    model = onnx.load(str(path))
    used = {n.domain for n in model.graph.node} | set(DEFAULT_DOMAINS)
    keep = [imp for imp in model.opset_import if imp.domain in used]
    if len(keep) != len(model.opset_import):
        del model.opset_import[:]
        model.opset_import.extend(keep)
        onnx.checker.check_model(model)
        onnx.save(model, str(path))


def quantize_qnn(
    prepared: Path,
    output: Path,
    reader: CalibrationDataReader,
    info: QuantizeInfo,
    activations: str,
    overrides: dict[str, Any] | None = None,
    float_nodes: list[str] | None = None,
    *,
    finish: bool = True,
) -> None:
    """QDQ for onnxruntime's QNN EP (Hexagon HTP) with ``get_qnn_qdq_config``.

    ``qnn_preprocess_model`` is not called: it raises TypeError on models
    that carry ``metadata_props`` (PaddleOCR's do), and ``quant_pre_process``
    already did the shape inference it would add. Weights are uint8
    per-channel, activations uint8 or uint16 (``activations``), as the HTP
    wants; the config's tensor overrides take care of the ops that need
    fixed ranges (Sigmoid, Tanh...).

    ``overrides`` (``TensorQuantOverrides``: 16-bit activations for chosen tensors; the config adds
    the uint8 <-> uint16 conversions the HTP needs) and ``float_nodes`` serve the mixed-precision
    search; ``finish=False`` keeps the float model's tensor names (only the per-axis repair).
    """
    from onnxruntime.quantization import quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    act = {"uint8": QuantType.QUInt8, "uint16": QuantType.QUInt16}.get(activations)
    if act is None:
        raise QuantizationError(f"QNN activations must be uint8 or uint16, got {activations!r}")
    if act == QuantType.QUInt16 or overrides:
        prepared = _opset21_for_uint16(prepared, output.parent / f"{output.stem}-opset21.onnx", info)
    try:
        config = get_qnn_qdq_config(
            str(prepared),
            reader,
            calibrate_method=CalibrationMethod.MinMax,
            activation_type=act,
            weight_type=QuantType.QUInt8,
            per_channel=True,
            init_overrides=overrides or None,
            nodes_to_exclude=float_nodes or None,
        )
        quantize(str(prepared), str(output), config)
    except Exception as exc:  # onnxruntime raises ValueError/AssertionError/RuntimeError here
        raise QuantizationError(f"QNN quantization failed: {type(exc).__name__}: {exc}") from exc
    if not finish:
        repair_per_axis(output)
        return
    info.format = f"QDQ for QNN HTP (activations {activations}, weights uint8 per-channel)"
    info.activation_type = "QUInt16" if activations == "uint16" else "QUInt8"
    info.weight_type = "QUInt8"
    # Names, value_info, shared equal scales/zero points; every Q/DQ keeps its explicit zero point
    # (uint8 weights are asymmetric on the HTP; sharing already makes the zero points cheap).
    finish_qdq(output, info, drop_zero_points=False)


def _opset21_for_uint16(prepared: Path, path: Path, info: QuantizeInfo) -> Path:
    """The float model at opset 21, where the standard Q/DQ ops take uint16.

    Below opset 21, ``get_qnn_qdq_config`` sets ``UseQDQContribOps`` (16-bit
    Q/DQ in the ``com.microsoft`` domain), and ``quantize`` then upgrades the
    model to opset 21 anyway (``onnx.version_converter``, as here). Upgrading
    first gives the standard-domain Q/DQ that onnxruntime's QNN tooling itself
    writes for an opset-21 model: the same nodes and values, measured
    bit-identical host outputs on the text classifier, and 408 fewer
    ``domain: "com.microsoft"`` fields (6 KB of its 204 KB).
    """
    from onnxruntime.quantization.quant_utils import save_and_reload_model_with_shape_infer

    model = onnx.load(str(prepared))
    if default_opset(model) >= QNN_UINT16_OPSET:
        return prepared
    try:
        upgraded = version_converter.convert_version(model, QNN_UINT16_OPSET)
        upgraded = save_and_reload_model_with_shape_infer(upgraded)
    except Exception as exc:  # op adapters raise assorted errors; quantize() would upgrade it the same way
        log.info("opset 21 upgrade for uint16 failed (%s); onnxruntime's contrib Q/DQ are used", exc)
        return prepared
    onnx.save(upgraded, str(path))
    info.opset = QNN_UINT16_OPSET
    return path
