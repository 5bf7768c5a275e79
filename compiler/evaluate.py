"""Measure the int8 model against the float model on held-out samples.

Both models run in real onnxruntime CPU sessions on the same feeds. Figures
per float output: mean and worst per-sample cosine similarity, SNR in dB over
the whole output (signal = fp32, noise = int8 - fp32), top-1 agreement for
classifier-shaped outputs (rank 2, last dim > 1), and non-finite counts.
An integer output (a class label, an index) has no geometry to measure: a
cosine of two labels is 1.0 whenever their signs agree and an SNR of labels
rewards near misses, so it is compared for exact equality instead
(``kind: "integer"``, the share of samples whose output is unchanged).
With labels, accuracy of fp32 and int8 on the first classifier output.

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

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from compiler.data import Samples
from compiler.errors import InvalidModel, QuantizationError
from compiler.signature import IOSignature

SNR_CAP_DB = 120.0


def session(path: Path, *, reference: bool = False) -> ort.InferenceSession:
    """A CPU session with one intra-op thread: deterministic and comparable fp32 vs int8.

    ``reference``: no graph optimization, so a QDQ model runs with the reference semantics instead of
    this host's fused integer kernels (see the module docstring).
    """
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.log_severity_level = 3
    if reference:
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def run_all(sess: ort.InferenceSession, samples: Samples, sig: IOSignature) -> tuple[list[np.ndarray], float]:
    """Run every batch; return outputs concatenated along the sample axis, and seconds spent."""
    names = [o.name for o in sig.outputs]
    parts: list[list[np.ndarray]] = [[] for _ in names]
    elapsed = 0.0
    for feed in samples.batches(sig.inputs):
        start = time.perf_counter()
        results = sess.run(names, feed)
        elapsed += time.perf_counter() - start
        for part, result in zip(parts, results, strict=True):
            part.append(np.asarray(result))
    return [np.concatenate(p, axis=0) for p in parts], elapsed


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


def is_integer(output: np.ndarray) -> bool:
    """Labels, indices, masks: the float model's output is integer (or boolean) typed."""
    return output.dtype.kind in "biu"


