"""Finish what ai-edge-quantizer 0.10 leaves in a full-int8 TFLite file (each step measured).

- **PRELU stays float.** The quantizer has no PRELU policy, so each PRELU runs
  as ``DEQUANTIZE -> PRELU(float, float alpha) -> QUANTIZE``: two extra ops and
  a float alpha per PRELU, and an int8-only NPU (Ethos-U) has to run all three
  on the CPU (hand_recrop: 39 of 87 ops). TFLite has an int8 PRELU kernel
  (input, alpha and output int8, per-tensor) and Vela maps an int8 PRELU to the
  NPU (``convert_prelu``: LeakyReLU, MUL+MAXIMUM or MIN/MUL/RELU/ADD depending
  on alpha). ``quantize_prelu`` rewrites each such triple into one int8 PRELU:
  its input is the int8 tensor the DEQUANTIZE read, its output the int8 tensor
  the QUANTIZE wrote (whose range the quantizer calibrated on the PRELU's
  float output), alpha is quantized symmetric per tensor (int8, scale
  ``max|alpha| / 127``). The only new error is that of alpha's 8 bits and the
  integer kernel's rounding; the evaluation that follows measures it like any
  other. Done for int8-only NPUs only (see ``finish_int8``).
- **Long tensor names.** Keras/TF names (``model/conv2d_10/Conv2D;...``) are a
  few KB on small models. ``shorten_names`` renames the internal tensors
  ``t<index>``; the model's input and output tensors and the SignatureDef keep
  theirs (the device feeds and reads by those).
- **Repeated quantization vectors.** TFLite stores per-channel quantization as
  a float32 scale and an int64 zero point per channel for every weight and
  bias tensor; the zero points of symmetric int8 weights are all 0, so most
  of those vectors are equal. FlatBuffers lets any number of tables point at
  the same vector (offsets are plain references), so ``write_deduplicated``
  writes each distinct numeric vector once (zero points, scales, shapes,
  operator input/output lists). Buffer *data* is left alone. hand_recrop:
  69.3 -> 56.9 KB (CPU), 66.8 -> 54.1 KB (Ethos-U); LiteRT outputs are
  bit-identical and Vela's output file is byte-identical.

- **Channel padding costs Ethos-U flash.** hand_recrop widens its residual
  branches with ``PAD`` on the channel axis only (64x64x8 -> 64x64x16 and two
  more). Vela 5.2 (its C++ core, ``RewritePad``) lowers such a PAD into a copy
  plus a fill whose source is a constant of the whole padded block
  (H x W x padded channels) in flash: 56 KiB of hand_recrop's 89.6 KiB of flash
  for 25.6 KiB of encoded weights. ``channel_pads_to_conv`` rewrites each
  channel-only PAD into a 1x1 ``CONV_2D`` with identity weights (1 on the
  diagonal, 0 for the new channels, weight scale 1 per tensor, bias 0): the requantization
  multiplier is exactly 1 and the new channels come out as the zero point,
  which is what PAD writes, so the outputs are bit-identical on LiteRT. Flash
  89.6 -> 34.8 KiB, the Vela file 101.7 -> 45.7 KB, estimated cycles -3%.
  Ethos-U only (the CPU runs PAD as a copy).

All work on the flatbuffer object model of ``ai_edge_litert`` like
``compiler.tflite_prep``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import flatbuffers
import numpy as np

from compiler.tflite_prep import (
    _drop_unused_tensors,
    drop_unused_buffers_of,
    op_names,
    opcode,
    read_tflite,
    schema,
)


@dataclass
class TFLitePost:
    """What the post-quantization passes changed (goes into the report's ``method``)."""

    prelu_quantized: int = 0
    pads_to_conv: int = 0
    names_shortened: int = 0
    vectors_shared: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "prelu_quantized": self.prelu_quantized,
            "pads_to_conv": self.pads_to_conv,
            "names_shortened": self.names_shortened,
            "vectors_shared": self.vectors_shared,
            "bytes_before": self.bytes_before,
            "bytes_after": self.bytes_after,
            "notes": list(self.notes),
        }


