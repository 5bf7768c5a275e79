"""Measure the int8 model against the float model on held-out samples.

Both models run on the same feeds. Each output has a kind
(``compiler.output_kinds``: declared, or inferred conservatively from the
fp32 values and the graph) and gets the figures of its kind
(``device_agent.figures``, shared with the device's acceptance check): every
float output the regression figures (cosine, SNR, errors), a classification
output also top-1 agreement, detection box matching, segmentation mask IoU,
sequence the error after N steps. An integer output (a class label, an index)
has no geometry to measure: it is compared for exact equality. With labels,
accuracy of fp32 and int8 on the first
classification output; with a user metric (``compiler.user_metric``), its value.

The report must be strict JSON (it is signed into the manifest), so figures
that cannot be measured (non-finite outputs) are ``None``, and a perfect SNR
is capped at ``SNR_CAP_DB`` instead of infinity.

An int8 ONNX model is evaluated with onnxruntime's graph optimizations off, so
every DequantizeLinear -> op -> QuantizeLinear runs as written (the QDQ
reference semantics). With them on, onnxruntime fuses the units into this
host's integer kernels, and on x86 CPUs without AVX-512 VNNI the U8S8 kernels
add pairs of uint8 x int8 products in saturating int16 (``vpmaddubsw``), an
error the ARM devices (exact int32 accumulation) and the QNN HTP do not have:
the digits model lost ~10 dB of SNR to it on an AVX2-only host and the gate
refused models the device would run well. Host latency is still measured with
the fused kernels (``compiler.runners``).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from compiler import output_kinds
from compiler.data import Samples
from compiler.errors import InvalidModel, QuantizationError
from compiler.output_kinds import OutputKind, infer_kind
from compiler.signature import IOSignature
from compiler.user_metric import UserMetric
from device_agent import figures as metrics
from device_agent.figures import SNR_CAP_DB

__all__ = ["SNR_CAP_DB", "Judging", "RunMemo", "compare_output", "evaluate", "evaluate_runners", "run_float"]


def session(path: Path | bytes, *, reference: bool = False) -> ort.InferenceSession:
    """A CPU session with one intra-op thread: deterministic and comparable fp32 vs int8.

    ``reference``: no graph optimization, so a QDQ model runs with the reference semantics instead of
    this host's fused integer kernels (see the module docstring). ``path`` may be the model's bytes.
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if reference:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def session_from_bytes(model: bytes, *, reference: bool = False) -> ort.InferenceSession:
    return session(model, reference=reference)


def is_integer(output: np.ndarray) -> bool:
    """Labels, indices, masks: the float model's output is integer (or boolean) typed."""
    return output.dtype.kind in "biu"


def compare_output(
    ref: np.ndarray,
    out: np.ndarray,
    kind: OutputKind | None = None,
    scores: tuple[np.ndarray, np.ndarray] | None = None,
) -> dict[str, Any]:
    """Figures of one output (int8 ``out`` against fp32 ``ref``) for its kind (inferred when None).

    ``scores``: the (fp32, int8) score output a detection output names with ``scores=``.
    """
    kind = kind or infer_kind("", ref, None, labels=False)
    figures: dict[str, Any] = {"kind": kind.kind, "kind_source": kind.source, "shape": list(ref.shape[1:])}
    if kind.params:
        figures["kind_params"] = dict(kind.params)
    found = metrics.of_kind(kind.kind, dict(kind.params), ref, out, scores)
    if found.get("kind") == "integer":
        # A label has no geometry: equal or not (a cosine of labels is 1.0 whenever signs agree).
        figures.update(nonfinite_fp32=0, nonfinite_int8=0, **found)
        return figures
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    figures["nonfinite_fp32"] = int(ref.size - np.isfinite(ref64).sum())
    figures["nonfinite_int8"] = int(out.size - np.isfinite(out64).sum())
    figures.update(found)
    figures["error_histogram"] = error_histogram(ref, out)
    return figures


def error_histogram(ref: np.ndarray, out: np.ndarray, bins: int = 24) -> dict[str, Any] | None:
    """Distribution of int8 - fp32 per element, relative to the fp32 output's range (for the HTML plot)."""
    diff = out.astype(np.float64) - ref.astype(np.float64)
    if not np.isfinite(diff).all() or diff.size == 0:
        return None
    spread = float(np.ptp(ref)) or 1.0
    rel = diff.ravel() / spread
    bound = max(float(np.abs(rel).max()), 1e-6)
    counts, edges = np.histogram(rel, bins=bins, range=(-bound, bound))
    return {
        "relative_to": "fp32 output range",
        "edges": [round(float(e), 6) for e in edges],
        "counts": [int(c) for c in counts],
    }


