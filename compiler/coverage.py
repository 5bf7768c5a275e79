"""Which ops of a model a target's accelerator will not run, and why, checked before quantizing.

An op the accelerator cannot take still runs (on the CPU, or as a fallback
in onnxruntime), but it costs round trips and memory, so the user should know
before spending minutes on calibration. The lists are the vendors' own:
Vela's ``TFLiteSupportedOperators`` for Ethos-U, onnxruntime's QNN EP op
table for the Hexagon HTP. Known quantizer gaps the pipeline does not repair
are added (``TFLITE_LEFT_FLOAT``; PRELU, which ai-edge-quantizer 0.10 leaves
in float, is rewritten to int8 by ``compiler.tflite_post`` and Vela maps an
int8 PRELU to the NPU).
"""

from __future__ import annotations

from typing import Any

# onnxruntime QNN execution provider, HTP backend: ONNX ops it maps (onnxruntime 1.2x docs).
QNN_HTP_OPS = frozenset(
    [
        "Abs",
        "Add",
        "And",
        "ArgMax",
        "ArgMin",
        "AveragePool",
        "BatchNormalization",
        "Cast",
        "Ceil",
        "Clip",
        "Concat",
        "Conv",
        "ConvTranspose",
        "Cos",
        "DepthToSpace",
        "DequantizeLinear",
        "Div",
        "Elu",
        "Equal",
        "Exp",
        "Expand",
        "Flatten",
        "Floor",
        "Gather",
        "GatherElements",
        "Gelu",
        "Gemm",
        "GlobalAveragePool",
        "GlobalMaxPool",
        "Greater",
        "GreaterOrEqual",
        "GridSample",
        "HardSigmoid",
        "HardSwish",
        "InstanceNormalization",
        "LayerNormalization",
        "LeakyRelu",
        "Less",
        "LessOrEqual",
        "Log",
        "LogSoftmax",
        "LpNormalization",
        "LRN",
        "MatMul",
        "Max",
        "MaxPool",
        "Min",
        "Mul",
        "Neg",
        "Not",
        "Or",
        "Pad",
        "Pow",
        "PRelu",
        "QuantizeLinear",
        "ReduceMax",
        "ReduceMean",
        "ReduceMin",
        "ReduceProd",
        "ReduceSum",
        "Relu",
        "Reshape",
        "Resize",
        "Round",
        "Sigmoid",
        "Sign",
        "Sin",
        "Slice",
        "Softmax",
        "SpaceToDepth",
        "Split",
        "Sqrt",
        "Squeeze",
        "Sub",
        "Sum",
        "Tanh",
        "Tile",
        "TopK",
        "Transpose",
        "Unsqueeze",
        "Where",
    ]
)
# Ops that never reach the accelerator as ops: onnxruntime folds them into initializers at load
# (constant folding), so listing them as unsupported would bury the real gaps (PaddleOCR's detector
# has hundreds of Constant nodes).
FOLDED_AT_LOAD = frozenset(["Constant"])
# Ops the quantizer leaves in float and nothing repairs; an int8-only NPU then runs them on the CPU.
# (PRELU was one: ai-edge-quantizer 0.10 has no policy for it, compiler.tflite_post quantizes it.)
TFLITE_LEFT_FLOAT: dict[str, str] = {}


def onnx_coverage(op_types: dict[str, int], backend: str) -> dict[str, Any]:
    """Op histogram plus the ops the target's accelerator does not take (``unsupported``: op -> reason)."""
    unsupported: dict[str, str] = {}
    if backend == "qnn":
        for op in op_types:
            if op not in QNN_HTP_OPS and op not in FOLDED_AT_LOAD:
                unsupported[op] = "not in the QNN HTP op set; onnxruntime runs it on the CPU provider"
    return {"ops": dict(sorted(op_types.items())), "unsupported": unsupported}


def tflite_coverage(op_types: dict[str, int], npu: bool) -> dict[str, Any]:
    """For Ethos-U (``npu``): ops Vela will not place on the NPU, with the reason."""
    unsupported: dict[str, str] = {}
    for op in op_types:
        if op.startswith("CUSTOM:"):
            unsupported[op] = "custom op: LiteRT needs it registered; no NPU can run it"
    if npu:
        supported = vela_supported_ops()
        for op in op_types:
            if op in TFLITE_LEFT_FLOAT:
                unsupported[op] = TFLITE_LEFT_FLOAT[op]
            elif supported is not None and op not in supported and not op.startswith("CUSTOM:"):
                unsupported[op] = "not in Vela's supported operators; runs on the CPU (TFLite Micro)"
    return {"ops": dict(sorted(op_types.items())), "unsupported": unsupported}


def vela_supported_ops() -> set[str] | None:
    """TFLite builtin op names Vela can place on the NPU (None when Vela is not installed)."""
    try:
        from ethosu.vela.tflite_mapping import builtin_operator_map
        from ethosu.vela.tflite_supported_operators import TFLiteSupportedOperators
    except ImportError:
        return None
    from compiler.tflite_prep import op_names

    names = op_names()
    supported = TFLiteSupportedOperators.supported_operators
    return {
        names[code] for code, entry in builtin_operator_map.items() if entry[0] in supported and code in names
    }
