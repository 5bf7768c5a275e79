"""compile_model: float model + calibration data -> evaluated, gated, signed bundle.

Steps: look the target up, check the model's format against what its family
accepts, let the family build (``compiler.targets.*``: load, samples,
quantize, evaluate int8 vs fp32 on held-out samples), measure latency and
where the bytes go, apply the gate, then write the family's model file and
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
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import onnx
import onnxruntime

from compiler.build import BuildRequest, Built, Progress
from compiler.errors import CompilerError, GateFailed, InvalidModel
from compiler.evaluate import Judging, session
from compiler.gate import Gate
from compiler.golden import FILE_NAME as GOLDEN_FILE
from compiler.golden import GoldenSet, build_golden
from compiler.html_report import REPORT_FILE, render, write_html_report
from compiler.memory import MemoryPlan, budget_from_machine, peak_usage, reset_peak
from compiler.output_kinds import OutputKind, parse_declarations
from compiler.runners import latency, open_runner
from compiler.size_parts import size_breakdown, size_target
from compiler.sniff import describe, is_tflite, looks_like_onnx, read_head
from compiler.sources import DataSource, Preprocess
from compiler.targets import Target, family_of, get_target, known_targets
from compiler.toolchain_notes import capture_toolchain
from compiler.user_metric import UserMetric
from signing.keys import KeyPair
from signing.manifest import BundleManifest, sign_bundle

DEFAULT_GATE = Gate()  # frozen, so safe as a default argument


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
    output_kinds: dict[str, OutputKind] | str | None = None,
    max_memory: int | None = None,
    mixed_precision_seconds: float = 120.0,
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
    ``overwrite``. ``output_kinds``: declared kinds per output (``compiler.output_kinds``: a
    mapping, ``name=kind,...`` or a ``.toml``/``.json`` path); the rest are inferred.
    ``max_memory``: bytes the compile plans its batches in (``compiler.memory``; default: from the
    machine's limits). ``mixed_precision_seconds``: time budget of the search for a mix of 16-bit
    activations / float layers when all-8-bit misses the gate (``compiler.mixed_precision``;
    arm64-cpu, qnn-htp, tflite-int8; 0 turns it off). Raises
    ``CompilerError`` subclasses for bad inputs.
    """
    started = time.perf_counter()
    reset_peak()  # the peak this compile reaches, not the process's earlier ones
    report_progress = progress or (lambda _step, _fraction: None)
    tgt = get_target(target)
    _check_meta(name, version, release)
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(
            f"{out_dir} exists; choose another output directory or replace it with --overwrite "
            "(overwrite=True in the API)"
        )
    fmt = model_format(Path(model_path))
    if fmt != tgt.accepts:
        fitting = ", ".join(t for t in known_targets() if get_target(t).accepts == fmt)
        raise InvalidModel(
            f"{model_path}: target {tgt.name!r} takes {tgt.accepts.upper()} models, this is {fmt.upper()} "
            f"(targets for {fmt.upper()}: {fitting})"
        )
    declared = parse_declarations(output_kinds) if isinstance(output_kinds, str) else dict(output_kinds or {})
    metric = UserMetric.load(gate.metric) if gate is not None and gate.metric else None
    judging = Judging(declared=declared, metric=metric)
    if max_memory is not None and max_memory <= 0:
        raise CompilerError(f"max_memory must be a positive number of bytes, got {max_memory}")
    plan = MemoryPlan(max_memory, "--max-memory") if max_memory else budget_from_machine()
    report_progress("load", 0.0)
    with tempfile.TemporaryDirectory(prefix="edgefleet-compile-") as tmp:
        work = Path(tmp)
        request = BuildRequest(
            Path(model_path),
            tgt,
            calib_path,
            eval_path,
            preprocess,
            gate,
            work,
            report_progress,
            judging,
            plan,
            mixed_precision_seconds,
        )
        try:
            with capture_toolchain() as notes:
                built = _build_and_measure(request, latency_repeats)
        except CompilerError as exc:
            exc.notes = notes.rows()
            raise
        report = built.report
        report["notes"] = notes.rows()
        report.setdefault("memory", plan.to_dict())["peak_rss_bytes"] = peak_usage()
        # Before the gate, so a refused model's report says what the compile cost too.
        report["compile_seconds"] = round(time.perf_counter() - started, 3)
        report_progress("gate", 0.85)
        if gate is None:
            report["gate"] = "skipped"
        else:
            report["gate"] = gate.decide(report)
            failures = report["gate"]["failures"]
            if failures:
                if html_report is not None:
                    write_html_report(html_report, report, title=f"{name}:{version} for {tgt.name}")
                raise GateFailed(failures, report)
        if html_report is not None:
            write_html_report(html_report, report, title=f"{name}:{version} for {tgt.name}")

        report_progress("golden set", 0.88)
        golden = _golden(built, report)
        if golden.section is not None:
            report["acceptance"] = golden.section
        else:
            report["acceptance_skipped"] = golden.why
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
        extra = {GOLDEN_FILE: golden.data} if golden.data is not None else {}
        # The report travels signed in the bundle, so the fleet server (its console) can show what
        # the release key vouched for; devices never fetch it (they load files[0] and the golden set).
        extra[REPORT_FILE] = render(report, f"{name}:{version} for {tgt.name}").encode()
        manifest = _write_bundle(out_dir, built.artifact, tgt, fields, release_key, overwrite, extra)
    report_progress("done", 1.0)
    return CompileResult(out_dir, manifest, report)


