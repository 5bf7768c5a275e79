"""On-device acceptance: does this device's runtime compute what the compiler measured?

The compiler judges an int8 model by its reference semantics on the build host.
What a device actually runs can differ: fused integer kernels (x86 without VNNI
saturates in int16), a delegate, an NPU compiler. So each bundle carries a small
signed golden set (held-out inputs and the fp32 reference outputs, one file
listed in the manifest) and, in the signed quantization report, an
``acceptance`` section: every output's kind, and the figures the compiler
measured on those same samples with the tolerance it allows the device. After
the new model is loaded and warmed, before the swap, the agent runs the golden
set on it and holds each figure to ``compiled - tolerance`` (``+`` for a figure
where lower is better). Below that the swap is refused (``acceptance_failed``,
with the figures) and the old model keeps serving.

This module is pure: the spec from the manifest, the figures from the outputs
(:func:`device_agent.figures.of_kind`, the compiler's own functions), and the
verdict. Running the model and reading the file is the shell's
(:mod:`device_agent.reconcile`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent import figures, npy

SECTION = "acceptance"  # the key in the manifest's quantization report
INPUT_KEY = "input"  # the golden file's input array (sample axis first)
REF_PREFIX = "ref:"  # + output name: the fp32 reference outputs


class MalformedAcceptance(ValueError):
    """The signed acceptance section or golden file does not have the shape this agent reads."""


@dataclass(frozen=True)
class Bound:
    """One figure of one output, as measured at compile time, and how far the device may fall."""

    output: str
    figure: str  # a key of device_agent.figures' results: snr_db, top1_agreement...
    compiled: float
    tolerance: float
    at_least: bool  # True: higher is better (the device must reach compiled - tolerance)

    @property
    def limit(self) -> float:
        return self.compiled - self.tolerance if self.at_least else self.compiled + self.tolerance

    def holds(self, value: float | None) -> bool:
        if value is None or not math.isfinite(value):
            return False
        return value >= self.limit if self.at_least else value <= self.limit


@dataclass(frozen=True)
class OutputSpec:
    kind: str
    params: dict[str, str]


@dataclass(frozen=True)
class Spec:
    """The acceptance section of a signed manifest."""

    file: str  # the golden set's file name in the bundle
    samples: int
    outputs: dict[str, OutputSpec]  # in the model's output order
    bounds: tuple[Bound, ...]

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any]) -> Spec | None:
        """The spec a manifest (its dict form) carries; None for a bundle without a golden set."""
        section = (manifest.get("quantization") or {}).get(SECTION)
        if not section:
            return None
        try:
            outputs = {
                str(name): OutputSpec(
                    str(o["kind"]), {str(k): str(v) for k, v in (o.get("params") or {}).items()}
                )
                for name, o in section["outputs"].items()
            }
            bounds = tuple(
                Bound(
                    str(b["output"]),
                    str(b["figure"]),
                    float(b["compiled"]),
                    float(b["tolerance"]),
                    b["bound"] == "min",
                )
                for b in section["checks"]
            )
            spec = cls(str(section["file"]), int(section["samples"]), outputs, bounds)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MalformedAcceptance(f"acceptance section is malformed: {exc}") from exc
        if not outputs or spec.samples <= 0 or any(b.output not in outputs for b in bounds):
            raise MalformedAcceptance("acceptance section names no outputs, no samples, or unknown outputs")
        if spec.file not in {f.get("path") for f in manifest.get("files") or []}:
            raise MalformedAcceptance(f"golden set {spec.file!r} is not among the manifest's signed files")
        return spec


@dataclass(frozen=True)
class Golden:
    """The golden set's arrays: the inputs and each output's fp32 reference."""

    inputs: np.ndarray
    refs: dict[str, np.ndarray]

    @classmethod
    def parse(cls, data: bytes, spec: Spec) -> Golden:
        """Read the golden file (an ``.npz`` without pickles) and check it against ``spec``."""
        try:
            with npy.npz(data) as archive:
                inputs = np.asarray(archive[INPUT_KEY])
                refs = {name: np.asarray(archive[REF_PREFIX + name]) for name in spec.outputs}
        except (KeyError, ValueError, OSError, EOFError) as exc:
            raise MalformedAcceptance(f"golden set is unreadable: {exc}") from exc
        if len(inputs) != spec.samples or any(len(r) != spec.samples for r in refs.values()):
            raise MalformedAcceptance(f"golden set does not hold the {spec.samples} samples its spec lists")
        return cls(inputs, refs)


def run_golden(
    run: Callable[[np.ndarray], list[np.ndarray]], golden: Golden, names: list[str]
) -> dict[str, np.ndarray]:
    """The model's outputs for every golden input, one sample per call (as the device serves)."""
    parts: list[list[np.ndarray]] = [[] for _ in names]
    for i in range(len(golden.inputs)):
        for part, out in zip(parts, run(golden.inputs[i : i + 1]), strict=False):
            part.append(np.asarray(out))
    return {name: np.concatenate(part, axis=0) for name, part in zip(names, parts, strict=True)}


def measure(
    spec: Spec, refs: Mapping[str, np.ndarray], outs: Mapping[str, np.ndarray]
) -> dict[str, dict[str, Any]]:
    """Each output's figures for its kind, the device's outputs against the fp32 references."""
    measured: dict[str, dict[str, Any]] = {}
    for name, out_spec in spec.outputs.items():
        score = out_spec.params.get("scores")
        scores = (refs[score], outs[score]) if score and score in refs and score in outs else None
        if name not in outs:
            measured[name] = {}
            continue
        measured[name] = figures.of_kind(out_spec.kind, out_spec.params, refs[name], outs[name], scores)
    return measured


@dataclass(frozen=True)
class Verdict:
    """The acceptance check's outcome and every figure it held, for the fleet."""

    passed: bool
    samples: int
    checks: tuple[dict[str, Any], ...]

    @property
    def detail(self) -> str:
        failed = [c for c in self.checks if not c["passed"]] or list(self.checks)
        parts = [
            f"{c['output']}.{c['figure']} {_fmt(c['measured'])} "
            f"(compiled {_fmt(c['compiled'])}, limit {_fmt(c['limit'])})"
            for c in failed
        ]
        head = "acceptance passed" if self.passed else "acceptance failed"
        return f"{head} on {self.samples} golden samples: " + "; ".join(parts)

    def to_dict(self) -> dict[str, Any]:
        return {"passed": self.passed, "samples": self.samples, "checks": list(self.checks)}


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def judge(spec: Spec, measured: Mapping[str, Mapping[str, Any]]) -> Verdict:
    """Hold every bound to what the device measured; a figure it could not measure fails."""
    checks = []
    for b in spec.bounds:
        raw = measured.get(b.output, {}).get(b.figure)
        value = float(raw) if isinstance(raw, (int, float)) else None
        checks.append(
            {
                "output": b.output,
                "figure": b.figure,
                "measured": value,
                "compiled": b.compiled,
                "limit": round(b.limit, 6),
                "bound": "min" if b.at_least else "max",
                "passed": b.holds(value),
            }
        )
    return Verdict(all(c["passed"] for c in checks), spec.samples, tuple(checks))


__all__ = [
    "INPUT_KEY",
    "REF_PREFIX",
    "SECTION",
    "Bound",
    "Golden",
    "MalformedAcceptance",
    "OutputSpec",
    "Spec",
    "Verdict",
    "judge",
    "measure",
    "run_golden",
]
