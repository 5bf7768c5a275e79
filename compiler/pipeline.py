"""compile_model: float ONNX + calibration data -> evaluated, gated, signed bundle.

Steps: load and check the model, read the samples against its signature,
quantize (``compiler.quantize``), evaluate int8 vs fp32 on held-out samples
(``compiler.evaluate``), apply the gate, then write ``model.onnx`` and
``bundle.dsse.json``. Everything is built in a staging directory next to
``out_dir`` and renamed into place only at the end, so a refusal or a crash
never leaves a partial or unsigned bundle where a later ``models push`` would
pick it up.
"""

from __future__ import annotations

import hashlib
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime

from compiler.coverage import onnx_coverage, tflite_coverage
from compiler.data import Samples, SamplesReader
from compiler.errors import CompilerError, GateFailed, InvalidData, InvalidModel
from compiler.evaluate import evaluate, evaluate_runners
from compiler.gate import Gate
from compiler.html_report import write_html_report
from compiler.quantize import QuantizeInfo, default_opset, load_model, prepare, quantize_int8, quantize_qnn
from compiler.runners import TFLiteRunner, latency
from compiler.signature import IOSignature, io_signature
from compiler.size_parts import size_breakdown
from compiler.sources import DataSource, Preprocess, load_source
from compiler.targets import ETHOS_U, ONNX_QDQ, QNN_QDQ, Target, get_target, known_targets
from compiler.tflite_post import finish_int8
from compiler.tflite_prep import drop_unused_buffers, op_histogram, prepare_tflite, read_tflite
from compiler.tflite_quant import quantize_tflite
from compiler.vela import VelaConfig, run_vela
from signing.keys import KeyPair
from signing.manifest import BundleManifest, sign_bundle

Progress = Callable[[str, float], None]
DEFAULT_GATE = Gate()  # frozen, so safe as a default argument
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0


@dataclass(frozen=True)
class CompileResult:
    """Where the bundle went, what was signed, and the full quantization report."""

    bundle_dir: Path
    manifest: BundleManifest
    report: dict[str, Any]

    @property
    def model_path(self) -> Path:
        return self.bundle_dir / self.manifest.model_file.path