def _build_and_measure(request: BuildRequest, latency_repeats: int) -> Built:
    """The family's build, then the sizes and host latency: every step that runs third-party code."""
    tgt = request.target
    built = family_of(tgt).build(request)
    report = built.report
    report["target"] = {"name": tgt.name, "backend": tgt.backend, "runtime": tgt.runtime}
    size = report["size"]
    size["parts"] = size_breakdown(built.fp32, built.int8)
    int8_parts = size["parts"]["int8"]
    size["target"] = size_target(
        size["fp32_bytes"], size["int8_bytes"], int8_parts["constants"] + int8_parts["quantization"]
    )
    # The file that ships: the int8 model itself, or what a family compiled it into (Vela).
    size["artifact_bytes"] = built.artifact.stat().st_size
    fp32_bytes = size["fp32_bytes"]
    size["artifact_ratio"] = round(size["artifact_bytes"] / fp32_bytes, 3) if fp32_bytes else None
    if latency_repeats > 0:
        request.progress("latency", 0.8)
        feed = {k: v[:1] for k, v in built.held_out.inputs.items()}
        report["latency"] = latency(built.fp32, built.int8, feed, latency_repeats)
    return built


def model_format(path: Path) -> str:
    """``onnx`` or ``tflite``, by content (``compiler.sniff``), never by name; anything else is refused.

    A file that is neither gets one line naming what it is (text, a zip or ``.npz``, an image...),
    so a wrong file is never reported as the other model format.
    """
    if not path.is_file():
        raise InvalidModel(f"{path}: no such file")
    head = read_head(path)
    if is_tflite(head):
        return "tflite"
    if looks_like_onnx(head) or _parses_as_onnx(path):
        return "onnx"
    raise InvalidModel(
        f"{path}: not a model: the file is {describe(head)}; "
        "compile takes an ONNX model or a float TFLite flatbuffer"
    )


def _parses_as_onnx(path: Path) -> bool:
    """The rare ONNX file whose first field is not ``ir_version``: a full parse with a graph decides."""
    try:
        return bool(onnx.load(str(path), load_external_data=False).graph.node)
    except Exception:  # protobuf raises DecodeError and others on what is not a ModelProto
        return False


def _check_meta(name: str, version: str, release: int) -> None:
    if not name or not version:
        raise CompilerError("bundle name and version must be non-empty")
    if ":" in name or "/" in name or "/" in version:
        raise CompilerError(f"bundle name/version may not contain ':' or '/': {name!r} {version!r}")
    if isinstance(release, bool) or not isinstance(release, int) or release < 0:
        raise CompilerError(f"release must be a non-negative integer, got {release!r}")


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


def _golden(built: Built, report: dict[str, Any]) -> GoldenSet:
    """The golden set on the held-out samples: fp32 reference outputs, and the int8 model's figures
    as the gate measured them (ONNX with the reference semantics, ``compiler.evaluate``)."""
    model_bytes = report["size"].get("artifact_bytes") or built.artifact.stat().st_size
    try:
        fp32 = open_runner(*built.fp32)
        path, fmt = built.int8
        int8: Any = (
            _ReferenceRunner(path) if isinstance(path, Path) and fmt == "onnx" else open_runner(path, fmt)
        )
        return build_golden(built.held_out, built.sig, fp32.run, int8.run, report["outputs"], model_bytes)
    except Exception as exc:  # a model that will not run one sample at a time: no golden set, said so
        return GoldenSet(None, None, f"the golden set could not be measured: {exc}")


class _ReferenceRunner:
    def __init__(self, path: Path) -> None:
        self._sess = session(path, reference=True)
        self._names = [o.name for o in self._sess.get_outputs()]

    def run(self, feed: dict[str, Any]) -> list[Any]:
        return list(self._sess.run(self._names, feed))


def _write_bundle(
    out_dir: Path,
    model_file: Path,
    tgt: Target,
    fields: dict[str, Any],
    key: KeyPair,
    overwrite: bool,
    extra: dict[str, bytes] | None = None,
) -> BundleManifest:
    """Sign in a staging dir beside ``out_dir`` (same filesystem), then rename it into place.

    ``extra``: further files of the bundle (the golden set), listed and signed after the model."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".staging", dir=out_dir.parent))
    try:
        os.chmod(staging, 0o755)  # mkdtemp makes it owner-only; a bundle is public data
        shutil.copyfile(model_file, staging / tgt.model_file)
        for name, data in (extra or {}).items():
            (staging / name).write_bytes(data)
        manifest = sign_bundle(staging, fields, [tgt.model_file, *(extra or {})], key)
        if overwrite and out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest
