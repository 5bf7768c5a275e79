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

import onnx
import onnxruntime

from compiler.data import Samples, SamplesReader, load_samples
from compiler.errors import CompilerError, GateFailed, InvalidData, InvalidModel
from compiler.evaluate import evaluate
from compiler.gate import Gate
from compiler.quantize import QuantizeInfo, default_opset, load_model, prepare, quantize_int8
from compiler.signature import IOSignature, io_signature
from compiler.targets import ONNX_QDQ, Target, get_target
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
    calib_path: Path,
    eval_path: Path | None = None,
    out_dir: Path,
    release_key: KeyPair,
    name: str,
    version: str,
    release: int,
    hardware_ids: list[str] | None = None,
    gate: Gate | None = DEFAULT_GATE,
    progress: Progress | None = None,
    overwrite: bool = False,
) -> CompileResult:
    """Compile ``model_path`` for ``target`` into a signed bundle at ``out_dir``.

    Without ``eval_path`` the calibration file is split 80/20 (deterministic)
    into calibration and held-out samples. The default gate applies unless the
    caller deliberately passes ``gate=None``, which skips it (the manifest
    records ``"gate": "skipped"``); otherwise a miss raises
    ``GateFailed`` and nothing is written. ``out_dir`` must not exist unless
    ``overwrite``. Raises ``CompilerError`` subclasses for bad inputs.
    """
    started = time.perf_counter()
    report_progress = progress or (lambda _step, _fraction: None)
    tgt = get_target(target)
    if tgt.backend != ONNX_QDQ:
        raise CompilerError(f"target {tgt.name!r} uses backend {tgt.backend!r}, which is not implemented yet")
    _check_meta(name, version, release)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; choose another output directory or pass overwrite")

    report_progress("load", 0.0)
    model = load_model(Path(model_path))
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
    calib, held_out, eval_source = _samples(Path(calib_path), eval_path, sig)

    with tempfile.TemporaryDirectory(prefix="edgefleet-compile-") as tmp:
        work = Path(tmp)
        source_copy = work / "source.onnx"
        onnx.save(model, str(source_copy))
        info = QuantizeInfo(source_opset=default_opset(model), opset=default_opset(model))
        report_progress("prepare", 0.1)
        prepared = prepare(model, work, info)
        report_progress("quantize", 0.25)
        int8_path = work / tgt.model_file
        quantize_int8(prepared, int8_path, SamplesReader(calib, sig.inputs), info, work)
        report_progress("evaluate", 0.7)
        # Compare against the untouched source model: that is what the user shipped before.
        report = evaluate(source_copy, int8_path, held_out, sig)
        report["calibration_samples"] = calib.usable(sig.inputs)
        report["evaluation_source"] = eval_source
        report["method"] = info.to_dict()
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
                raise GateFailed(failures, report)
        report["compile_seconds"] = round(time.perf_counter() - started, 3)

        report_progress("sign", 0.9)
        fields = {
            "name": name,
            "version": version,
            "release": release,
            "target": tgt.name,
            "hardware_ids": list(hardware_ids)
            if hardware_ids is not None
            else list(tgt.default_hardware_ids),
            "io_signature": sig.to_dict(),
            "quantization": report,
            "provenance": _provenance(Path(model_path), Path(calib_path), eval_path),
        }
        manifest = _write_bundle(out_dir, int8_path, tgt, fields, release_key, overwrite)
    report_progress("done", 1.0)
    return CompileResult(out_dir, manifest, report)


def _check_meta(name: str, version: str, release: int) -> None:
    if not name or not version:
        raise CompilerError("bundle name and version must be non-empty")
    if ":" in name or "/" in name or "/" in version:
        raise CompilerError(f"bundle name/version may not contain ':' or '/': {name!r} {version!r}")
    if isinstance(release, bool) or not isinstance(release, int) or release < 0:
        raise CompilerError(f"release must be a non-negative integer, got {release!r}")


def _samples(calib_path: Path, eval_path: Path | None, sig: IOSignature) -> tuple[Samples, Samples, str]:
    calib = load_samples(calib_path, sig.inputs)
    if eval_path is None:
        calib, held_out = calib.split(HELD_OUT_FRACTION, SPLIT_SEED)
        source = f"split {1 - HELD_OUT_FRACTION:.0%}/{HELD_OUT_FRACTION:.0%} of calibration data"
    else:
        held_out = load_samples(Path(eval_path), sig.inputs)
        source = "file"
    for label, samples, path in (("calibration", calib, calib_path), ("evaluation", held_out, eval_path)):
        if samples.usable(sig.inputs) == 0:
            raise InvalidData(
                f"{path or calib_path}: {len(samples)} {label} samples, "
                "fewer than the model's fixed batch size"
            )
    return calib, held_out, source


def _provenance(model_path: Path, calib_path: Path, eval_path: Path | None) -> dict[str, Any]:
    return {
        "source_sha256": sha256_file(model_path),
        "calibration_sha256": sha256_file(calib_path),
        "evaluation_sha256": sha256_file(Path(eval_path)) if eval_path is not None else None,
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