def _consumers(sg: Any) -> dict[int, list[Any]]:
    users: dict[int, list[Any]] = {}
    for op in sg.operators or []:
        for i in op.inputs:
            if i >= 0:
                users.setdefault(i, []).append(op)
    return users


def _const_values(model: Any, tensor: Any, dtype: str) -> np.ndarray | None:
    if not tensor.buffer:
        return None
    data = model.buffers[tensor.buffer].data
    if data is None or not len(data):
        return None
    return np.frombuffer(bytes(data), dtype=dtype)


def quantize_prelu(model: Any) -> int:
    """Rewrite ``DEQUANTIZE -> float PRELU -> QUANTIZE`` into an int8 PRELU; returns how many."""
    s = schema()
    names = op_names()
    sg = model.subgraphs[0]
    codes = {names.get(opcode(c)): i for i, c in enumerate(model.operatorCodes)}
    if "PRELU" not in codes:
        return 0
    producer = {o: op for op in sg.operators or [] for o in op.outputs}
    users = _consumers(sg)
    outputs = set(sg.outputs or [])
    int8 = s.TensorType.INT8
    drop: set[int] = set()  # id() of ops to remove
    done = 0
    for op in list(sg.operators or []):
        if names.get(opcode(model.operatorCodes[op.opcodeIndex])) != "PRELU" or len(op.inputs) != 2:
            continue
        x_float, alpha_index = op.inputs
        y_float = op.outputs[0]
        deq = producer.get(x_float)
        after = users.get(y_float, [])
        if (
            deq is None
            or names.get(opcode(model.operatorCodes[deq.opcodeIndex])) != "DEQUANTIZE"
            or len(after) != 1
            or y_float in outputs
            or names.get(opcode(model.operatorCodes[after[0].opcodeIndex])) != "QUANTIZE"
        ):
            continue
        quant = after[0]
        x_int8, y_int8 = deq.inputs[0], quant.outputs[0]
        if sg.tensors[x_int8].type != int8 or sg.tensors[y_int8].type != int8:
            continue
        alpha = sg.tensors[alpha_index]
        values = _const_values(model, alpha, "<f4") if alpha.type == s.TensorType.FLOAT32 else None
        if values is None or not np.isfinite(values).all():
            continue
        bound = float(np.abs(values).max())
        scale = bound / 127.0 if bound > 0 else 1.0
        q_values = np.clip(np.round(values / scale), -127, 127).astype(np.int8).reshape(list(alpha.shape))
        name = (alpha.name or b"alpha") + b"_int8" if isinstance(alpha.name, bytes) else "alpha_int8"
        op.inputs = [x_int8, _const_tensor(model, sg, q_values, int8, [scale], name)]
        op.outputs = [y_int8]
        drop.add(id(quant))
        if users.get(x_float) == [op] and x_float not in outputs:
            drop.add(id(deq))
        done += 1
    if done:
        sg.operators = [op for op in sg.operators if id(op) not in drop]
        _drop_unused_tensors(model)
    return done


def _opcode_index(model: Any, builtin: int) -> int:
    """Index of ``builtin`` in the model's operator codes, appended when the model has none."""
    for i, code in enumerate(model.operatorCodes):
        if opcode(code) == builtin:
            return i
    s = schema()
    code = s.OperatorCodeT()
    code.builtinCode = builtin
    code.deprecatedBuiltinCode = min(builtin, 127)
    code.version = 1
    model.operatorCodes.append(code)
    return len(model.operatorCodes) - 1


def _same_quantization(a: Any, b: Any) -> bool:
    qa, qb = a.quantization, b.quantization
    if qa is None or qb is None or qa.scale is None or qb.scale is None:
        return False
    return (
        len(qa.scale) == len(qb.scale) == 1
        and np.float32(qa.scale[0]) == np.float32(qb.scale[0])
        and list(qa.zeroPoint) == list(qb.zeroPoint)
    )


def _const_tensor(
    model: Any,
    sg: Any,
    values: np.ndarray,
    tensor_type: int,
    scales: list[float],
    name: str | bytes | None = None,
) -> int:
    """Append a constant tensor (own buffer, symmetric quantization by ``scales``); returns its index."""
    s = schema()
    buffer = s.BufferT()
    buffer.data = np.frombuffer(values.tobytes(), dtype=np.uint8).copy()
    model.buffers.append(buffer)
    tensor = s.TensorT()
    tensor.shape = list(values.shape)
    tensor.type = tensor_type
    tensor.name = name
    tensor.buffer = len(model.buffers) - 1
    quant = s.QuantizationParametersT()
    quant.scale = np.asarray(scales, dtype=np.float32)
    quant.zeroPoint = np.zeros(len(scales), dtype=np.int64)
    quant.quantizedDimension = 0
    tensor.quantization = quant
    sg.tensors.append(tensor)
    return len(sg.tensors) - 1


def channel_pads_to_conv(model: Any) -> int:
    """Rewrite int8 PADs that only append channels into identity 1x1 CONV_2Ds; returns how many.

    Only when the PAD is exact as a convolution: rank-4 NHWC int8, constant paddings that are all
    zero except after the last axis, input and output with the same per-tensor scale and zero point
    (a PAD never requantizes; its new values are the zero point). And only when it saves bytes: the
    identity weights (C_in x C_out) must be smaller than the block Vela would keep (H x W x new
    channels); late, narrow maps with many channels keep their PAD (the face detector: 4 of 11).
    """
    s = schema()
    names = op_names()
    sg = model.subgraphs[0]
    int8 = s.TensorType.INT8
    done = 0
    for op in sg.operators or []:
        if names.get(opcode(model.operatorCodes[op.opcodeIndex])) != "PAD" or len(op.inputs) != 2:
            continue
        x, y = sg.tensors[op.inputs[0]], sg.tensors[op.outputs[0]]
        pads = _const_values(model, sg.tensors[op.inputs[1]], "<i4")
        if (
            pads is None
            or pads.size != 8
            or x.type != int8
            or y.type != int8
            or len(x.shape) != 4
            or not _same_quantization(x, y)
        ):
            continue
        pads = pads.reshape(4, 2)
        if pads[:3].any() or pads[3, 0] != 0 or pads[3, 1] <= 0:
            continue
        cin, cout = int(x.shape[3]), int(x.shape[3] + pads[3, 1])
        if int(x.shape[1]) * int(x.shape[2]) * int(pads[3, 1]) <= cin * cout:
            continue  # Vela's fill constant (H x W x new channels) is smaller than the identity weights
        weights = np.zeros((cout, 1, 1, cin), dtype=np.int8)
        weights[np.arange(cin), 0, 0, np.arange(cin)] = 1
        x_scale = float(np.float32(x.quantization.scale[0]))
        # Per-tensor scales: every output channel has the same multiplier (1), so one value each.
        w_index = _const_tensor(model, sg, weights, int8, [1.0])
        b_index = _const_tensor(model, sg, np.zeros(cout, dtype=np.int32), s.TensorType.INT32, [x_scale])
        options = s.Conv2DOptionsT()
        options.padding = s.Padding.VALID
        options.strideW = options.strideH = 1
        options.dilationWFactor = options.dilationHFactor = 1
        options.fusedActivationFunction = s.ActivationFunctionType.NONE
        op.opcodeIndex = _opcode_index(model, s.BuiltinOperator.CONV_2D)
        op.inputs = [op.inputs[0], w_index, b_index]
        op.builtinOptionsType = s.BuiltinOptions.Conv2DOptions
        op.builtinOptions = options
        done += 1
    if done:
        _drop_unused_tensors(model)
    return done


def shorten_names(model: Any) -> int:
    """Rename internal tensors ``t<index>`` (inputs and outputs keep their names); returns how many."""
    sg = model.subgraphs[0]
    keep = set(sg.inputs or []) | set(sg.outputs or [])
    renamed = 0
    for index, tensor in enumerate(sg.tensors):
        short = f"t{index}"
        name = tensor.name.decode() if isinstance(tensor.name, bytes) else tensor.name
        if index not in keep and name != short and len(name or "") > len(short):
            tensor.name = short
            renamed += 1
    return renamed


class _SharingBuilder(flatbuffers.Builder):
    """A ``flatbuffers.Builder`` that writes each distinct numeric vector once and reuses its offset.

    A flatbuffer offset is a plain forward reference, so several tables may point at one vector
    (``Builder.CreateSharedString`` does the same for strings). ``uint8`` vectors (buffer data) are
    not shared: each constant keeps its own bytes.
    """

    def __init__(self, size: int) -> None:
        super().__init__(size)
        self._seen: dict[tuple[str, bytes], int] = {}
        self.shared = 0

    def CreateNumpyVector(self, x: np.ndarray) -> int:  # flatbuffers' method name
        if x.dtype == np.uint8:
            return int(super().CreateNumpyVector(x))
        key = (x.dtype.str, x.tobytes())
        offset = self._seen.get(key)
        if offset is None:
            offset = self._seen[key] = int(super().CreateNumpyVector(x))
        else:
            self.shared += 1
        return offset


QUANT_FIELDS = (("scale", np.float32), ("zeroPoint", np.int64), ("min", np.float32), ("max", np.float32))


def quantization_vectors(model: Any) -> Iterator[tuple[Any, str, np.ndarray]]:
    """Every non-empty quantization vector as (its QuantizationParameters, field name, numpy array)."""
    for sg in model.subgraphs or []:
        for tensor in sg.tensors or []:
            quant = tensor.quantization
            if quant is None:
                continue
            for name, dtype in QUANT_FIELDS:
                value = getattr(quant, name)
                if value is not None and len(value):
                    yield quant, name, np.asarray(value, dtype=dtype)


def write_deduplicated(model: Any) -> tuple[bytes, int]:
    """Serialize like ``write_tflite`` but with equal numeric vectors stored once; returns (bytes, shared).

    Quantization vectors given as Python lists (``quantize_prelu``'s alpha) are made numpy arrays
    first so they go through the same path.
    """
    for quant, name, vector in list(quantization_vectors(model)):
        setattr(quant, name, vector)
    builder = _SharingBuilder(1024)
    builder.Finish(model.Pack(builder), file_identifier=b"TFL3")
    return bytes(builder.Output()), builder.shared


def finish_int8(data: bytes, npu: bool) -> tuple[bytes, TFLitePost]:
    """Apply the passes to the quantizer's output; returns the new bytes and what was done.

    ``npu``: for int8-only accelerators (Ethos-U), PRELU is made int8 and channel PADs become
    convolutions. On a CPU, LiteRT's XNNPACK delegate runs
    the float PRELU with its QUANTIZE/DEQUANTIZE inside one delegated graph but has no int8 PRELU, so
    the rewrite splits the graph at every PRELU onto the builtin kernel: hand_recrop 2.7 -> 4.5 ms on
    this host for 5 KB less. There the float PRELU stays.
    """
    info = TFLitePost(bytes_before=len(data))
    model = read_tflite(data)
    info.prelu_quantized = quantize_prelu(model) if npu else 0
    info.pads_to_conv = channel_pads_to_conv(model) if npu else 0
    if info.pads_to_conv:
        info.notes.append(
            f"{info.pads_to_conv} channel-only PAD rewritten to identity 1x1 CONV_2D "
            "(Vela would store the padded block as a constant in flash)"
        )
    if not npu:
        info.notes.append("PRELU left float for the CPU (XNNPACK runs it; it has no int8 PRELU)")
    if info.prelu_quantized:
        info.notes.append(
            f"{info.prelu_quantized} DEQUANTIZE->PRELU(float)->QUANTIZE rewritten to int8 PRELU "
            "(alpha int8 per tensor)"
        )
    info.names_shortened = shorten_names(model)
    drop_unused_buffers_of(model)  # on the parsed model: no write and parse again in between
    out, info.vectors_shared = write_deduplicated(model)
    if info.vectors_shared:
        info.notes.append(f"{info.vectors_shared} repeated quantization/shape vectors stored once")
    info.bytes_after = len(out)
    return out, info
