"""The golden set a bundle carries, so the device can check its own runtime before it serves.

The gate measured the int8 model on this host with onnxruntime's reference
semantics (or LiteRT). A device computes with its own kernels, delegate or NPU,
and those can differ (an x86 CPU without VNNI saturates in int16; a delegate or
an NPU compiler may fold or reorder). So the bundle takes along a few held-out
samples, their fp32 reference outputs and, per output, the figures of its kind
measured here on exactly those samples with a tolerance: the device computes
the same figures (``device_agent.figures``, shared) on its own runtime and
refuses the swap when one falls past ``compiled - tolerance``
(``device_agent.acceptance``).

Size: at most ``max(64 KiB, 5% of the model file)`` and never more than the
agent fetches for a small signed file (``MAX_FILE``), with 4-32 samples: as many
as fit. A model with several inputs (the agent serves one) or whose first sample
does not fit gets none, and the report says why.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from compiler.data import Samples
from compiler.signature import IOSignature
from device_agent import acceptance

FILE_NAME = "golden.npz"
MIN_BUDGET = 64 * 1024
MODEL_SHARE = 0.05
MAX_FILE = 1 << 20  # the agent's bound on a small signed file (device_agent.downloader.MAX_ENVELOPE)
MAX_SAMPLES = 32
# How far the device may fall below a figure measured here (above, for a figure where lower is
# better). SNR in dB; agreements get at least one sample's worth (1 / samples) on top.
TOLERANCES = {
    "snr_db": 3.0,
    "cosine_mean": 0.01,
    "top1_agreement": 0.0,
    "exact_agreement": 0.0,
    "box_f1": 0.05,
    "box_iou_mean": 0.05,
    "score_agreement": 0.0,
    "mask_iou_mean": 0.05,
    "step_error": 0.05,
}
PER_SAMPLE = frozenset({"top1_agreement", "exact_agreement", "score_agreement"})
# The figures each kind is held to (the gate's KIND_CHECKS, minus the accuracy drop: no labels here).
KIND_FIGURES: dict[str, tuple[tuple[str, bool], ...]] = {
    "integer": (("exact_agreement", True),),
    "classification": (("top1_agreement", True),),
    "regression": (("cosine_mean", True), ("snr_db", True)),
    "detection": (("box_f1", True), ("box_iou_mean", True), ("score_agreement", True)),
    "segmentation": (("mask_iou_mean", True),),
    "sequence": (("step_error", False),),
}

RunFn = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


@dataclass(frozen=True)
class GoldenSet:
    """The file's bytes and the manifest's acceptance section (None, with ``why``, when there is none)."""

    data: bytes | None
    section: dict[str, Any] | None
    why: str = ""


def budget(model_bytes: int) -> int:
    return min(MAX_FILE, max(MIN_BUDGET, int(model_bytes * MODEL_SHARE)))


def build_golden(
    held_out: Samples,
    sig: IOSignature,
    fp32: RunFn,
    int8: RunFn,
    outputs: dict[str, Any],
    model_bytes: int,
) -> GoldenSet:
    """Pick the samples, run both models one sample at a time, measure, and write the file.

    ``outputs``: the evaluation report's per-output figures (their ``kind`` and ``kind_params``).
    """
    if len(sig.inputs) != 1:
        return GoldenSet(None, None, f"the model has {len(sig.inputs)} inputs; the agent serves one")
    name = sig.inputs[0].name
    limit = budget(model_bytes)
    xs = np.asarray(held_out.inputs[name])
    n_max = min(MAX_SAMPLES, len(xs))
    if n_max == 0:
        return GoldenSet(None, None, "no held-out samples")
    names = [o.name for o in sig.outputs]
    first = _per_sample(fp32, name, xs[:1], names)
    one = _npz(xs[:1], {k: _stored(v) for k, v in first.items()})
    if len(one) > limit:  # what the shrinking below ends at, without running and packing the rest first
        return GoldenSet(None, None, f"one sample takes {len(one)} bytes, over the {limit}-byte budget")
    rest = _per_sample(fp32, name, xs[1:n_max], names) if n_max > 1 else None
    refs_all = {k: np.concatenate([v, rest[k]], axis=0) if rest else v for k, v in first.items()}
    n = n_max
    data = _npz(xs[:n], {k: _stored(v[:n]) for k, v in refs_all.items()})
    while len(data) > limit and n > 1:  # shrink in proportion (compression keeps it approximate)
        n = max(1, min(n - 1, n * limit // len(data)))
        data = _npz(xs[:n], {k: _stored(v[:n]) for k, v in refs_all.items()})
    if len(data) > limit:
        return GoldenSet(None, None, f"one sample takes {len(data)} bytes, over the {limit}-byte budget")
    refs = {k: _stored(v[:n]) for k, v in refs_all.items()}
    outs = _per_sample(int8, name, xs[:n], names)
    spec_outputs = {
        o: acceptance.OutputSpec(str(outputs[o]["kind"]), dict(outputs[o].get("kind_params") or {}))
        for o in names
    }
    section_outputs = {o: {"kind": s.kind, "params": s.params} for o, s in spec_outputs.items()}
    found = acceptance.measure(acceptance.Spec(FILE_NAME, n, spec_outputs, ()), refs, outs)
    checks = []
    for o, spec in spec_outputs.items():
        kind = found[o].get("kind", spec.kind)  # an integer-typed output is judged as integer
        for figure, at_least in KIND_FIGURES.get(kind, KIND_FIGURES["regression"]):
            value = found[o].get(figure)
            if value is None:
                continue  # not measurable here: the gate already refused, or the kind lacks it
            tolerance = TOLERANCES.get(figure, 0.05) + (1.0 / n if figure in PER_SAMPLE else 0.0)
            checks.append(
                {
                    "output": o,
                    "figure": figure,
                    "compiled": round(float(value), 6),
                    "tolerance": round(tolerance, 6),
                    "bound": "min" if at_least else "max",
                }
            )
    section = {
        "file": FILE_NAME,
        "samples": n,
        "bytes": len(data),
        "budget_bytes": limit,
        "model_bytes": model_bytes,
        "share_of_model": round(len(data) / model_bytes, 4) if model_bytes else None,
        "input": name,
        "outputs": section_outputs,
        "checks": checks,
        "measured_with": "this host's int8 runtime as the gate ran it, one sample per run",
    }
    return GoldenSet(data, section)


def _stored(ref: np.ndarray) -> np.ndarray:
    return ref.astype(np.float32) if ref.dtype.kind == "f" else ref


def _per_sample(run: RunFn, name: str, xs: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for i in range(len(xs)):
        for part, out in zip(parts, run({name: xs[i : i + 1]}), strict=True):
            part.append(np.asarray(out))
    return {k: np.concatenate(p, axis=0) for k, p in zip(names, parts, strict=True)}


def _npz(inputs: np.ndarray, refs: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    arrays = {acceptance.INPUT_KEY: inputs, **{acceptance.REF_PREFIX + k: v for k, v in refs.items()}}
    np.savez_compressed(buf, **arrays)  # type: ignore[arg-type]
    return buf.getvalue()


__all__ = ["FILE_NAME", "GoldenSet", "budget", "build_golden"]
