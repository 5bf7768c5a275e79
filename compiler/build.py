"""What every target family's ``build`` step shares: the request, the result, samples, the two formats.

A family module (``compiler.targets.*``) supplies only what is its own: its quantize
step (ONNX families) or what happens after int8 (Vela for Ethos-U). The steps
every target needs — reading the model and its signature, loading calibration and
held-out samples, evaluating int8 against the untouched float model — live here
once, so all targets report the same figures the same way.
"""

from __future__ import annotations

import itertools
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx

from compiler.coverage import onnx_coverage, tflite_coverage
from compiler.data import Samples
from compiler.errors import InvalidData, InvalidModel
from compiler.evaluate import SNR_CAP_DB, Judging, RunMemo, evaluate, evaluate_runners, run_float
from compiler.memory import (
    CALIBRATION_COPIES,
    EVALUATION_COPIES,
    MemoryPlan,
    budget_from_machine,
    current_usage,
    onnx_sample_bytes,
    tflite_sample_bytes,
)
from compiler.mixed_precision import (
    DYNAMIC,
    SENSITIVITY_SAMPLES,
    NoiseMeter,
    cost,
    layer_sensitivity,
    overrides_for,
    quantize_recurrent,
    rank_layers,
    recurrent_ops,
    search,
)
from compiler.quantize import QuantizeInfo, default_opset, load_model, prepare, quantize_from_cache
from compiler.runners import (
    OnnxRunner,
    TFLiteRunner,
    median_latency_ms,
)
from compiler.signature import IOSignature, io_signature
from compiler.sources import DataSource, Preprocess, load_source
from compiler.tflite_post import finish_int8
from compiler.tflite_prep import (
    drop_unused_buffers,
    op_histogram,
    op_names,
    opcode,
    prepare_tflite,
    read_tflite,
)
from compiler.tflite_quant import quantize_tflite

if TYPE_CHECKING:
    from compiler.gate import Gate
    from compiler.targets.registry import Target

Progress = Callable[[str, float], None]
HELD_OUT_FRACTION = 0.2
SPLIT_SEED = 0
SCORE_SAMPLES = 64


@dataclass(frozen=True)
class BuildRequest:
    """One compile, as a family's ``build`` receives it."""

    model_path: Path
    target: Target
    calib: DataSource
    evals: DataSource | None
    preprocess: Preprocess | None
    gate: Gate | None
    work: Path  # a private temporary directory
    progress: Progress
    judging: Judging = field(default_factory=Judging)  # output kinds declared, user metric
    memory: MemoryPlan = field(default_factory=budget_from_machine)  # bounds the batches
    mixed_seconds: float = 0.0  # time budget of a mixed-precision search when 8 bits miss the gate


@dataclass
class Built:
    """What a family produced: the file to ship, the two models to compare, the report so far."""

    artifact: Path
    fp32: tuple[Path | bytes, str]
    int8: tuple[Path | bytes, str]
    sig: IOSignature
    held_out: Samples
    report: dict[str, Any]


BuildFn = Callable[[BuildRequest], Built]


def load_samples_for(req: BuildRequest, sig: IOSignature) -> tuple[Samples, Samples, str]:
    """(calibration, held-out, where the held-out set came from); split 80/20 without ``evals``."""
    calib = load_source(req.calib, sig.inputs, req.preprocess)
    if req.evals is None:
        calib, held_out = calib.split(HELD_OUT_FRACTION, SPLIT_SEED)
        source = f"split {1 - HELD_OUT_FRACTION:.0%}/{HELD_OUT_FRACTION:.0%} of calibration data"
    else:
        held_out = load_source(req.evals, sig.inputs, req.preprocess)
        source = "separate"
    for label, samples, path in (("calibration", calib, req.calib), ("evaluation", held_out, req.evals)):
        if samples.usable(sig.inputs) == 0:
            raise InvalidData(
                f"{path or req.calib}: {len(samples)} {label} samples, "
                "fewer than the model's fixed batch size"
            )
    return calib, held_out, source


AGREEMENT = {"top1_agreement", "exact_agreement"}  # classifier scores, integer (label) outputs


