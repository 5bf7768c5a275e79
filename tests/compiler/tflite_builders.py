"""Small float TFLite models shaped like converter output, built without TensorFlow.

``ai_edge_litert.schema_py_generated`` carries the TFLite schema's object API.
The models here look like what ``tf.lite.TFLiteConverter`` writes for a Keras
model: tensor names ``serving_default_<key>:0`` / ``StatefulPartitionedCall:0``
and a SignatureDef whose keys (``x``, ``output_0``) differ from those names,
optionally with fp16 weights behind a DEQUANTIZE (``optimizations=DEFAULT`` with
``supported_types=[float16]``).
"""

from __future__ import annotations

from pathlib import Path

import flatbuffers
import numpy as np
from ai_edge_litert import schema_py_generated as schema


def _tensor(
    shape: list[int], buffer: int, name: str, dtype: int = schema.TensorType.FLOAT32
) -> schema.TensorT:
    t = schema.TensorT()
    t.shape = shape
    t.type = dtype
    t.buffer = buffer
    t.name = name
    return t


def _buffer(data: np.ndarray | None) -> schema.BufferT:
    buf = schema.BufferT()
    if data is not None:
        buf.data = np.frombuffer(data.tobytes(), dtype=np.uint8)
    return buf


def _opcode(code: int) -> schema.OperatorCodeT:
    op_code = schema.OperatorCodeT()
    op_code.builtinCode = code
    op_code.deprecatedBuiltinCode = min(code, 127)
    op_code.version = 1
    return op_code


def make_signature_tflite(
    path: Path, *, features: int = 16, outputs: int = 4, fp16: bool = False, seed: int = 0
) -> Path:
    """x [1, features] -> FULLY_CONNECTED -> [1, outputs], with a converter-style SignatureDef.

    ``fp16``: the weights are an fp16 constant behind a DEQUANTIZE, as TFLite's fp16 export writes them.
    """
    rng = np.random.default_rng(seed)
    w = rng.normal(0, 0.5, (outputs, features)).astype(np.float32)
    b = rng.normal(0, 0.1, outputs).astype(np.float32)
    fc = schema.OperatorT()
    fc.opcodeIndex = 0
    fc.outputs = [3]
    fc.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
    fc.builtinOptions = schema.FullyConnectedOptionsT()
    tensors = [
        _tensor([1, features], 0, "serving_default_x:0"),
        _tensor([outputs, features], 0 if fp16 else 1, "dense/MatMul"),
        _tensor([outputs], 2, "dense/BiasAdd"),
        _tensor([1, outputs], 0, "StatefulPartitionedCall:0"),
    ]
    buffers = [_buffer(None), _buffer(None if fp16 else w), _buffer(b)]
    codes = [_opcode(schema.BuiltinOperator.FULLY_CONNECTED)]
    operators = [fc]
    fc.inputs = [0, 1, 2]
    if fp16:
        tensors.append(_tensor([outputs, features], 3, "dense/MatMul_fp16", schema.TensorType.FLOAT16))
        buffers.append(_buffer(w.astype(np.float16)))
        codes.append(_opcode(schema.BuiltinOperator.DEQUANTIZE))
        deq = schema.OperatorT()
        deq.opcodeIndex = 1
        deq.inputs, deq.outputs = [4], [1]
        operators.insert(0, deq)
    sub = schema.SubGraphT()
    sub.tensors, sub.inputs, sub.outputs, sub.operators, sub.name = tensors, [0], [3], operators, "main"

    def entry(name: str, index: int) -> schema.TensorMapT:
        tm = schema.TensorMapT()
        tm.name, tm.tensorIndex = name, index
        return tm

    sig = schema.SignatureDefT()
    sig.signatureKey, sig.subgraphIndex = "serving_default", 0
    sig.inputs, sig.outputs = [entry("x", 0)], [entry("output_0", 3)]
    model = schema.ModelT()
    model.version = 3
    model.operatorCodes = codes
    model.subgraphs = [sub]
    model.buffers = buffers
    model.signatureDefs = [sig]
    model.description = "MLIR Converted."
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(bytes(builder.Output()))
    return path


def make_outlier_tflite(path: Path) -> Path:
    """x [1, 16] -> FULLY_CONNECTED "expand" -> ADD "shift" (one channel +1000) -> FULLY_CONNECTED
    "project" -> [1, 4]; "project" ignores the shifted channel. With 8-bit activations the small
    channels of "shift" round to steps of ~4: the TFLite twin of the ONNX outlier model."""
    rng = np.random.default_rng(0)
    w1 = rng.normal(0, 0.3, (8, 16)).astype(np.float32)
    offset = np.zeros(8, np.float32)
    offset[0] = 1000.0
    w2 = rng.normal(0, 0.5, (4, 8)).astype(np.float32)
    w2[:, 0] = 0
    tensors = [
        _tensor([1, 16], 0, "x"),
        _tensor([8, 16], 1, "w1"),
        _tensor([8], 2, "b1"),
        _tensor([1, 8], 0, "expand"),
        _tensor([8], 3, "offset"),
        _tensor([1, 8], 0, "shift"),
        _tensor([4, 8], 4, "w2"),
        _tensor([4], 5, "b2"),
        _tensor([1, 4], 0, "project"),
    ]
    buffers = [_buffer(None), _buffer(w1), _buffer(np.zeros(8, np.float32)), _buffer(offset)]
    buffers += [_buffer(w2), _buffer(np.zeros(4, np.float32))]
    codes = [_opcode(schema.BuiltinOperator.FULLY_CONNECTED), _opcode(schema.BuiltinOperator.ADD)]

    def op(code: int, inputs: list[int], output: int) -> schema.OperatorT:
        o = schema.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = code, inputs, [output]
        if code == 0:
            o.builtinOptionsType = schema.BuiltinOptions.FullyConnectedOptions
            o.builtinOptions = schema.FullyConnectedOptionsT()
        else:
            o.builtinOptionsType = schema.BuiltinOptions.AddOptions
            o.builtinOptions = schema.AddOptionsT()
        return o

    sub = schema.SubGraphT()
    sub.tensors, sub.inputs, sub.outputs, sub.name = tensors, [0], [8], "main"
    sub.operators = [op(0, [0, 1, 2], 3), op(1, [3, 4], 5), op(0, [5, 6, 7], 8)]
    model = schema.ModelT()
    model.version = 3
    model.operatorCodes = codes
    model.subgraphs = [sub]
    model.buffers = buffers
    builder = flatbuffers.Builder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    path.write_bytes(bytes(builder.Output()))
    return path
