"""Make a float TFLite file digestible for ai-edge-quantizer 0.10 (workarounds, each measured).

Real float TFLite files (all MediaPipe models) break the quantizer in three
ways, all fixed here on the flatbuffer object model that ``ai_edge_litert``
ships, before the quantizer sees the file:

- **old schema**: files written before schema v3a keep the op in
  ``OperatorCode.deprecatedBuiltinCode`` and leave ``builtinCode`` at 0
  (ADD). The quantizer reads only ``builtinCode``, so such a graph looks like
  all-ADD and comes out broken. We set ``builtinCode = max(builtinCode,
  deprecatedBuiltinCode)`` (the rule TFLite's own readers use).
- **fp16 weights**: ``DEQUANTIZE(fp16 constant)`` feeding a float op makes the
  quantizer fail; we fold each such op into an fp32 constant (same values,
  the model computes exactly what it did).
- **no SignatureDef**: the quantizer's calibrator runs signatures only; we
  add ``serving_default`` naming the subgraph's inputs and outputs.

``prepare_tflite`` returns the prepared bytes and notes for the report.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import InvalidModel

SIGNATURE_KEY = "serving_default"
TFLITE_MAGIC = b"TFL3"


@dataclass
class TFLitePrep:
    """What ``prepare_tflite`` changed (goes into the report's ``method``)."""

    opcodes_fixed: int = 0
    fp16_constants_folded: int = 0
    signature_added: bool = False
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "old_schema_opcodes_fixed": self.opcodes_fixed,
            "fp16_constants_folded": self.fp16_constants_folded,
            "signature_added": self.signature_added,
            "notes": list(self.notes),
        }


def schema() -> Any:
    from ai_edge_litert import schema_py_generated

    return schema_py_generated


def op_names() -> dict[int, str]:
    """BuiltinOperator code -> name (``CONV_2D``...)."""
    return {v: k for k, v in vars(schema().BuiltinOperator).items() if not k.startswith("_")}


def opcode(code: Any) -> int:
    return int(max(code.builtinCode, code.deprecatedBuiltinCode))


def read_tflite(data: bytes, source: Path | str = "model") -> Any:
    """Parse into the mutable object model; anything that is not a TFLite flatbuffer is ``InvalidModel``."""
    from ai_edge_litert.tools import flatbuffer_utils

    if len(data) < 8 or data[4:8] != TFLITE_MAGIC:
        raise InvalidModel(f"{source}: not a TFLite flatbuffer (no 'TFL3' identifier)")
    try:
        model = flatbuffer_utils.read_model_from_bytearray(bytearray(data))
    except Exception as exc:  # flatbuffers raises struct.error/IndexError/... on corrupt input
        raise InvalidModel(f"{source}: corrupt TFLite file ({type(exc).__name__}: {exc})") from exc
    if not model.subgraphs or not model.subgraphs[0].operators:
        raise InvalidModel(f"{source}: the TFLite model has no operators")
    return model


def write_tflite(model: Any) -> bytes:
    from ai_edge_litert.tools import flatbuffer_utils

    return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def op_histogram(model: Any) -> dict[str, int]:
    """Op name -> count over all subgraphs (custom ops as ``CUSTOM:<name>``)."""
    names = op_names()
    counts: dict[str, int] = {}
    for sg in model.subgraphs:
        for op in sg.operators or []:
            code = model.operatorCodes[op.opcodeIndex]
            name = names.get(opcode(code), str(opcode(code)))
            if name == "CUSTOM":
                custom = code.customCode
                name = f"CUSTOM:{custom.decode() if isinstance(custom, bytes) else custom}"
            counts[name] = counts.get(name, 0) + 1
    return dict(sorted(counts.items()))


def fix_opcodes(model: Any) -> int:
    fixed = 0
    for code in model.operatorCodes:
        best = opcode(code)
        if code.builtinCode != best:
            code.builtinCode = best
            fixed += 1
    return fixed


def fold_fp16_dequantize(model: Any) -> int:
    """Replace DEQUANTIZE(fp16 constant) by an fp32 constant; returns how many were folded."""
    s = schema()
    folded = 0
    for sg in model.subgraphs:
        keep = []
        for op in sg.operators or []:
            code = opcode(model.operatorCodes[op.opcodeIndex])
            if code == s.BuiltinOperator.DEQUANTIZE and len(op.inputs) == 1:
                src, dst = sg.tensors[op.inputs[0]], sg.tensors[op.outputs[0]]
                data = model.buffers[src.buffer].data if src.buffer else None
                if src.type == s.TensorType.FLOAT16 and data is not None and len(data):
                    values = np.frombuffer(bytes(data), dtype="<f2").astype("<f4")
                    buffer = s.BufferT()
                    buffer.data = np.frombuffer(values.tobytes(), dtype=np.uint8)
                    model.buffers.append(buffer)
                    dst.buffer = len(model.buffers) - 1
                    folded += 1
                    continue
            keep.append(op)
        sg.operators = keep
    if folded:
        _drop_unused_tensors(model)
    return folded


