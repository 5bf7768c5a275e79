"""Compilation targets: the registry, and one module per target family that registers its targets.

- ``arm64_cpu``: ONNX static QDQ int8 for onnxruntime CPU/XNNPACK (``arm64-cpu``)
- ``qnn_htp``: ONNX QDQ for the Qualcomm HTP (``qnn-htp``, ``qnn-htp-a16``)
- ``tflite_int8``: full-integer TFLite for LiteRT (``tflite-int8``)
- ``ethos_u``: tflite-int8 through Vela (``ethos-u55-128`` ... ``ethos-u65-512``)

Each family module declares what it accepts and emits (``FAMILY``) and its
``build`` step; ``compiler.pipeline`` looks the target up and calls it.
"""

# Imported for their registrations (each module registers its family, then its targets).
from compiler.targets import arm64_cpu, ethos_u, qnn_htp, tflite_int8
from compiler.targets.registry import (
    ETHOS_U,
    ONNX_QDQ,
    QNN_QDQ,
    TFLITE_INT8,
    Family,
    Target,
    family_of,
    get_target,
    known_targets,
    register_family,
    register_target,
)

__all__ = [
    "ETHOS_U",
    "ONNX_QDQ",
    "QNN_QDQ",
    "TFLITE_INT8",
    "Family",
    "Target",
    "arm64_cpu",
    "ethos_u",
    "family_of",
    "get_target",
    "known_targets",
    "qnn_htp",
    "register_family",
    "register_target",
    "tflite_int8",
]
