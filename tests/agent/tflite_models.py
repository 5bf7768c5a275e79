"""Build small real .tflite models without TensorFlow, from LiteRT's bundled flatbuffer schema.

``ai_edge_litert.schema_py_generated`` carries the TFLite schema's object API,
so a FULLY_CONNECTED float model (input [1,64] -> scores [1,10]) is a few
tables and two buffers; LiteRT then loads and runs it like any converted model.
"""

from __future__ import annotations

from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema


def _tensor(shape: list[int], buffer: int, name: str) -> schema.TensorT:
    t = schema.TensorT()
    t.shape = shape
    t.type = schema.TensorType.FLOAT32
    t.buffer = buffer
    t.name = name
    return t


def make_tflite(path: Path, seed: int = 0, nan: bool = False) -> Path:
    """input float [1,64] -> FULLY_CONNECTED(W [10,64], b [10]) -> "scores" [1,10]."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((10, 64)).astype(np.float32)
    if nan:
        w[0, 0] = np.nan
    b = np.zeros(10, dtype=np.float32)
    buffers = []
    for data in (None, w, b, None, None):
        buf = schema.BufferT()
        if data is not None:
            buf.data = np.frombuffer(data.tobytes(), dtype=np.uint8)
        buffers.append(buf)
    op_code = schema.OperatorCodeT()
    op_code.builtinCode = schema.BuiltinOperator.FULLY_CONNECTED
    op_code.deprecatedBuiltinCode = schema.BuiltinOperator.FULLY_CONNECTED
    op_code.version = 1
    op = schema.OperatorT()
    op.opcodeIndex = 0
    op.inputs = [0, 1, 2]
    op.outputs = [3]
    op.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
    op.builtinOptions = schema.FullyConnectedOptionsT()
    sub = schema.SubGraphT()
    sub.tensors = [
        _tensor([1, 64], 3, "input"),
        _tensor([10, 64], 1, "W"),
        _tensor([10], 2, "b"),
        _tensor([1, 10], 4, "scores"),
    ]
    sub.inputs, sub.outputs, sub.operators, sub.name = [0], [3], [op], "main"
    model = schema.ModelT()
    model.version = 3
    model.operatorCodes = [op_code]
    model.subgraphs = [sub]
    model.buffers = buffers
    model.description = f"edgefleet test fc seed {seed}"
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(builder.Output()))
    return path