def calibration_score(fp32: Path, int8: Path, sig: IOSignature, runs: RunMemo) -> tuple[float, ...]:
    """(min SNR dB, min top-1 agreement) of a candidate int8 model on (up to 64) calibration samples.

    Only calibration samples: choosing on the held-out set would tune the model to the very data the
    gate then judges it on. ``runs``: the job's ``scoring`` memo (those samples, its batches).
    """
    figures = evaluate(fp32, int8, runs.samples, sig, batch_size=runs.batch_size, runs=runs)[
        "outputs"
    ].values()
    snr = min(
        ((f["snr_db"] if f["snr_db"] is not None else -math.inf) for f in figures if "snr_db" in f),
        default=SNR_CAP_DB,  # integer outputs only: no SNR to rank by
    )
    agreement = [f.get("top1_agreement", f.get("exact_agreement")) for f in figures if AGREEMENT & f.keys()]
    worst = min((a if a is not None else -math.inf) for a in agreement) if agreement else 1.0
    return (round(snr, 1), worst)


# Ops that only reshape or copy: the op that decides what an output is sits before them.
PASSTHROUGH = frozenset(
    {"Identity", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Cast", "RESHAPE", "SQUEEZE", "CAST"}
)


def onnx_output_hints(model: onnx.ModelProto) -> dict[str, str]:
    """Graph output -> the op that makes it (through reshapes), or ``ArgMax`` when one consumes it."""
    producer = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list[str]] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n.op_type)
    hints: dict[str, str] = {}
    for out in model.graph.output:
        if "ArgMax" in consumers.get(out.name, []):
            hints[out.name] = "ArgMax"
            continue
        node, seen = producer.get(out.name), 0
        while node is not None and node.op_type in PASSTHROUGH and node.input and seen < 8:
            node, seen = producer.get(node.input[0]), seen + 1
        if node is not None:
            hints[out.name] = node.op_type
    return hints


def tflite_output_hints(model: Any) -> dict[str, str]:
    """Output tensor name -> the TFLite op that makes it (through reshapes)."""
    names = op_names()
    sg = model.subgraphs[0]
    producer = {o: op for op in sg.operators or [] for o in op.outputs}

    def op_name(op: Any) -> str:
        return names.get(opcode(model.operatorCodes[op.opcodeIndex]), "?")

    hints: dict[str, str] = {}
    for index in sg.outputs:
        op, seen = producer.get(index), 0
        while op is not None and op_name(op) in PASSTHROUGH and seen < 8:
            op, seen = producer.get(op.inputs[0]), seen + 1
        if op is not None:
            name = sg.tensors[index].name
            hints[name.decode() if isinstance(name, bytes) else name] = op_name(op)
    return hints


@dataclass
class OnnxQuantizeJob:
    """What an ONNX family's quantize step gets: the prepared float model and where to write int8."""

    prepared: Path
    out: Path
    source: Path  # the untouched float model, for scoring candidates
    calib: Samples
    sig: IOSignature
    info: QuantizeInfo
    work: Path
    batch: int = 1  # samples per calibration feed (dynamic-batch models), from the memory plan
    eval_batch: int = 1  # samples per run when scoring candidates
    gate: Gate | None = None  # the gate a mixed-precision search aims at (None: no search)
    judging: Judging = field(default_factory=Judging)
    progress: Progress = field(default=lambda _step, _fraction: None)
    mixed_seconds: float = 0.0  # time budget of the mixed-precision search (0: none)
    scoring: RunMemo | None = None  # runs on the first SCORE_SAMPLES calibration samples (``scoring_runs``)

    def scoring_runs(self) -> RunMemo:
        """Choosing a calibration and the mixed-precision search judge candidates on the same (up to
        64) calibration samples in ``eval_batch`` batches: one memo, so each model runs there once."""
        if self.scoring is None:
            subset = self.calib.take(np.arange(min(len(self.calib), SCORE_SAMPLES)))
            self.scoring = RunMemo(subset, self.eval_batch)
        return self.scoring


# (float model, output, extra nodes kept float, TensorQuantOverrides, finish) -> writes a QDQ model.
# ``finish=False`` keeps the float model's tensor names (for the sensitivity pass).
OnnxMake = Callable[[Path, Path, list[str], dict[str, Any], bool], None]


