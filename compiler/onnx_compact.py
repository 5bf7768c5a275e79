"""Strip what a QDQ int8 ONNX file carries besides the model: names, shape annotations, repeated parameters.

Why: onnxruntime's QDQ writer leaves a file far bigger than its int8 weights.
Measured on PaddleOCR's text-direction classifier (586 KB fp32): the QDQ file
was 334 KB (ratio 0.57), of which only ~127 KB are int8 weights and ~13 KB
int32 biases; the rest was ~100 KB of node and tensor names (every weight,
scale and zero-point tensor gets a 40-60 character name, 550 nodes),
~24 KB of ``value_info`` added by ``quant_pre_process``, and ~17 KB of
all-zero zero-point tensors (symmetric int8 weights, int32 biases, stored
raw). The QNN file (uint8 weights) has the same names and ``value_info``,
plus one zero-point tensor per weight (54 vectors, all 128) and per int32
bias (54 all-zero vectors, 16 KB). This is the ONNX analogue of ``strip``
on a binary:

- internal tensor names become short ids, the most used names the shortest
  (graph input and output names, the model's interface, stay); node names and
  empty doc strings are left out (onnxruntime's QNN EP names an unnamed node
  after its output);
- ``value_info`` is dropped (onnxruntime infers shapes when it loads);
- equal Q/DQ scales and zero points (same dtype, shape and bytes) become one
  initializer that the Q/DQ nodes share; every Q/DQ node and every input stays
  (what onnxruntime's ``ConstantSharing`` does for scalars when it loads);
- a ``DequantizeLinear`` of a constant whose zero point is all zeros loses the
  zero-point input, which the ONNX spec defines as 0: the same model. Only for
  DQ nodes feeding Conv, where onnxruntime still fuses to ``QLinearConv``
  (checked: the same 53 QLinearConv, bit-identical outputs); elsewhere
  (Gemm) the optional zero point blocked a fusion, so it stays. Not for QNN
  (``drop_zero_points=False``): its weights are asymmetric uint8 and sharing
  already brings the zero points down to a few distinct vectors.

The numbers stay the same (test ``test_onnx_compaction_is_bit_exact``: same
outputs bit for bit); the gate evaluates the compacted file, the one that ships.
"""

from __future__ import annotations

import itertools
import string
from collections import Counter
from pathlib import Path
from typing import Any

import onnx
from onnx import numpy_helper

ZP_DROP_CONSUMERS = frozenset({"Conv"})
ID_CHARS = string.digits + string.ascii_letters
QDQ_OPS = frozenset({"QuantizeLinear", "DequantizeLinear"})


def compact_qdq(path: Path, *, drop_zero_points: bool = True) -> dict[str, Any]:
    """Rewrite ``path`` in place; returns the bytes before/after and what was dropped (for the report)."""
    model = onnx.load(str(path))
    before = model.ByteSize()
    graph = model.graph
    if any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in graph.node
        for a in n.attribute
    ):
        # Subgraphs (If/Loop/Scan) refer to outer names; not worth the risk of renaming them.
        return {"bytes_before": before, "bytes_after": before, "skipped": "model has subgraphs"}
    dropped = _drop_zero_points(graph) if drop_zero_points else 0
    shared = _share_quant_params(graph)
    value_info = len(graph.value_info)
    del graph.value_info[:]
    _rename(graph)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return {
        "bytes_before": before,
        "bytes_after": Path(path).stat().st_size,
        "zero_points_dropped": dropped,
        "quant_params_shared": shared,
        "value_info_dropped": value_info,
        "names": "internal tensor/node names shortened; graph inputs/outputs kept",
    }


def _drop_zero_points(graph: onnx.GraphProto) -> int:
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, set[str]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, set()).add(node.op_type)
    dropped = 0
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or len(node.input) != 3:
            continue
        value, zero_point = node.input[0], node.input[2]
        if value not in inits or zero_point not in inits:
            continue
        if not consumers.get(node.output[0], set()) <= ZP_DROP_CONSUMERS:
            continue
        if numpy_helper.to_array(inits[zero_point]).any():
            continue
        del node.input[2]
        dropped += 1
    used = {name for node in graph.node for name in node.input}
    keep = [i for i in graph.initializer if i.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return dropped


def _share_quant_params(graph: onnx.GraphProto) -> int:
    """Point every Q/DQ scale or zero point at one initializer per distinct (dtype, shape, bytes).

    The quantizers write a fresh scale and zero-point tensor per node: a QNN
    model carries 54 per-channel uint8 weight zero-point vectors that are all
    128 and 54 all-zero int32 bias zero-point vectors, which differ only in
    length. Sharing them is what onnxruntime's ``ConstantSharing`` optimizer
    does for scalars at load time; the Q/DQ nodes, their count and their
    values stay exactly as they were (compared bit for bit, so -0.0 and NaN
    payloads are never merged with anything else). Only initializers used
    nowhere but as input 1 or 2 of a QuantizeLinear/DequantizeLinear are merged.
    """
    uses: dict[str, set[tuple[str, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, set()).add((node.op_type, index))
    interface = {v.name for v in graph.input} | {v.name for v in graph.output}
    canonical: dict[tuple[int, tuple[int, ...], bytes], str] = {}
    alias: dict[str, str] = {}
    for init in graph.initializer:
        used = uses.get(init.name)
        if not used or init.name in interface or not all(op in QDQ_OPS and i in (1, 2) for op, i in used):
            continue
        key = (init.data_type, tuple(init.dims), numpy_helper.to_array(init).tobytes())
        first = canonical.setdefault(key, init.name)
        if first != init.name:
            alias[init.name] = first
    if not alias:
        return 0
    for node in graph.node:
        node.input[:] = [alias.get(n, n) for n in node.input]
    keep = [i for i in graph.initializer if i.name not in alias]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    return len(alias)


def _rename(graph: onnx.GraphProto) -> None:
    """Give internal names the shortest ids, the most referenced names the shortest of all.

    Ids are drawn from ``[0-9a-zA-Z]`` (the characters the hex ids used, plus
    case): 62 one-character ids, then 3,844 of two. An id never equals a graph
    input or output name, which stay as they are.
    """
    interface = {v.name for v in graph.input} | {v.name for v in graph.output}
    refs: Counter[str] = Counter(i.name for i in graph.initializer)
    for node in graph.node:
        refs.update(n for n in (*node.input, *node.output) if n)
    ids = (
        "".join(chars)
        for length in itertools.count(1)
        for chars in itertools.product(ID_CHARS, repeat=length)
        if "".join(chars) not in interface
    )
    ranked = sorted((n for n in refs if n not in interface), key=lambda n: -refs[n])
    short = dict(zip(ranked, ids, strict=False))

    def rename(name: str) -> str:
        return short.get(name, name)

    # ONNX is proto2: a field set to "" is still written (2 bytes); ClearField leaves it out.
    for init in graph.initializer:
        init.name = rename(init.name)
        init.ClearField("doc_string")
    for node in graph.node:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        # onnxruntime's QNN EP names an unnamed node after its first output (qnn_utils GetNodeName).
        node.ClearField("name")
        node.ClearField("doc_string")