def compiler_version() -> str:
    try:
        return metadata.version("edgefleet")
    except metadata.PackageNotFoundError:
        return "0+unknown"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def compile_model(
    model_path: Path,
    *,
    target: str,
    calib_path: DataSource,
    eval_path: DataSource | None = None,
    out_dir: Path,
    release_key: KeyPair,
    name: str,
    version: str,
    release: int,
    hardware_ids: list[str] | None = None,
    gate: Gate | None = DEFAULT_GATE,
    progress: Progress | None = None,
    overwrite: bool = False,
    preprocess: Preprocess | None = None,
    latency_repeats: int = 20,
    html_report: Path | None = None,
) -> CompileResult:
    """Compile ``model_path`` for ``target`` into a signed bundle at ``out_dir``.

    ``calib_path``/``eval_path`` are an ``.npz``, an image folder (with
    ``preprocess``), ``module:function`` or a callable (``compiler.sources``).
    Without ``eval_path`` the calibration data is split 80/20 (deterministic)
    into calibration and held-out samples. The default gate applies unless the
    caller deliberately passes ``gate=None``, which skips it (the manifest
    records ``"gate": "skipped"``); otherwise a miss raises
    ``GateFailed`` and nothing is written (the HTML report still is, when
    asked for, so the user can see why). ``out_dir`` must not exist unless
    ``overwrite``. Raises ``CompilerError`` subclasses for bad inputs.
    """
    started = time.perf_counter()
    report_progress = progress or (lambda _step, _fraction: None)
    tgt = get_target(target)
    _check_meta(name, version, release)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another output directory or pass overwrite")
    fmt = model_format(Path(model_path))
    if fmt != tgt.accepts:
        fitting = ", ".join(t for t in known_targets() if get_target(t).accepts == fmt)
        raise InvalidModel(
            f"{model_path}: target {tgt.name!r} takes {tgt.accepts.upper()} models, this is {fmt.upper()} "
            f"(targets for {fmt.upper()}: {fitting})"
        )
    report_progress("load", 0.0)
    with tempfile.TemporaryDirectory(prefix="edgefleet-compile-") as tmp:
        work = Path(tmp)
        if fmt == "onnx":
            built = _build_onnx(
                Path(model_path), tgt, calib_path, eval_path, preprocess, work, report_progress
            )
        else:
            built = _build_tflite(
                Path(model_path), tgt, calib_path, eval_path, preprocess, gate, work, report_progress
            )
        report = built.report
        report["target"] = {"name": tgt.name, "backend": tgt.backend, "runtime": tgt.runtime}
        report["size"]["parts"] = size_breakdown(built.fp32, built.int8)
        if latency_repeats > 0:
            report_progress("latency", 0.8)
            feed = {k: v[:1] for k, v in built.held_out.inputs.items()}
            report["latency"] = latency(built.fp32, built.int8, feed, latency_repeats)
        report_progress("gate", 0.85)
        if gate is None:
            report["gate"] = "skipped"
        else:
            failures = gate.check(report)
            report["gate"] = {
                "thresholds": gate.thresholds(),
                "verdict": "failed" if failures else "passed",
                "failures": failures,
            }
            if failures:
                if html_report is not None:
                    write_html_report(html_report, report, title=f"{name}:{version} for {tgt.name}")
                raise GateFailed(failures, report)
        report["compile_seconds"] = round(time.perf_counter() - started, 3)
        if html_report is not None:
            write_html_report(html_report, report, title=f"{name}:{version} for {tgt.name}")

        report_progress("sign", 0.9)
        fields = {
            "name": name,
            "version": version,
            "release": release,
            "target": tgt.name,
            "hardware_ids": list(hardware_ids)
            if hardware_ids is not None
            else list(tgt.default_hardware_ids),
            "io_signature": built.sig.to_dict(),
            "quantization": report,
            "provenance": _provenance(Path(model_path), calib_path, eval_path),
        }
        manifest = _write_bundle(out_dir, built.artifact, tgt, fields, release_key, overwrite)
    report_progress("done", 1.0)
    return CompileResult(out_dir, manifest, report)


@dataclass
class _Built:
    """What a backend produced: the file to ship, the two models to compare, the report so far."""

    artifact: Path
    fp32: tuple[Path | bytes, str]
    int8: tuple[Path | bytes, str]
    sig: IOSignature
    held_out: Samples
    report: dict[str, Any]


def model_format(path: Path) -> str:
    """``onnx`` or ``tflite``, by content (the TFLite file identifier), not by name."""
    if not path.is_file():
        raise InvalidModel(f"{path}: no such file")
    with open(path, "rb") as fh:
        head = fh.read(8)
    return "tflite" if head[4:8] == b"TFL3" else "onnx"