def mixed_precision_onnx(job: OnnxQuantizeJob, make: OnnxMake | None = None) -> None:
    """If the all-8-bit model misses the gate on calibration samples, search a mix that passes
    (``compiler.mixed_precision``) and replace ``job.out`` with it; the search goes in ``job.info``.

    ``make`` quantizes a candidate the family's way; by default (the CPU target) from the chosen
    calibration ranges, and then recurrent layers (which static QDQ leaves float) are a candidate
    too: dynamic int8 weights on the shipped mix when it still passes, or the recurrent layers
    dynamic and the rest float when no static mix does. A search that breaks (a quantizer or runtime
    error on some candidate) keeps the all-8-bit model and says why: the gate then judges that
    model as it would have without it.
    """
    if job.gate is None or job.mixed_seconds <= 0:
        return
    recurrent: list[str] = []
    if make is None:
        cache = job.info.calibration_cache
        if cache is None:
            return
        scratch = QuantizeInfo(job.info.source_opset, job.info.opset)
        kept = list(job.info.float_nodes)

        def from_cache(
            prepared: Path, out: Path, floats: list[str], over: dict[str, Any], finish: bool
        ) -> None:
            quantize_from_cache(prepared, out, cache, scratch, kept + floats, over or None, finish=finish)

        make = from_cache
        recurrent = recurrent_ops(onnx.load(str(job.prepared), load_external_data=False))
    try:
        _mixed_precision_onnx(job, job.gate, make, recurrent)
    except Exception as exc:  # onnxruntime raises its own classes; the 8-bit model stands
        job.info.mixed_precision = {"error": f"{type(exc).__name__}: {exc}"[:300], "chosen": None}


def _mixed_precision_onnx(job: OnnxQuantizeJob, gate: Gate, make: OnnxMake, recurrent: list[str]) -> None:
    started = time.perf_counter()
    runs = job.scoring_runs()

    def judge(candidate: Path) -> list[str]:
        report = evaluate(job.source, candidate, runs.samples, job.sig, job.judging, runs.batch_size, runs)
        return gate.check(report) + float_model_broken(report)

    failures = judge(job.out)
    if float_model_broken(failures):
        return
    if not failures:
        if recurrent:
            job.info.mixed_precision = _recurrent_on_top(job, judge, recurrent, started)
        return
    named = name_nodes(job.prepared, job.work / "prepared-named.onnx")
    base = job.work / "mixed-base.onnx"
    make(named, base, [], {}, False)
    feeds = list(itertools.islice(job.calib.batches(job.sig.inputs, 1), SENSITIVITY_SAMPLES))
    job.progress("mixed precision: layer sensitivity", 0.3)
    ranked, groups = layer_sensitivity(named, base, feeds)

    named_model = onnx.load(str(named), load_external_data=False)
    recurrent_nodes = [n.name for n in named_model.graph.node if n.op_type in recurrent]

    def build(out: Path, layers: list[str], mode: str) -> None:
        if mode == DYNAMIC:
            quantize_recurrent(named, out, recurrent)
            return
        whole = list(dict.fromkeys(m for layer in layers for m in groups.get(layer, [layer])))
        if mode == "a16":
            make(named, out, [], overrides_for(named_model, whole), True)
        else:
            make(named, out, whole, {}, True)

    def progress(step: str, fraction: float) -> None:
        job.progress(step, 0.3 + 0.25 * fraction)

    finals = ((recurrent_nodes, DYNAMIC),) if recurrent else ()
    result = search(ranked, build, judge, job.work, job.mixed_seconds, progress, failures, started)
    if result.chosen is None and result.stopped == "exhausted":
        # Added noise misses error that later layers amplify (a recurrent layer integrates its
        # input's error over the steps): rank again by what each layer alone does to the outputs.
        job.progress("mixed precision: output sensitivity", 0.45)
        deadline = started + job.mixed_seconds
        by_output = output_sensitivity(
            named_model, named, [n for n, _ in ranked], groups, make, feeds, job.work, deadline
        )
        second = search(
            by_output, build, judge, job.work, job.mixed_seconds, progress, failures, started, finals=finals
        )
        for tried in second.tries:
            tried.ranking = "output"
        second.tries = [*result.tries, *second.tries]
        second.output_sensitivity = [
            {"layer": r["layer"], "output_noise": r["added_noise"]} for r in second.sensitivity
        ]
        second.sensitivity = result.sensitivity
        result = second
    report: dict[str, Any] = {}
    if result.chosen is not None and result.chosen_path is not None:
        eight = job.work / "shipped-8bit.onnx"
        shutil.copyfile(job.out, eight)
        shutil.copyfile(result.chosen_path, job.out)
        if result.chosen.mode == "float":
            kept = [m for layer in result.chosen.layers for m in groups.get(layer, [layer])]
            job.info.float_nodes = list(dict.fromkeys([*job.info.float_nodes, *kept]))
        if result.chosen.mode == DYNAMIC:
            job.info.float_nodes = [n.name for n in named_model.graph.node if n.name not in recurrent_nodes]
        elif recurrent:
            report["recurrent"] = _recurrent_on_top(job, judge, recurrent, time.perf_counter())["recurrent"]
        all16 = job.work / "all-a16.onnx"
        build(all16, [n.name for n in named_model.graph.node], "a16")
        if recurrent:  # weights int8 there too: the recurrent layers' by dynamic quantization
            quantize_recurrent(all16, all16, recurrent)
        feed = next(job.calib.batches(job.sig.inputs, 1))
        paths = (eight, job.out, all16)  # the mix as shipped: with its recurrent layers dynamic
        result.cost = cost(
            (paths[0].stat().st_size, paths[1].stat().st_size, paths[2].stat().st_size),
            (
                median_latency_ms(OnnxRunner(paths[0]), feed, 10),
                median_latency_ms(OnnxRunner(paths[1]), feed, 10),
                median_latency_ms(OnnxRunner(paths[2]), feed, 10),
            ),
            not judge(all16),
        )
    job.info.mixed_precision = result.to_dict() | report