def compare_integer_output(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """Exact agreement of an integer output: per sample (the whole output equal) and per element."""
    same = ref.reshape(len(ref), -1) == out.reshape(len(out), -1)
    per_sample = same.all(axis=1)
    return {
        "kind": "integer",
        "shape": list(ref.shape[1:]),
        "nonfinite_fp32": 0,
        "nonfinite_int8": 0,
        "exact_agreement": float(per_sample.mean()) if len(per_sample) else None,
        "element_agreement": float(same.mean()) if same.size else None,
        "changed_samples": int((~per_sample).sum()),
    }


def compare_output(ref: np.ndarray, out: np.ndarray) -> dict[str, Any]:
    """Similarity figures of one output (int8 ``out`` against fp32 ``ref``)."""
    if is_integer(ref):
        return compare_integer_output(ref, out)
    ref64, out64 = ref.astype(np.float64), out.astype(np.float64)
    figures: dict[str, Any] = {
        "kind": "float",
        "shape": list(ref.shape[1:]),
        "nonfinite_fp32": int(ref.size - np.isfinite(ref64).sum()),
        "nonfinite_int8": int(out.size - np.isfinite(out64).sum()),
    }
    finite = figures["nonfinite_fp32"] == 0 and figures["nonfinite_int8"] == 0
    if finite:
        a, b = ref64.reshape(len(ref64), -1), out64.reshape(len(out64), -1)
        norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
        both_zero = (np.linalg.norm(a, axis=1) == 0) & (np.linalg.norm(b, axis=1) == 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            cos = np.where(both_zero, 1.0, (a * b).sum(axis=1) / norms)
        cos = np.nan_to_num(cos, nan=0.0)  # one side all-zero, the other not: no similarity
        signal, noise = float((ref64**2).sum()), float(((ref64 - out64) ** 2).sum())
        snr = SNR_CAP_DB if noise == 0 else min(SNR_CAP_DB, 10 * math.log10(max(signal, 1e-300) / noise))
        figures.update(cosine_mean=float(cos.mean()), cosine_min=float(cos.min()), snr_db=snr)
    else:
        figures.update(cosine_mean=None, cosine_min=None, snr_db=None)
    if is_classifier(ref):
        agree = np.argmax(ref, axis=-1) == np.argmax(out, axis=-1)
        figures["top1_agreement"] = float(agree.mean()) if finite else None
    figures["error_histogram"] = error_histogram(ref, out)
    return figures


def is_classifier(output: np.ndarray) -> bool:
    """[N, classes] scores. Rank > 2 outputs (detector boxes, [1,1,1,4] crops) are not class scores."""
    return output.ndim == 2 and output.shape[-1] > 1


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


def evaluate(fp32_path: Path, int8_path: Path, samples: Samples, sig: IOSignature) -> dict[str, Any]:
    """Run both ONNX models on ``samples`` and return the JSON-serialisable comparison report."""
    try:
        fp32_sess = session(fp32_path)
    except Exception as exc:  # ORT raises its own Fail/InvalidGraph/NotImplemented classes
        raise InvalidModel(f"onnxruntime cannot load the float model: {exc}") from exc
    try:
        int8_sess = session(int8_path, reference=True)
    except Exception as exc:
        raise QuantizationError(f"onnxruntime cannot load the int8 model: {exc}") from exc
    names = [o.name for o in sig.outputs]
    return evaluate_runners(
        lambda feed: [np.asarray(r) for r in fp32_sess.run(names, feed)],
        lambda feed: [np.asarray(r) for r in int8_sess.run(names, feed)],
        samples,
        sig,
        Path(fp32_path).stat().st_size,
        Path(int8_path).stat().st_size,
    )


RunFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def _run(fn: RunFn, samples: Samples, sig: IOSignature) -> tuple[list[np.ndarray], float]:
    parts: list[list[np.ndarray]] = [[] for _ in sig.outputs]
    elapsed = 0.0
    for feed in samples.batches(sig.inputs):
        start = time.perf_counter()
        results = fn(feed)
        elapsed += time.perf_counter() - start
        for part, result in zip(parts, results, strict=True):
            part.append(np.asarray(result))
    return [np.concatenate(p, axis=0) for p in parts], elapsed


def evaluate_runners(
    fp32: RunFn, int8: RunFn, samples: Samples, sig: IOSignature, fp32_bytes: int, int8_bytes: int
) -> dict[str, Any]:
    """Compare any two float-in/float-out model runs (ONNX or TFLite) on ``samples``."""
    try:
        ref, ref_s = _run(fp32, samples, sig)
    except Exception as exc:
        raise InvalidModel(f"the float model fails on the evaluation samples: {exc}") from exc
    try:
        out, out_s = _run(int8, samples, sig)
    except Exception as exc:
        raise QuantizationError(f"the int8 model fails on the evaluation samples: {exc}") from exc

    n = len(ref[0]) if ref else 0
    outputs = {spec.name: compare_output(r, o) for spec, r, o in zip(sig.outputs, ref, out, strict=True)}
    report: dict[str, Any] = {
        "evaluation_samples": n,
        "outputs": outputs,
        "nonfinite_outputs": sum(o["nonfinite_int8"] for o in outputs.values()),
        "accuracy": _accuracy(samples, sig, ref, out, n),
        "size": {
            "fp32_bytes": fp32_bytes,
            "int8_bytes": int8_bytes,
            "ratio": round(int8_bytes / fp32_bytes, 3) if fp32_bytes else None,  # int8 / fp32
        },
        "latency_ms_per_batch": {
            "fp32": _per_batch_ms(ref_s, samples, sig),
            "int8": _per_batch_ms(out_s, samples, sig),
            "note": "this host, 1 thread, during evaluation; not the device",
        },
    }
    return report


def _per_batch_ms(seconds: float, samples: Samples, sig: IOSignature) -> float:
    batches = sum(1 for _ in samples.batches(sig.inputs))
    return round(1000 * seconds / max(batches, 1), 4)


def _accuracy(
    samples: Samples, sig: IOSignature, ref: list[np.ndarray], out: list[np.ndarray], n: int
) -> dict[str, Any] | None:
    """Accuracy on the first classifier output whose sample axis lines up with the labels."""
    if samples.labels is None:
        return None
    labels = samples.labels[:n]
    for spec, r, o in zip(sig.outputs, ref, out, strict=True):
        if r.ndim == 2 and is_classifier(r):
            fp32 = float((np.argmax(r, axis=-1) == labels).mean())
            int8 = float((np.argmax(o, axis=-1) == labels).mean())
            if not (np.isfinite(r).all() and np.isfinite(o).all()):
                return {"output": spec.name, "fp32": None, "int8": None, "drop": None}
            return {"output": spec.name, "fp32": fp32, "int8": int8, "drop": fp32 - int8}
    return None
