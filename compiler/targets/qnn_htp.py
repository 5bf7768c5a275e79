"""``qnn-htp`` / ``qnn-htp-a16``: ONNX QDQ for onnxruntime's QNN EP on the Qualcomm Hexagon NPU.

``compiler.quantize.quantize_qnn`` builds the QDQ model with onnxruntime's own
``get_qnn_qdq_config`` (8- or 16-bit activations, 8-bit weights), so the
quantization is the one the QNN EP expects; op coverage uses the EP's HTP table.
"""

from __future__ import annotations

from compiler.build import BuildRequest, Built, OnnxQuantizeJob, build_onnx
from compiler.data import SamplesReader
from compiler.quantize import quantize_qnn
from compiler.targets.registry import QNN_QDQ, Family, Target, register_family, register_target


def build(req: BuildRequest) -> Built:
    activations = req.target.option("activations")

    def quantize(job: OnnxQuantizeJob) -> None:
        quantize_qnn(
            job.prepared, job.out, SamplesReader(job.calib, job.sig.inputs, job.batch), job.info, activations
        )

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