def output_sensitivity(
    model: onnx.ModelProto,
    named: Path,
    layers: list[str],
    groups: dict[str, list[str]],
    make: OnnxMake,
    feeds: list[dict[str, np.ndarray]],
    work: Path,
    deadline: float,
) -> list[tuple[str, float]]:
    """(layer, relative noise on the model's outputs with only that layer at 8 bits), worst first.

    One quantize and ``len(feeds)`` runs per layer, so it stops at ``deadline``: layers not reached
    keep their place after the measured ones, in the order given.
    """
    from compiler.evaluate import session_from_bytes

    reference = session_from_bytes(named.read_bytes())
    refs = [{str(i): v for i, v in enumerate(reference.run(None, feed))} for feed in feeds]
    everything = [n.name for n in model.graph.node]
    measured: list[tuple[str, float]] = []
    for layer in layers:
        if time.perf_counter() > deadline:
            break
        alone = set(groups.get(layer, [layer]))
        out = work / "alone.onnx"
        make(named, out, [n for n in everything if n not in alone], {}, True)
        candidate = session_from_bytes(out.read_bytes(), reference=True)
        meter = NoiseMeter()
        for feed, ref in zip(feeds, refs, strict=True):
            meter.add(ref, {str(i): v for i, v in enumerate(candidate.run(None, feed))})
        measured.append((layer, max(meter.ratios().values(), default=0.0)))
    done = {name for name, _ in measured}
    return sorted(measured, key=lambda r: -r[1]) + [(n, 0.0) for n in layers if n not in done]


def _recurrent_on_top(
    job: OnnxQuantizeJob, judge: Callable[[Path], list[str]], recurrent: list[str], started: float
) -> dict[str, Any]:
    """Recurrent layers dynamic int8 on the model ``job.out`` holds; kept only if it still passes."""
    candidate = job.work / "recurrent-dynamic.onnx"
    quantize_recurrent(job.out, candidate, recurrent)
    failures = judge(candidate)
    feed = next(job.calib.batches(job.sig.inputs, 1))
    before, after = job.out.stat().st_size, candidate.stat().st_size
    figures = {
        "ops": recurrent,
        "mode": f"{DYNAMIC} (int8 weights, activations quantized at run time)",
        "passed": not failures,
        "failures": failures[:3],
        "size_bytes_before": before,
        "size_bytes": after,
        "latency_ms_before": median_latency_ms(OnnxRunner(job.out), feed, 10),
        "latency_ms": median_latency_ms(OnnxRunner(candidate), feed, 10),
        "seconds": round(time.perf_counter() - started, 2),
    }
    if not failures:
        shutil.copyfile(candidate, job.out)
    return {
        "chosen": None,
        "recurrent": figures,
        "judged_on": "calibration samples, by the gate's own checks",
    }


