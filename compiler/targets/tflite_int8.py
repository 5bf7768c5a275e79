"""``tflite-int8``: full-integer TFLite (int8 in/out) by ai-edge-quantizer, run by LiteRT.

No TensorFlow: the model is read and rewritten with LiteRT's flatbuffer schema
(``compiler.tflite_prep`` / ``compiler.tflite_post``). PRELU stays float here
because XNNPACK runs it inside one delegated graph (see ``finish_int8``).
"""

from __future__ import annotations

from compiler.build import BuildRequest, Built, build_tflite_int8
from compiler.targets.registry import TFLITE_INT8, Family, Target, register_family, register_target


def build(req: BuildRequest) -> Built:
    return build_tflite_int8(req, npu=False)


FAMILY = register_family(
    Family(
        name=TFLITE_INT8,
        accepts="tflite",
        emits="model.tflite",
        build=build,
        summary="full-integer TFLite by ai-edge-quantizer for LiteRT",
    )
)

register_target(
    Target(
        name="tflite-int8",
        backend=FAMILY.name,
        description="full-integer TFLite (int8 in/out) by ai-edge-quantizer, run by LiteRT (ai-edge-litert)",
        default_hardware_ids=("rpi4", "rpi5", "generic-arm64", "android-arm64"),
        runtime="litert",
        operator_domains=(),
    )
)
