"""``qnn-htp`` / ``qnn-htp-a16``: ONNX QDQ for onnxruntime's QNN EP on the Qualcomm Hexagon NPU.

``compiler.quantize.quantize_qnn`` builds the QDQ model with onnxruntime's own
``get_qnn_qdq_config`` (8- or 16-bit activations, 8-bit weights), so the
quantization is the one the QNN EP expects; op coverage uses the EP's HTP table.
When 8-bit activations miss the gate, ``qnn-htp`` searches 16-bit activations or
float for the few sensitive layers (``compiler.mixed_precision``), each candidate
quantized by the same QNN config with tensor overrides.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from compiler.build import BuildRequest, Built, OnnxQuantizeJob, build_onnx, mixed_precision_onnx
from compiler.data import SamplesReader
from compiler.quantize import QuantizeInfo, quantize_qnn
from compiler.targets.registry import QNN_QDQ, Family, Target, register_family, register_target


def build(req: BuildRequest) -> Built:
    activations = req.target.option("activations")

    def quantize(job: OnnxQuantizeJob) -> None:
        quantize_qnn(
            job.prepared, job.out, SamplesReader(job.calib, job.sig.inputs, job.batch), job.info, activations
        )
        if activations == "uint8":  # the a16 target is already all 16-bit
            scratch = QuantizeInfo(job.info.source_opset, job.info.opset)

            def make(
                prepared: Path, out: Path, floats: list[str], over: dict[str, Any], finish: bool
            ) -> None:
                reader = SamplesReader(job.calib, job.sig.inputs, job.batch)  # each candidate calibrates
                quantize_qnn(prepared, out, reader, scratch, activations, over, floats, finish=finish)

            mixed_precision_onnx(job, make)

    return build_onnx(req, "qnn", quantize)


FAMILY = register_family(
    Family(
        name=QNN_QDQ,
        accepts="onnx",
        emits="model.onnx",
        build=build,
        summary="ONNX QDQ by onnxruntime's QNN config for the Hexagon HTP",
    )
)

for _bits in ("8", "16"):
    register_target(
        Target(
            name="qnn-htp" if _bits == "8" else "qnn-htp-a16",
            backend=FAMILY.name,
            description=f"ONNX QDQ for onnxruntime's QNN EP on the Qualcomm Hexagon NPU (HTP), "
            f"{_bits}-bit activations, 8-bit weights",
            default_hardware_ids=("qcs6490", "qcs8550", "snapdragon-8-gen3"),
            runtime="onnxruntime-qnn",
            operator_domains=("", "ai.onnx", "com.microsoft"),
            options=(("activations", f"uint{_bits}"),),
        )
    )
