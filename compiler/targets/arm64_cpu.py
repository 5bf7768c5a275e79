"""``arm64-cpu``: ONNX static QDQ int8 for onnxruntime's CPU/XNNPACK provider on 64-bit ARM.

U8S8 (uint8 activations, int8 per-channel weights) by default: onnxruntime's
ARM kernels are fastest on it. ``compiler.quantize.quantize_int8`` tries MinMax
and moving-average MinMax calibration and keeps whichever scores better on the
calibration samples, then compacts the file (``compiler.onnx_compact``).
"""

from __future__ import annotations

from compiler.build import (
    BuildRequest,
    Built,
    OnnxQuantizeJob,
    build_onnx,
    calibration_score,
    mixed_precision_onnx,
)
from compiler.data import SamplesReader
from compiler.quantize import quantize_int8
from compiler.targets.registry import ONNX_QDQ, Family, Target, register_family, register_target


def _quantize(job: OnnxQuantizeJob) -> None:
    quantize_int8(
        job.prepared,
        job.out,
        lambda: SamplesReader(job.calib, job.sig.inputs, batch_size=1),
        job.info,
        job.work,
        score=lambda candidate: calibration_score(job.source, candidate, job.sig, job.scoring_runs()),
    )
    mixed_precision_onnx(job)


def build(req: BuildRequest) -> Built:
    return build_onnx(req, "cpu", _quantize)


FAMILY = register_family(
    Family(
        name=ONNX_QDQ,
        accepts="onnx",
        emits="model.onnx",
        build=build,
        summary="ONNX static QDQ int8, per-channel weights, for onnxruntime CPU/XNNPACK",
    )
)

register_target(
    Target(
        name="arm64-cpu",
        backend=FAMILY.name,
        description="ONNX static QDQ int8 (U8S8, per-channel) for onnxruntime CPU/XNNPACK on 64-bit ARM",
        default_hardware_ids=("rpi4", "rpi5", "jetson-nano", "generic-arm64"),
        runtime="onnxruntime",
        # onnxruntime's CPU provider implements the standard, ONNX-ML and Microsoft contrib ops.
        operator_domains=("", "ai.onnx", "ai.onnx.ml", "com.microsoft"),
    )
)