def evaluate(
    fp32_path: Path,
    int8_path: Path,
    samples: Samples,
    sig: IOSignature,
    judging: Judging | None = None,
    batch_size: int | None = None,
    runs: RunMemo | None = None,
) -> dict[str, Any]:
    """Run both ONNX models on ``samples`` and return the JSON-serialisable comparison report.

    ``runs``: outputs already computed on these very samples and batches (``RunMemo``), reused for
    any model file whose content it has seen.
    """
    memo = runs if runs is not None else RunMemo(samples, batch_size)
    if memo.samples is not samples or memo.batch_size != batch_size:
        raise ValueError("the run memo was made for other samples or another batch size")
    names = [o.name for o in sig.outputs]
    try:
        ref = memo.outputs(fp32_path, names, sig, reference=False)
    except _CannotLoad as exc:
        raise InvalidModel(f"onnxruntime cannot load the float model: {exc.__cause__}") from exc.__cause__
    except Exception as exc:
        raise InvalidModel(f"the float model fails on the evaluation samples: {exc}") from exc
    try:
        out = memo.outputs(int8_path, names, sig, reference=True)
    except _CannotLoad as exc:
        raise QuantizationError(f"onnxruntime cannot load the int8 model: {exc.__cause__}") from exc.__cause__
    except Exception as exc:
        raise QuantizationError(f"the int8 model fails on the evaluation samples: {exc}") from exc
    return _compare(
        ref,
        out,
        samples,
        sig,
        Path(fp32_path).stat().st_size,
        Path(int8_path).stat().st_size,
        judging,
        batch_size,
    )


class _CannotLoad(Exception):
    """onnxruntime refused the model file itself (the cause), as opposed to failing on a sample."""


class RunMemo:
    """Each ONNX model's outputs on one fixed sample set, remembered by the model file's content.

    Choosing a calibration and judging a mixed-precision search compare candidates on the same
    calibration samples: without it the float model runs again for every candidate, and the chosen
    candidate runs again when the search first judges it. Same session settings, same samples,
    same batches: the outputs are the ones a new run would give, so the figures are too. It keeps
    the float model's runs and the last ``QUANTIZED_KEPT`` quantized ones (a search's candidates
    are many; only the one just scored is asked for again).
    """

    QUANTIZED_KEPT = 2

    def __init__(self, samples: Samples, batch_size: int | None) -> None:
        self.samples = samples
        self.batch_size = batch_size
        self._seen: dict[tuple[str, bool], Ran] = {}

    def outputs(self, path: Path, names: list[str], sig: IOSignature, *, reference: bool) -> Ran:
        """(outputs in ``names`` order, seconds the run took when it was made)."""
        key = (hashlib.sha256(Path(path).read_bytes()).hexdigest() + "|" + ",".join(names), reference)
        if key not in self._seen:
            try:
                sess = session(path, reference=reference)
            except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented classes
                raise _CannotLoad() from exc
            self._seen[key] = _run(
                lambda feed: [np.asarray(r) for r in sess.run(names, feed)],
                self.samples,
                sig,
                self.batch_size,
            )
            quantized = [k for k in self._seen if k[1]]
            for old in quantized[: max(0, len(quantized) - self.QUANTIZED_KEPT)]:
                del self._seen[old]
        return self._seen[key]


RunFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]
Ran = tuple[list[np.ndarray], float]  # outputs in signature order, seconds the runs took


def run_float(fp32: RunFn, samples: Samples, sig: IOSignature, batch_size: int | None) -> Ran:
    """The float model's outputs on ``samples``, as ``evaluate_runners`` computes them."""
    try:
        return _run(fp32, samples, sig, batch_size)
    except Exception as exc:
        raise InvalidModel(f"the float model fails on the evaluation samples: {exc}") from exc


def _run(fn: RunFn, samples: Samples, sig: IOSignature, batch_size: int | None) -> Ran:
    parts: list[list[np.ndarray]] = [[] for _ in sig.outputs]
    elapsed = 0.0
    for feed in samples.batches(sig.inputs, batch_size):
        start = time.perf_counter()
        results = fn(feed)
        elapsed += time.perf_counter() - start
        for part, result in zip(parts, results, strict=True):
            part.append(np.asarray(result))
    return [np.concatenate(p, axis=0) for p in parts], elapsed


