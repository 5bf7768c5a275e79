"""Where the bytes of a model file go: constants, quantization parameters, structure.

The size ratio alone hides why a small model does not shrink 4x: int8 shrinks the
weights, but quantization adds per-channel scales and zero points, and the
format's tables (one per tensor, operator and buffer) do not shrink at all. On a
124 KB model those tables are a third of the int8 file. Splitting the file into
three parts lets the report say which part is left, and ``data_ratio`` (the
int8 file's constants and quantization parameters over the whole fp32 file) is
the ratio no rewrite of the tables can go below.

- ``constants``: weight, bias and other constant tensor data (TFLite buffers;
  ONNX initializers and ``Constant`` node tensors that are not Q/DQ parameters).
- ``quantization``: scale and zero-point values (TFLite ``QuantizationParameters``
  vectors, counted once per distinct vector since ``write_deduplicated`` stores
  them once; ONNX scale/zero-point inputs of QuantizeLinear/DequantizeLinear).
- ``structure``: everything else (tables, names, vector headers, padding).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

from compiler.tflite_post import quantization_vectors
from compiler.tflite_prep import read_tflite

_QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}


def _tflite_parts(data: bytes) -> tuple[int, int]:
    model = read_tflite(data)
    constants = sum(len(b.data) for b in model.buffers or [] if b.data is not None)
    distinct = {(name, vector.tobytes()) for _quant, name, vector in quantization_vectors(model)}
    return constants, sum(len(raw) for _name, raw in distinct)


def _tensor_bytes(tensor: onnx.TensorProto) -> int:
    return int(numpy_helper.to_array(tensor).nbytes)


def _onnx_parts(data: bytes) -> tuple[int, int]:
    model = onnx.load_model_from_string(data)
    graph = model.graph
    qdq_params = {
        name for node in graph.node if node.op_type in _QDQ_OPS for name in list(node.input)[1:3] if name
    }
    constants = quantization = 0
    for init in graph.initializer:
        if init.name in qdq_params:
            quantization += _tensor_bytes(init)
        else:
            constants += _tensor_bytes(init)
    for node in graph.node:
        if node.op_type != "Constant":
            continue
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                size = _tensor_bytes(attr.t)
                if node.output and node.output[0] in qdq_params:
                    quantization += size
                else:
                    constants += size
    return constants, quantization


def size_parts(model: Path | bytes, fmt: str) -> dict[str, int]:
    """``{"total", "constants", "quantization", "structure"}`` in bytes for an ONNX or TFLite model."""
    data = model if isinstance(model, bytes) else Path(model).read_bytes()
    constants, quantization = _tflite_parts(data) if fmt == "tflite" else _onnx_parts(data)
    return {
        "total": len(data),
        "constants": constants,
        "quantization": quantization,
        "structure": len(data) - constants - quantization,
    }


def size_breakdown(fp32: tuple[Path | bytes, str], int8: tuple[Path | bytes, str]) -> dict[str, Any]:
    """The ``report["size"]["parts"]`` entry: both files' parts and the int8 data-only ratio."""
    f, q = size_parts(*fp32), size_parts(*int8)
    return {
        "fp32": f,
        "int8": q,
        # The ratio if the int8 file held nothing but its numbers: the floor of any table rewrite.
        "data_ratio": round((q["constants"] + q["quantization"]) / f["total"], 3) if f["total"] else None,
    }


LARGE_MODEL_BYTES = 1_000_000  # from here on the weights dominate and 4x smaller is within reach
MAX_LARGE_RATIO = 0.35  # int8 file / fp32 file
MAX_OVERHEAD_RATIO = 1.25  # int8 file / its quantized data (constants + quantization parameters)


def size_target(fp32_bytes: int, int8_bytes: int, int8_data_bytes: int) -> dict[str, Any]:
    """The size target that applies to this model, its value and whether it is met.

    Over 1 MB the int8 file must be at most 0.35 of the fp32 file. Below, the format's own tables
    (one per tensor and operator, which quantization cannot shrink) are a large share of the file
    (hand_recrop: 10 KB of its 124 KB fp32 file, a floor of 0.39), so the target is the overhead the
    int8 file adds over its quantized numbers: file / (constants + quantization) <= 1.25.
    """
    if fp32_bytes > LARGE_MODEL_BYTES:
        value = int8_bytes / fp32_bytes if fp32_bytes else None
        rule, limit = "int8 / fp32 file (models over 1 MB)", MAX_LARGE_RATIO
    else:
        value = int8_bytes / int8_data_bytes if int8_data_bytes else None
        rule, limit = "int8 file / its quantized data (models up to 1 MB)", MAX_OVERHEAD_RATIO
    return {
        "rule": rule,
        "value": round(value, 3) if value is not None else None,
        "limit": limit,
        "met": value is not None and value <= limit,
    }
