"""When all-8-bit misses the gate: the cheapest mix of 16-bit activations or float layers that passes.

Measured, not guessed, and bounded:

1. **Sensitivity** (``layer_sensitivity``): the float model and the all-8-bit
   QDQ model run side by side on a few calibration samples, every quantized
   activation exposed. For each tensor the relative noise
   ``|q - f|^2 / |f|^2`` after its Q/DQ is accumulated; a node's *added
   error* is its output's noise minus the worst noise of its inputs: the
   error that layer (its weights and its output's 8 bits) adds, not what it
   inherited. Calibration samples only: the held-out set stays the gate's.
2. **Search** (``search``): the k most sensitive layers, k = 1, 2, 4, ... up
   to a quarter of the quantized layers, first with 16-bit activations on
   their inputs and output (weights stay int8: the size barely moves), then
   kept float (weights float too: bigger, but the layer adds no error). Each
   candidate is quantized from the same calibration ranges and judged by the
   gate's own checks on the calibration samples. The first that passes is
   the cheapest found; the search stops there, when the ladder ends, or when
   the time budget is spent, and reports every try.

A *layer* is a measured node and the nodes that feed it through tensors the
8-bit model does not quantize (``layer_groups``): a Conv fused with its Relu
has a Q/DQ only after the Relu, so the Relu's measured error is the Conv's
too, and keeping "the Relu" float must keep the Conv (its weights) float.

Recurrent layers (LSTM, GRU, RNN) are left float by onnxruntime's static QDQ
quantizer, which has no QDQ form for them: their weights are often the bulk
of the model (Silero's VAD: 0.5 of its 1.2 MB). Dynamic quantization
(``quantize_dynamic``: int8 weights, activations quantized per call at run
time) is the tool made for them, so on the CPU target the recurrent layers
are a candidate of their own (``DYNAMIC``): int8 on the chosen mix when it
still passes, or, when no static mix passes, the recurrent layers dynamic
and everything else float as the ladder's last rung.

Pure ranking, grouping and ladder functions (``rank_layers``,
``layer_groups``, ``ladder``) are separate from the I/O (sessions, files) so
they are unit-tested on their own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnxruntime.quantization import QuantType

MAX_SHARE = 0.25  # at most this share of the quantized layers may leave 8 bits
SENSITIVITY_SAMPLES = 16
MODES = ("a16", "float")
RECURRENT_OPS = frozenset({"LSTM", "GRU", "RNN"})
DYNAMIC = "dynamic"  # recurrent layers with int8 weights by quantize_dynamic, the rest float
GROUP_DEPTH = 4  # nodes a layer reaches back through unquantized tensors (Conv -> BatchNorm -> Relu)


@dataclass
class Try:
    layers: list[str]
    mode: str
    passed: bool
    failures: list[str]
    seconds: float
    size_bytes: int | None = None
    ranking: str = "added noise"  # or "output": each layer alone, its noise on the model's outputs

    def to_dict(self) -> dict[str, Any]:
        return {
            "layers": len(self.layers),
            "mode": self.mode,
            "passed": self.passed,
            "failures": self.failures[:3],
            "seconds": round(self.seconds, 2),
            "size_bytes": self.size_bytes,
            "ranking": self.ranking,
        }


@dataclass
class SearchResult:
    """What the search found and tried; ``chosen`` is None when nothing passed within the budget."""

    triggered_by: list[str]
    sensitivity: list[dict[str, Any]]
    tries: list[Try] = field(default_factory=list)
    chosen: Try | None = None
    stopped: str = "exhausted"  # passed | budget | exhausted
    elapsed: float = 0.0
    budget: float = 0.0
    cost: dict[str, Any] = field(default_factory=dict)
    chosen_path: Path | None = None
    output_sensitivity: list[dict[str, Any]] | None = None  # the second ranking, when it ran

    def to_dict(self) -> dict[str, Any]:
        return {
            "triggered_by": self.triggered_by,
            "sensitivity": self.sensitivity[:10],
            **(
                {"output_sensitivity": self.output_sensitivity[:10]}
                if self.output_sensitivity is not None
                else {}
            ),
            "tries": [t.to_dict() for t in self.tries],
            "chosen": None
            if self.chosen is None
            else {"mode": self.chosen.mode, "layers": self.chosen.layers, "count": len(self.chosen.layers)},
            "stopped": self.stopped,
            "seconds": round(self.elapsed, 2),
            "budget_seconds": self.budget,
            "cost": self.cost,
            "judged_on": "calibration samples, by the gate's own checks",
        }


def rank_layers(
    nodes: list[tuple[str, list[str], list[str]]], noise: dict[str, float]
) -> list[tuple[str, float]]:
    """(node, added relative noise), most sensitive first.

    ``nodes``: (name, input tensors, output tensors); ``noise``: tensor -> relative noise after its
    Q/DQ. Nodes whose outputs were not measured are left out.
    """
    ranked = []
    for name, inputs, outputs in nodes:
        measured = [noise[o] for o in outputs if o in noise]
        if not measured:
            continue
        inherited = max((noise[i] for i in inputs if i in noise), default=0.0)
        ranked.append((name, max(measured) - inherited))
    return sorted(ranked, key=lambda r: -r[1])


def layer_groups(
    nodes: list[tuple[str, list[str], list[str]]],
    measured: set[str],
    recurrent: frozenset[str] = frozenset(),
    depth: int = GROUP_DEPTH,
) -> dict[str, list[str]]:
    """Node -> the node and up to ``depth`` producers reached through unquantized tensors.

    ``nodes``: (name, input tensors, output tensors); ``measured``: the tensors the 8-bit model
    quantizes; ``recurrent``: names of recurrent nodes. A walk stops at a quantized tensor, at a
    graph input or initializer (no producer) and at a recurrent node (a candidate of its own).
    """
    producer = {o: (name, ins) for name, ins, outs in nodes for o in outs}
    groups: dict[str, list[str]] = {}
    for name, inputs, _ in nodes:
        group, frontier = [name], list(inputs)
        while frontier and len(group) <= depth:
            tensor = frontier.pop(0)
            if tensor in measured or tensor not in producer:
                continue
            upstream, upstream_inputs = producer[tensor]
            if upstream in group or upstream in recurrent:
                continue
            group.append(upstream)
            frontier.extend(upstream_inputs)
        groups[name] = group
    return groups


def ladder(quantized_layers: int) -> list[int]:
    """How many layers each step leaves 8 bits: 1, 2, 4, ... up to ``MAX_SHARE`` of the layers."""
    most = max(1, math.ceil(quantized_layers * MAX_SHARE))
    steps, k = [], 1
    while k < most:
        steps.append(k)
        k *= 2
    return [*steps, most]


def activation_pairs(qdq: onnx.ModelProto, float_names: set[str]) -> dict[str, str]:
    """Float model tensor -> the DequantizeLinear output that stands for it in the QDQ model.

    The quantizer keeps activation names, except a graph output: its producer then writes
    ``<name>_QuantizeLinear_Input`` and the DQ writes ``<name>``; both are compared to ``<name>``.
    """
    inits = {i.name for i in qdq.graph.initializer}
    dq_of = {n.input[0]: n.output[0] for n in qdq.graph.node if n.op_type == "DequantizeLinear"}
    pairs: dict[str, str] = {}
    for n in qdq.graph.node:
        if n.op_type != "QuantizeLinear" or n.input[0] in inits or n.output[0] not in dq_of:
            continue
        dq = dq_of[n.output[0]]
        if n.input[0] in float_names:
            pairs[n.input[0]] = dq
        elif dq in float_names:
            pairs[dq] = dq
    return pairs


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> bytes:
    extended = onnx.ModelProto()
    extended.CopyFrom(model)
    present = {o.name for o in extended.graph.output}
    for name in names:
        if name not in present:
            extended.graph.output.append(
                onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
            )
    return extended.SerializeToString()


def layer_sensitivity(
    float_model: Path, qdq_model: Path, feeds: list[dict[str, np.ndarray]]
) -> tuple[list[tuple[str, float]], dict[str, list[str]]]:
    """Rank the float model's nodes by the error each adds in the all-8-bit model (see module doc);
    with each node's layer (``layer_groups``).

    ``qdq_model`` must keep the float model's tensor names (``quantize_from_cache(finish=False)``).
    One sample at a time: memory stays at one sample's activations in each model.
    """
    from compiler.evaluate import session_from_bytes

    fmodel, qmodel = onnx.load(str(float_model)), onnx.load(str(qdq_model))
    float_names = {t for n in fmodel.graph.node for t in n.output} | {i.name for i in fmodel.graph.input}
    pairs = activation_pairs(qmodel, float_names)
    tensors = sorted(pairs)
    f_sess = session_from_bytes(_with_outputs(fmodel, tensors))
    q_sess = session_from_bytes(_with_outputs(qmodel, [pairs[t] for t in tensors]), reference=True)
    meter = NoiseMeter()
    for feed in feeds:
        f_out = dict(zip(tensors, f_sess.run(tensors, feed), strict=True))
        q_out = q_sess.run([pairs[t] for t in tensors], feed)
        meter.add(f_out, dict(zip(tensors, q_out, strict=True)))
    noise = meter.ratios()
    nodes = [(n.name, list(n.input), list(n.output)) for n in fmodel.graph.node if n.name]
    recurrent = frozenset(n.name for n in fmodel.graph.node if n.op_type in RECURRENT_OPS)
    return rank_layers(nodes, noise), layer_groups(nodes, set(pairs), recurrent)


def recurrent_ops(model: onnx.ModelProto) -> list[str]:
    """The recurrent op types (LSTM, GRU, RNN) the model uses, sorted."""
    return sorted({n.op_type for n in model.graph.node if n.op_type in RECURRENT_OPS})


def quantize_recurrent(source: Path, out: Path, op_types: list[str]) -> None:
    """``quantize_dynamic`` of the recurrent layers only: int8 weights (``DynamicQuantizeLSTM`` and
    kin in onnxruntime's contrib domain), every other node as ``source`` has it (float or QDQ)."""
    from onnxruntime.quantization import quantize_dynamic

    quantize_dynamic(str(source), str(out), op_types_to_quantize=op_types, weight_type=QuantType.QInt8)


def overrides_for(model: onnx.ModelProto, layers: list[str]) -> dict[str, Any]:
    """``TensorQuantOverrides``: 16-bit activations on the inputs and outputs of ``layers``."""
    inits = {i.name for i in model.graph.initializer}
    tensors: set[str] = set()
    for node in model.graph.node:
        if node.name in layers:
            tensors |= {t for t in (*node.input, *node.output) if t and t not in inits}
    return {t: [{"quant_type": QuantType.QUInt16}] for t in sorted(tensors)}


Build = Callable[[Path, list[str], str], None]  # write the candidate: out, layers, mode
Judge = Callable[[Path], list[str]]  # gate failures of a candidate on calibration samples
Progress = Callable[[str, float], None]


def search(
    ranked: list[tuple[str, float]],
    build: Build,
    judge: Judge,
    work: Path,
    budget_seconds: float,
    progress: Progress,
    triggered_by: list[str],
    started: float,
    modes: tuple[str, ...] = MODES,
    suffix: str = ".onnx",
    finals: tuple[tuple[list[str], str], ...] = (),
) -> SearchResult:
    """Walk the ladder (see module doc), then ``finals`` ((layers, mode) candidates after the ladder:
    the recurrent layers dynamic), until a candidate passes, the steps end or time is up."""
    result = SearchResult(
        triggered_by,
        [{"layer": name, "added_noise": round(added, 6)} for name, added in ranked],
        budget=budget_seconds,
    )
    steps = [([name for name, _ in ranked[:k]], mode) for k in ladder(len(ranked)) for mode in modes]
    steps += list(finals)
    for index, (layers, mode) in enumerate(steps):
        if time.perf_counter() - started > budget_seconds:
            result.stopped = "budget"
            break
        k = len(layers)
        progress(f"mixed precision: {k} layer(s) {mode}", index / len(steps))
        candidate = work / f"mixed-{k}-{mode}{suffix}"
        t0 = time.perf_counter()
        build(candidate, layers, mode)
        failures = judge(candidate)
        tried = Try(layers, mode, not failures, failures, time.perf_counter() - t0, candidate.stat().st_size)
        result.tries.append(tried)
        if not failures:
            result.chosen, result.stopped = tried, "passed"
            result.chosen_path = candidate
            break
    result.elapsed = time.perf_counter() - started
    return result


class NoiseMeter:
    """Relative noise |q - f|^2 / |f|^2 per tensor, accumulated one sample at a time."""

    def __init__(self) -> None:
        self.signal: dict[str, float] = {}
        self.error: dict[str, float] = {}

    def add(self, floats: dict[str, np.ndarray], quantized: dict[str, np.ndarray]) -> None:
        for name, f in floats.items():
            if name not in quantized:
                continue
            f64 = np.asarray(f, dtype=np.float64)
            q64 = np.asarray(quantized[name], dtype=np.float64)
            if f64.shape != q64.shape:
                continue
            self.signal[name] = self.signal.get(name, 0.0) + float((f64**2).sum())
            self.error[name] = self.error.get(name, 0.0) + float(((f64 - q64) ** 2).sum())

    def ratios(self) -> dict[str, float]:
        return {
            t: self.error[t] / s if s > 0 else 0.0
            for t, s in self.signal.items()
            if math.isfinite(self.error[t])
        }


def cost(
    sizes: tuple[int, int, int], latencies: tuple[float, float, float], all16_passes: bool
) -> dict[str, Any]:
    """What the chosen mix costs against all-8-bit, and saves against all-16-bit activations.

    ``sizes``/``latencies``: (all 8-bit, chosen mix, all 16-bit activations), bytes / ms.
    """
    (s8, sm, s16), (l8, lm, l16) = sizes, latencies
    return {
        "size_bytes_8bit": s8,
        "size_bytes": sm,
        "size_bytes_all16": s16,
        "size_ratio_to_8bit": round(sm / s8, 3) if s8 else None,
        "size_ratio_to_all16": round(sm / s16, 3) if s16 else None,
        "latency_ms_8bit": l8,
        "latency_ms": lm,
        "latency_ms_all16": l16,
        "latency_ratio_to_8bit": round(lm / l8, 3) if l8 else None,
        "latency_ratio_to_all16": round(lm / l16, 3) if l16 else None,
        "all16_passes": all16_passes,
        "note": "this host, 1 thread, batch 1; all16 = every activation 16-bit, weights int8",
    }