def _drop_unused_tensors(model: Any) -> None:
    """Remove tensors no op, input or output references (the folded fp16 sources) and reindex.

    SignatureDefs name their tensors by index, so they are reindexed too (their tensors are the
    subgraph's inputs and outputs, which always stay).
    """
    for index, sg in enumerate(model.subgraphs):
        used: set[int] = set(sg.inputs or []) | set(sg.outputs or [])
        for op in sg.operators or []:
            used |= {i for i in op.inputs if i >= 0} | set(op.outputs)
            used |= set(op.intermediates or [])
        order = sorted(used)
        remap = {old: new for new, old in enumerate(order)}
        sg.tensors = [sg.tensors[i] for i in order]
        sg.inputs = [remap[i] for i in sg.inputs]
        sg.outputs = [remap[i] for i in sg.outputs]
        for op in sg.operators or []:
            op.inputs = [remap[i] if i >= 0 else i for i in op.inputs]
            op.outputs = [remap[i] for i in op.outputs]
            if op.intermediates:
                op.intermediates = [remap[i] for i in op.intermediates]
        for sig in model.signatureDefs or []:
            if sig.subgraphIndex == index:
                for entry in (*(sig.inputs or []), *(sig.outputs or [])):
                    entry.tensorIndex = remap[entry.tensorIndex]


def add_signature(model: Any) -> bool:
    if model.signatureDefs:
        return False
    s = schema()
    sg = model.subgraphs[0]

    def tensor_map(index: int) -> Any:
        tm = s.TensorMapT()
        name = sg.tensors[index].name
        tm.name = name.decode() if isinstance(name, bytes) else name
        tm.tensorIndex = index
        return tm

    sig = s.SignatureDefT()
    sig.signatureKey = SIGNATURE_KEY
    sig.subgraphIndex = 0
    sig.inputs = [tensor_map(i) for i in sg.inputs]
    sig.outputs = [tensor_map(i) for i in sg.outputs]
    model.signatureDefs = [sig]
    return True


def prepare_tflite(data: bytes, source: Path | str = "model") -> tuple[bytes, TFLitePrep]:
    """Apply the three workarounds; returns the bytes to quantize and what was done."""
    model = read_tflite(data, source)
    if len(model.subgraphs) != 1:
        raise InvalidModel(
            f"{source}: {len(model.subgraphs)} subgraphs; only single-graph models are supported"
        )
    info = TFLitePrep()
    info.opcodes_fixed = fix_opcodes(model)
    if info.opcodes_fixed:
        info.notes.append(
            f"old-schema file: {info.opcodes_fixed} operator codes taken from deprecatedBuiltinCode"
        )
    # Folding reindexes the tensors; ``_drop_unused_tensors`` reindexes existing SignatureDefs with them.
    info.fp16_constants_folded = fold_fp16_dequantize(model)
    if info.fp16_constants_folded:
        info.notes.append(
            f"{info.fp16_constants_folded} DEQUANTIZE(fp16 constant) ops folded to fp32 constants"
        )
    info.signature_added = add_signature(model)
    return write_tflite(model), info


def drop_unused_buffers(data: bytes) -> bytes:
    """Remove buffers no tensor or metadata entry references.

    ai-edge-quantizer 0.10 leaves the float weights it replaced in the file
    (face_detection_short_range: 312 KB of buffers, 108 KB referenced), which
    would make the int8 model bigger than it is. Buffer 0 stays (the empty
    sentinel every schema reader expects).
    """
    model = read_tflite(data)
    return write_tflite(model) if drop_unused_buffers_of(model) else data


def drop_unused_buffers_of(model: Any) -> bool:
    """``drop_unused_buffers`` on a parsed model, in place; whether any buffer went."""
    used = {0} | {t.buffer for sg in model.subgraphs for t in sg.tensors or []}
    used |= {m.buffer for m in model.metadata or []}
    order = sorted(i for i in used if i < len(model.buffers))
    if len(order) == len(model.buffers):
        return False
    remap = {old: new for new, old in enumerate(order)}
    model.buffers = [model.buffers[i] for i in order]
    for sg in model.subgraphs:
        for t in sg.tensors or []:
            t.buffer = remap[t.buffer]
    for m in model.metadata or []:
        m.buffer = remap[m.buffer]
    return True