@dataclass(frozen=True)
class TFLiteMixedJob:
    """What the TFLite mixed-precision search needs from ``build_tflite_int8``."""

    prepared: bytes
    raw: bytes  # the quantizer's all-8-bit output, tensor names as in the float model
    int8: bytes  # the finished all-8-bit file
    feeds: list[dict[str, np.ndarray]]  # one calibration sample each, keyed by tensor name
    calib: Samples
    sig: IOSignature
    judging: Judging
    req: BuildRequest
    npu: bool = False  # candidates finished for an int8 NPU (Ethos-U: PRELU int8, PADs as convs)


def mixed_precision_tflite(job: TFLiteMixedJob, gate: Gate) -> tuple[bytes, dict[str, Any] | None]:
    """The TFLite side of ``compiler.mixed_precision``: 16-bit activations (16x8 kernels) for the most
    sensitive ops, by ai-edge-quantizer recipe entries matched on each op's output tensor name.

    Returns the bytes to ship (the all-8-bit ones unless a mix passed) and the search's report.
    """
    started = time.perf_counter()
    subset = job.calib.take(np.arange(min(len(job.calib), SCORE_SAMPLES)))
    fp32 = TFLiteRunner(job.prepared)
    reference = run_float(fp32.run, subset, job.sig, None)  # every candidate is judged against it

    def judge(candidate: Path) -> list[str]:
        data = candidate.read_bytes()
        report = evaluate_runners(
            fp32.run,
            TFLiteRunner(data).run,
            subset,
            job.sig,
            len(job.prepared),
            len(data),
            job.judging,
            reference=reference,
        )
        if float_model_broken(report):
            return float_model_broken(report)
        return gate.check(report)

    eight = job.req.work / "mixed-8bit.tflite"
    eight.write_bytes(job.int8)
    failures = judge(eight)
    if not failures or float_model_broken(failures):
        return job.int8, None
    job.req.progress("mixed precision: layer sensitivity", 0.3)
    model = read_tflite(job.prepared)
    sg = model.subgraphs[0]

    def name(index: int) -> str:
        raw = sg.tensors[index].name
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    ops = [
        (name(op.outputs[0]), [name(i) for i in op.inputs if i >= 0], [name(o) for o in op.outputs])
        for op in sg.operators or []
    ]
    # Activations only: constants are per-channel int8 in the quantized model, not comparable here.
    activations = {o for _, _, outs in ops for o in outs} | {name(i) for i in sg.inputs}
    float_run, quant_run = TFLiteRunner(job.prepared, preserve=True), TFLiteRunner(job.raw, preserve=True)
    meter = NoiseMeter()
    for feed in job.feeds[:SENSITIVITY_SAMPLES]:
        float_run.run(feed)
        quant_run.run(feed)
        floats = {k: v for k, v in float_run.intermediates().items() if k in activations}
        meter.add(floats, quant_run.intermediates())
    ranked = rank_layers(ops, meter.ratios())

    inputs_of = {out: ins for out, ins, _ in ops}
    produced = set(inputs_of)

    def build(out: Path, layers: list[str], mode: str) -> None:
        # The op and the producers of its inputs: a 16x8 op fed an 8-bit tensor has already lost the
        # precision (the quantizer only inserts an int8 -> int16 QUANTIZE in front of it).
        a16 = sorted({*layers, *(i for layer in layers for i in inputs_of.get(layer, []) if i in produced)})
        candidate = quantize_tflite(job.prepared, job.feeds, a16=a16)
        out.write_bytes(finish_int8(drop_unused_buffers(candidate), npu=job.npu)[0])

    def progress(step: str, fraction: float) -> None:
        job.req.progress(step, 0.3 + 0.25 * fraction)

    work, seconds = job.req.work, job.req.mixed_seconds
    result = search(ranked, build, judge, work, seconds, progress, failures, started, ("a16",), ".tflite")
    shipped = job.int8
    if result.chosen_path is not None:
        shipped = result.chosen_path.read_bytes()
        all16 = work / "all-a16.tflite"
        build(all16, [out for out, _, _ in ops], "a16")
        wide = all16.read_bytes()
        feed = job.feeds[0]
        result.cost = cost(
            (len(job.int8), len(shipped), len(wide)),
            (
                median_latency_ms(TFLiteRunner(job.int8), feed, 10),
                median_latency_ms(TFLiteRunner(shipped), feed, 10),
                median_latency_ms(TFLiteRunner(wide), feed, 10),
            ),
            not judge(all16),
        )
    return shipped, result.to_dict()