def _build_onnx(
    model_path: Path,
    tgt: Target,
    calib_src: DataSource,
    eval_src: DataSource | None,
    pre: Preprocess | None,
    work: Path,
    report_progress: Progress,
) -> _Built:
    model = load_model(model_path)
    try:
        sig = io_signature(model)
    except ValueError as exc:
        raise InvalidModel(f"{model_path}: {exc}") from exc
    if not sig.inputs or not sig.outputs:
        raise InvalidModel(f"{model_path}: the model has no inputs or no outputs")
    foreign = tgt.unsupported_domains({n.domain for n in model.graph.node})
    if foreign:
        raise InvalidModel(
            f"{model_path}: uses operator domain(s) {', '.join(foreign)}, which target {tgt.name!r} "
            f"does not run (supported: {', '.join(repr(d) for d in tgt.operator_domains)})"
        )
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    coverage = onnx_coverage(ops, "qnn" if tgt.backend == QNN_QDQ else "cpu")
    calib, held_out, eval_source = _samples(calib_src, eval_src, sig, pre)

    source_copy = work / "source.onnx"
    onnx.save(model, str(source_copy))
    info = QuantizeInfo(source_opset=default_opset(model), opset=default_opset(model))
    report_progress("prepare", 0.1)
    prepared = prepare(model, work, info)
    report_progress("quantize", 0.25)
    int8_path = work / tgt.model_file
    if tgt.backend == QNN_QDQ:
        quantize_qnn(prepared, int8_path, SamplesReader(calib, sig.inputs), info, tgt.option("activations"))
    elif tgt.backend == ONNX_QDQ:
        quantize_int8(
            prepared,
            int8_path,
            lambda: SamplesReader(calib, sig.inputs, batch_size=1),
            info,
            work,
            score=lambda candidate: _calibration_score(source_copy, candidate, calib, sig),
        )
    else:
        raise CompilerError(f"target {tgt.name!r}: backend {tgt.backend!r} does not take ONNX")
    report_progress("evaluate", 0.6)
    # Compare against the untouched source model: that is what the user shipped before.
    report = evaluate(source_copy, int8_path, held_out, sig)
    report["calibration_samples"] = calib.usable(sig.inputs)
    report["evaluation_source"] = eval_source
    report["method"] = info.to_dict()
    report["ops"] = coverage
    return _Built(int8_path, (source_copy, "onnx"), (int8_path, "onnx"), sig, held_out, report)


def _build_tflite(
    model_path: Path,
    tgt: Target,
    calib_src: DataSource,
    eval_src: DataSource | None,
    pre: Preprocess | None,
    gate: Gate | None,
    work: Path,
    report_progress: Progress,
) -> _Built:
    source = model_path.read_bytes()
    prepared, prep_info = prepare_tflite(source, model_path)
    try:
        fp32_runner = TFLiteRunner(prepared)
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError on models it cannot allocate
        raise InvalidModel(f"{model_path}: LiteRT cannot run the float model: {exc}") from exc
    sig = fp32_runner.signature()
    if any(s.numpy_dtype.kind != "f" for s in (*sig.inputs, *sig.outputs)):
        raise InvalidModel(f"{model_path}: not a float model (inputs/outputs {sig.to_dict()})")
    npu = tgt.backend == ETHOS_U
    coverage = tflite_coverage(op_histogram(read_tflite(prepared)), npu)
    calib, held_out, eval_source = _samples(calib_src, eval_src, sig, pre)
    report_progress("quantize", 0.25)
    one_by_one = [{k: v[i : i + 1] for k, v in calib.inputs.items()} for i in range(len(calib))]
    int8, post = finish_int8(drop_unused_buffers(quantize_tflite(prepared, one_by_one)), int8_prelu=npu)
    int8_path = work / "int8.tflite"
    int8_path.write_bytes(int8)
    int8_runner = TFLiteRunner(int8)
    report_progress("evaluate", 0.6)
    report = evaluate_runners(fp32_runner.run, int8_runner.run, held_out, sig, len(prepared), len(int8))
    report["size"]["source_bytes"] = len(source)
    report["calibration_samples"] = len(calib)
    report["evaluation_source"] = eval_source
    report["method"] = {
        "quantizer": "ai-edge-quantizer",
        "recipe": "static_wi8_ai8",
        "calibration": "min/max over all samples (qsv_utils.min_max_update)",
        "prepare": prep_info.to_dict(),
        "post": post.to_dict(),
        "io_quantization": int8_runner.io_quantization(),
    }
    report["ops"] = {**coverage, "int8": op_histogram(read_tflite(int8))}
    artifact = int8_path
    if npu:
        assert tgt.vela is not None
        report_progress("vela", 0.7)
        compiled, summary = run_vela(int8_path, VelaConfig(*tgt.vela), work / "vela")
        budgets = (gate or Gate()).budgets(dict(tgt.budgets))
        report["npu"] = {
            "vela": summary,
            "budgets": budgets,
            "compiled_bytes": compiled.stat().st_size,
            "evaluated": "the int8 TFLite before Vela (the Ethos-U op cannot run on this host)",
        }
        artifact = compiled
    return _Built(artifact, (prepared, "tflite"), (int8, "tflite"), sig, held_out, report)