@dataclass(frozen=True)
class Judging:
    """How outputs are judged: declared kinds, graph hints for inference, an optional user metric."""

    declared: dict[str, OutputKind] = field(default_factory=dict)
    hints: dict[str, str] = field(default_factory=dict)  # output name -> op next to it in the graph
    metric: UserMetric | None = None


def evaluate_runners(
    fp32: RunFn,
    int8: RunFn,
    samples: Samples,
    sig: IOSignature,
    fp32_bytes: int,
    int8_bytes: int,
    judging: Judging | None = None,
    batch_size: int | None = None,
    *,
    reference: Ran | None = None,
) -> dict[str, Any]:
    """Compare any two float-in/float-out model runs (ONNX or TFLite) on ``samples``.

    ``batch_size``: samples per run for dynamic-batch models (``compiler.memory`` plans it).
    ``reference``: ``run_float(fp32, samples, sig, batch_size)`` already made, for a caller that
    judges several candidates against the same float model on the same samples.
    """
    ref_run = reference if reference is not None else run_float(fp32, samples, sig, batch_size)
    try:
        out_run = _run(int8, samples, sig, batch_size)
    except Exception as exc:
        raise QuantizationError(f"the int8 model fails on the evaluation samples: {exc}") from exc
    return _compare(ref_run, out_run, samples, sig, fp32_bytes, int8_bytes, judging, batch_size)


def _compare(
    ref_run: Ran,
    out_run: Ran,
    samples: Samples,
    sig: IOSignature,
    fp32_bytes: int,
    int8_bytes: int,
    judging: Judging | None,
    batch_size: int | None,
) -> dict[str, Any]:
    judging = judging or Judging()
    (ref, ref_s), (out, out_s) = ref_run, out_run
    n = len(ref[0]) if ref else 0
    names = [spec.name for spec in sig.outputs]
    refs, outs = dict(zip(names, ref, strict=True)), dict(zip(names, out, strict=True))
    labels = samples.labels[:n] if samples.labels is not None else None
    kinds = output_kinds.resolve(judging.declared, refs, judging.hints, labels is not None)
    outputs = {}
    for name in names:
        score_name = kinds[name].param("scores")
        scores = (refs[score_name], outs[score_name]) if score_name else None
        outputs[name] = compare_output(refs[name], outs[name], kinds[name], scores)
    report: dict[str, Any] = {
        "evaluation_samples": n,
        "outputs": outputs,
        "nonfinite_outputs": sum(o["nonfinite_int8"] for o in outputs.values()),
        "accuracy": _accuracy(labels, kinds, refs, outs),
        "size": {
            "fp32_bytes": fp32_bytes,
            "int8_bytes": int8_bytes,
            "ratio": round(int8_bytes / fp32_bytes, 3) if fp32_bytes else None,  # int8 / fp32
        },
        "latency_ms_per_batch": {
            "fp32": _per_batch_ms(ref_s, samples, sig, batch_size),
            "int8": _per_batch_ms(out_s, samples, sig, batch_size),
            "note": "this host, 1 thread, during evaluation; not the device",
        },
    }
    if judging.metric is not None:
        report["user_metric"] = judging.metric.measure(refs, outs, labels)
    return report


def _per_batch_ms(seconds: float, samples: Samples, sig: IOSignature, batch_size: int | None) -> float:
    batches = sum(1 for _ in samples.batches(sig.inputs, batch_size))
    return round(1000 * seconds / max(batches, 1), 4)


def _accuracy(
    labels: np.ndarray | None,
    kinds: dict[str, OutputKind],
    refs: dict[str, np.ndarray],
    outs: dict[str, np.ndarray],
) -> dict[str, Any] | None:
    """Accuracy on the first classification output (labels are class ids, one per sample)."""
    if labels is None:
        return None
    for name, kind in kinds.items():
        if kind.kind != "classification":
            continue
        r, o = refs[name], outs[name]
        if not (np.isfinite(r).all() and np.isfinite(o).all()):
            return {"output": name, "fp32": None, "int8": None, "drop": None}
        fp32, int8 = metrics.accuracy(r, labels), metrics.accuracy(o, labels)
        return {"output": name, "fp32": fp32, "int8": int8, "drop": fp32 - int8}
    return None