FLOAT_BROKEN = "the float model itself gives non-finite outputs"


def float_model_broken(found: dict[str, Any] | list[str]) -> list[str]:
    """``[FLOAT_BROKEN]`` when the float model's own outputs are NaN/inf (in a report, or already
    among failures): no precision mix can repair that, so the search does not start."""
    if isinstance(found, list):
        return [FLOAT_BROKEN] if FLOAT_BROKEN in found else []
    broken = any(fig.get("nonfinite_fp32", 0) for fig in found.get("outputs", {}).values())
    return [FLOAT_BROKEN] if broken else []


def name_nodes(path: Path, out: Path) -> Path:
    """A copy of the model whose every node has a unique name (what ``nodes_to_exclude`` selects by)."""
    model = onnx.load(str(path))
    taken = {n.name for n in model.graph.node if n.name}
    for index, node in enumerate(model.graph.node):
        if not node.name:
            name = f"{node.op_type}_{index}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)
    onnx.save(model, str(out))
    return out


def memory_report(
    plan: MemoryPlan, sample_bytes: int, calibration_batch: int, evaluation_batch: int
) -> dict[str, Any]:
    return plan.to_dict() | {
        "sample_bytes_estimate": sample_bytes,
        "calibration_batch": calibration_batch,
        "evaluation_batch": evaluation_batch,
        "one_sample_fits": sample_bytes * EVALUATION_COPIES <= plan.budget,
    }


def build_onnx(req: BuildRequest, accelerator: str, quantize: Callable[[OnnxQuantizeJob], None]) -> Built:
    """Check, prepare, quantize (the family's step) and evaluate an ONNX model.

    ``accelerator`` picks the op-coverage table (``cpu`` or ``qnn``).
    """
    tgt, model_path, work = req.target, req.model_path, req.work
    model = load_model(model_path)
    try:
        sig = io_signature(model)
    except ValueError as exc:
        raise InvalidModel(f"{model_path}: {exc}") from exc
    if not sig.inputs or not sig.outputs:
        raise InvalidModel(f"{model_path}: the model has no inputs or no outputs")
    foreign = tgt.unsupported_domains({n.domain for n in model.graph.node})
    if foreign:
        raise InvalidModel(
            f"{model_path}: uses operator domain(s) {', '.join(foreign)}, which target {tgt.name!r} "
            f"does not run (supported: {', '.join(repr(d) for d in tgt.operator_domains)})"
        )
    ops: dict[str, int] = {}
    for node in model.graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    coverage = onnx_coverage(ops, accelerator)
    calib, held_out, eval_source = load_samples_for(req, sig)

    source_copy = work / "source.onnx"
    onnx.save(model, str(source_copy))
    info = QuantizeInfo(source_opset=default_opset(model), opset=default_opset(model))
    req.progress("prepare", 0.1)
    prepared = prepare(model, work, info)
    req.progress("quantize", 0.25)
    int8_path = work / tgt.model_file
    shapes = {name: values.shape for name, values in calib.inputs.items()}
    sample_bytes = onnx_sample_bytes(model, shapes)
    in_use = current_usage()
    calib_batch = req.memory.batch(sample_bytes, CALIBRATION_COPIES, in_use)
    eval_batch = req.memory.batch(sample_bytes, EVALUATION_COPIES, in_use)
    job = OnnxQuantizeJob(prepared, int8_path, source_copy, calib, sig, info, work, calib_batch, eval_batch)
    job.gate, job.judging, job.progress, job.mixed_seconds = (
        req.gate,
        replace(req.judging, hints=onnx_output_hints(model)),
        req.progress,
        req.mixed_seconds,
    )
    quantize(job)
    job.scoring = None  # the scoring runs' outputs are not needed past the quantize step
    req.progress("evaluate", 0.6)
    # Compare against the untouched source model: that is what the user shipped before.
    judging = replace(req.judging, hints=onnx_output_hints(model))
    report = evaluate(source_copy, int8_path, held_out, sig, judging, eval_batch)
    report["memory"] = memory_report(req.memory, sample_bytes, calib_batch, eval_batch)
    if info.mixed_precision is not None:
        report["mixed_precision"] = info.mixed_precision
    report["calibration_samples"] = calib.usable(sig.inputs)
    report["input_ranges"] = calib.ranges()
    report["evaluation_source"] = eval_source
    report["method"] = info.to_dict()
    report["ops"] = coverage
    return Built(int8_path, (source_copy, "onnx"), (int8_path, "onnx"), sig, held_out, report)