SCORE_SAMPLES = 64


def _calibration_score(fp32: Path, int8: Path, calib: Samples, sig: IOSignature) -> tuple[float, ...]:
    """(min SNR dB, min top-1 agreement) of a candidate int8 model on (up to 64) calibration samples.

    Only calibration samples: choosing on the held-out set would tune the model to the very data the
    gate then judges it on.
    """
    n = min(len(calib), SCORE_SAMPLES)
    figures = evaluate(fp32, int8, calib.take(np.arange(n)), sig)["outputs"].values()
    snr = min((f["snr_db"] if f["snr_db"] is not None else -math.inf) for f in figures)
    agreement = [f["top1_agreement"] for f in figures if "top1_agreement" in f]
    worst = min((a if a is not None else -math.inf) for a in agreement) if agreement else 1.0
    return (round(snr, 1), worst)


def _check_meta(name: str, version: str, release: int) -> None:
    if not name or not version:
        raise CompilerError("bundle name and version must be non-empty")
    if ":" in name or "/" in name or "/" in version:
        raise CompilerError(f"bundle name/version may not contain ':' or '/': {name!r} {version!r}")
    if isinstance(release, bool) or not isinstance(release, int) or release < 0:
        raise CompilerError(f"release must be a non-negative integer, got {release!r}")


def _samples(
    calib_path: DataSource, eval_path: DataSource | None, sig: IOSignature, pre: Preprocess | None
) -> tuple[Samples, Samples, str]:
    calib = load_source(calib_path, sig.inputs, pre)
    if eval_path is None:
        calib, held_out = calib.split(HELD_OUT_FRACTION, SPLIT_SEED)
        source = f"split {1 - HELD_OUT_FRACTION:.0%}/{HELD_OUT_FRACTION:.0%} of calibration data"
    else:
        held_out = load_source(eval_path, sig.inputs, pre)
        source = "separate"
    for label, samples, path in (("calibration", calib, calib_path), ("evaluation", held_out, eval_path)):
        if samples.usable(sig.inputs) == 0:
            raise InvalidData(
                f"{path or calib_path}: {len(samples)} {label} samples, "
                "fewer than the model's fixed batch size"
            )
    return calib, held_out, source


def _source_id(source: DataSource | None) -> str | None:
    """sha256 of a data file; the folder path or callable name otherwise (the data is in the report)."""
    if source is None:
        return None
    if isinstance(source, str | Path) and Path(source).is_file():
        return sha256_file(Path(source))
    if isinstance(source, str | Path):
        return str(source)
    return getattr(source, "__qualname__", type(source).__name__)


def _provenance(model_path: Path, calib_path: DataSource, eval_path: DataSource | None) -> dict[str, Any]:
    return {
        "source_sha256": sha256_file(model_path),
        "calibration_sha256": _source_id(calib_path),
        "evaluation_sha256": _source_id(eval_path),
        "compiler_version": compiler_version(),
        "onnxruntime_version": onnxruntime.__version__,
        "onnx_version": onnx.__version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }


def _write_bundle(
    out_dir: Path, model_file: Path, tgt: Target, fields: dict[str, Any], key: KeyPair, overwrite: bool
) -> BundleManifest:
    """Sign in a staging dir beside ``out_dir`` (same filesystem), then rename it into place."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".staging", dir=out_dir.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it owner-only; a bundle is public data
        shutil.copyfile(model_file, staging / tgt.model_file)
        manifest = sign_bundle(staging, fields, [tgt.model_file], key)
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