def build_tflite_int8(req: BuildRequest, *, npu: bool) -> Built:
    """Full-integer TFLite by ai-edge-quantizer, finished by ``compiler.tflite_post``, evaluated by LiteRT.

    ``npu``: for an int8-only accelerator (PRELU made int8, the NPU's op table for coverage). The
    artifact is the int8 file; a family that compiles it further (Vela) replaces ``artifact``.
    """
    model_path = req.model_path
    source = model_path.read_bytes()
    prepared, prep_info = prepare_tflite(source, model_path)
    try:
        fp32_runner = TFLiteRunner(prepared)
    except Exception as exc:  # LiteRT raises ValueError/RuntimeError on models it cannot allocate
        raise InvalidModel(f"{model_path}: LiteRT cannot run the float model: {exc}") from exc
    sig = fp32_runner.signature()
    if any(s.numpy_dtype.kind != "f" for s in (*sig.inputs, *sig.outputs)):
        raise InvalidModel(f"{model_path}: not a float model (inputs/outputs {sig.to_dict()})")
    # Parsed once for the three read-only looks below (ops, output hints, tensor sizes): a parse of the
    # flatbuffer into objects costs as much as a LiteRT run of a small model.
    prepared_model = read_tflite(prepared)
    coverage = tflite_coverage(op_histogram(prepared_model), npu)
    calib, held_out, eval_source = load_samples_for(req, sig)
    req.progress("quantize", 0.25)
    one_by_one = [{k: v[i : i + 1] for k, v in calib.inputs.items()} for i in range(len(calib))]
    raw = quantize_tflite(prepared, one_by_one)
    int8, post = finish_int8(drop_unused_buffers(raw), npu=npu)
    judging = replace(req.judging, hints=tflite_output_hints(prepared_model))
    mixed = None
    if req.gate is not None and req.mixed_seconds > 0:
        job = TFLiteMixedJob(prepared, raw, int8, one_by_one, calib, sig, judging, req, npu)
        try:
            int8, mixed = mixed_precision_tflite(job, req.gate)
        except Exception as exc:  # the quantizer or LiteRT failed on a candidate: the 8-bit model stands
            mixed = {"error": f"{type(exc).__name__}: {exc}"[:300], "chosen": None}
    int8_path = req.work / "int8.tflite"
    int8_path.write_bytes(int8)
    int8_runner = TFLiteRunner(int8)
    req.progress("evaluate", 0.6)
    report = evaluate_runners(
        fp32_runner.run, int8_runner.run, held_out, sig, len(prepared), len(int8), judging
    )
    report["size"]["source_bytes"] = len(source)
    if mixed is not None:
        report["mixed_precision"] = mixed
    # TFLite models have a fixed batch (1 in every real model): both steps already run one sample.
    report["memory"] = memory_report(req.memory, tflite_sample_bytes(prepared_model), 1, 1)
    report["calibration_samples"] = len(calib)
    report["input_ranges"] = calib.ranges()
    report["evaluation_source"] = eval_source
    report["method"] = {
        "quantizer": "ai-edge-quantizer",
        "recipe": "static_wi8_ai8",
        "calibration": "min/max over all samples (qsv_utils.min_max_update)",
        "prepare": prep_info.to_dict(),
        "post": post.to_dict(),
        "io_quantization": int8_runner.io_quantization(),
    }
    report["ops"] = {**coverage, "int8": op_histogram(read_tflite(int8))}
    return Built(int8_path, (prepared, "tflite"), (int8, "tflite"), sig, held_out, report)
