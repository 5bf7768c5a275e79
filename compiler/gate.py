"""The quality gate an int8 model must pass before it may become a bundle.

Thresholds are absolute and per output; each output is held to the figures of
its kind (``compiler.output_kinds``), never to another kind's: a classifier to
top-1 agreement (and accuracy with labels), a regressor to SNR and cosine, a
detector to box matching and score agreement, a segmenter to mask IoU, a
sequence output to its error after N steps, an integer (label) output to exact
agreement. A user metric can add to those or replace them (``metric_only``).
A figure that could not be measured (non-finite outputs) is a failure, never a
pass. ``decide`` lists every check and names the one that decided: the worst
failure, or on a pass the check with the least margin.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from compiler.errors import GateFailed

__all__ = ["Check", "Gate", "GateFailed"]


@dataclass(frozen=True)
class Check:
    """One figure of one output held to one threshold."""

    output: str
    what: str  # "SNR (dB)", "top-1 agreement"...
    figure: str  # the report key: snr_db, top1_agreement...
    value: float | None
    threshold: float
    at_least: bool  # True: value >= threshold passes; False: value <= threshold passes
    fmt: str = ".4f"

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.threshold if self.at_least else self.value <= self.threshold

    @property
    def margin(self) -> float:
        """Relative distance to the threshold: > 0 passes, < 0 fails, -inf when not measurable."""
        if self.value is None:
            return float("-inf")
        gap = self.value - self.threshold if self.at_least else self.threshold - self.value
        return gap / max(abs(self.threshold), 1e-9)

    def message(self) -> str:
        if self.value is None:
            return f"{self.what} of {self.output!r} not measurable (non-finite outputs)"
        bound = "min" if self.at_least else "max"
        return (
            f"{self.what} of {self.output!r} is {self.value:{self.fmt}}, {bound} {self.threshold:{self.fmt}}"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "output": self.output,
            "figure": self.figure,
            "value": self.value,
            "threshold": self.threshold,
            "bound": "min" if self.at_least else "max",
            "passed": self.passed,
        }


# kind -> (report key, label, Gate field, at_least, format) applied to outputs of that kind
KIND_CHECKS: dict[str, tuple[tuple[str, str, str, bool, str], ...]] = {
    "integer": (("exact_agreement", "exact agreement", "min_top1_agreement", True, ".4f"),),
    "classification": (("top1_agreement", "top-1 agreement", "min_top1_agreement", True, ".4f"),),
    "regression": (
        ("cosine_mean", "cosine similarity", "min_cosine", True, ".4f"),
        ("snr_db", "SNR (dB)", "min_snr_db", True, ".1f"),
    ),
    "detection": (
        ("box_f1", "box match F1", "min_box_f1", True, ".4f"),
        ("box_iou_mean", "matched box IoU", "min_box_iou", True, ".4f"),
        ("score_agreement", "score agreement", "min_score_agreement", True, ".4f"),
    ),
    "segmentation": (("mask_iou_mean", "mask IoU", "min_mask_iou", True, ".4f"),),
    # A detection's scores output: judged by that detection's figures, not on its own.
    "scores": (),
    "sequence": (("step_error", "relative error after N steps", "max_sequence_error", False, ".4f"),),
}
# Reports without kinds (written before kinds existed) hold every float output to all of these.
UNKINDED = (
    *KIND_CHECKS["regression"],
    ("top1_agreement", "top-1 agreement", "min_top1_agreement", True, ".4f"),
)


@dataclass(frozen=True)
class Gate:
    """Minimum quality of int8 vs fp32 on the held-out samples."""

    min_top1_agreement: float = 0.98
    min_cosine: float = 0.99
    min_snr_db: float = 20.0
    max_accuracy_drop: float = 0.02
    max_nonfinite: int = 0
    min_box_f1: float = 0.9
    min_box_iou: float = 0.8
    min_score_agreement: float = 0.95
    min_mask_iou: float = 0.85
    max_sequence_error: float = 0.2
    # A user metric (``module:function``, see compiler.user_metric): higher is better.
    metric: str | None = None
    metric_threshold: float | None = None
    metric_only: bool = False  # the metric replaces the kinds' figures (NaN and NPU checks stay)
    # NPU budgets (Ethos-U); None = the target's own budget (see compiler.targets).
    max_sram_kib: float | None = None
    max_flash_kib: float | None = None
    max_cpu_fraction: float | None = None

    def __post_init__(self) -> None:
        if (self.metric is None) != (self.metric_threshold is None):
            raise ValueError("a user metric needs both metric (module:function) and metric_threshold")
        if self.metric_only and self.metric is None:
            raise ValueError("metric_only needs a metric")

    def budgets(self, target_budgets: dict[str, float]) -> dict[str, float]:
        """The target's budgets with this gate's overrides applied."""
        merged = dict(target_budgets)
        for key in ("max_sram_kib", "max_flash_kib", "max_cpu_fraction"):
            value = getattr(self, key)
            if value is not None:
                merged[key] = float(value)
        return merged

    def thresholds(self) -> dict[str, Any]:
        return asdict(self)

    def quality_checks(self, report: dict[str, Any]) -> list[Check]:
        """The per-output, accuracy and user-metric checks of an ``evaluate`` report."""
        checks: list[Check] = []
        if not self.metric_only:
            for name, fig in report.get("outputs", {}).items():
                kind = fig.get("kind")
                for key, what, field, at_least, fmt in KIND_CHECKS.get(kind, UNKINDED):
                    if kind not in KIND_CHECKS and key not in fig:
                        continue  # an old report: top-1 only where it was measured
                    checks.append(Check(name, what, key, fig.get(key), getattr(self, field), at_least, fmt))
            acc = report.get("accuracy")
            if acc:
                out = f"{acc.get('output')}"
                checks.append(
                    Check(
                        out, "accuracy drop", "accuracy_drop", acc.get("drop"), self.max_accuracy_drop, False
                    )
                )
        if self.metric is not None and self.metric_threshold is not None:
            value = (report.get("user_metric") or {}).get("value")
            checks.append(
                Check("(all)", f"metric {self.metric}", "user_metric", value, self.metric_threshold, True)
            )
        return checks

    def decide(self, report: dict[str, Any]) -> dict[str, Any]:
        """Verdict, failures, every check, and the check that decided (worst failure / least margin)."""
        checks = self.quality_checks(report)
        failures = self.check(report)
        deciding = min(checks, key=lambda c: c.margin, default=None)
        decided_by: dict[str, Any] | None = None
        if deciding is not None:
            decided_by = deciding.to_dict() | {"kind": _kind(report, deciding.output)}
        if failures and (deciding is None or deciding.passed):
            # Every quality figure passed: a NaN count or an NPU budget refused the model.
            decided_by = {"output": None, "figure": "budget", "message": failures[0], "passed": False}
        return {
            "thresholds": self.thresholds(),
            "verdict": "failed" if failures else "passed",
            "failures": failures,
            "decided_by": decided_by,
            "checks": [c.to_dict() for c in checks],
        }

    def check(self, report: dict[str, Any]) -> list[str]:
        """Human-readable failures (empty list = pass) for an ``evaluate`` report."""
        failures: list[str] = []
        nonfinite = int(report.get("nonfinite_outputs", 0))
        if nonfinite > self.max_nonfinite:
            failures.append(
                f"{nonfinite} non-finite output values (NaN/inf) in the int8 model, max {self.max_nonfinite}"
            )
        for c in self.quality_checks(report):
            if c.passed:
                continue
            if c.figure == "accuracy_drop":
                acc = report["accuracy"]
                if c.value is None:
                    failures.append(f"accuracy on {acc.get('output')!r} not measurable (non-finite outputs)")
                else:
                    failures.append(
                        f"accuracy on {acc['output']!r} drops {c.value:.4f} (fp32 {acc['fp32']:.4f} -> "
                        f"int8 {acc['int8']:.4f}), max {self.max_accuracy_drop:.4f}"
                    )
            else:
                failures.append(c.message())
        failures += self._npu_failures(report)
        return failures

    def _npu_failures(self, report: dict[str, Any]) -> list[str]:
        failures: list[str] = []
        npu = report.get("npu")
        if npu:
            budgets, vela = npu.get("budgets", {}), npu.get("vela", {})
            for key, figure, unit in (
                ("max_sram_kib", "sram_kib", "KiB SRAM"),
                ("max_flash_kib", "flash_kib", "KiB flash"),
                ("max_flash_kib", "dram_kib", "KiB DRAM"),
            ):
                if key in budgets and vela.get(figure, 0) > budgets[key]:
                    failures.append(f"Vela needs {vela[figure]:.1f} {unit}, budget {budgets[key]:.1f}")
            if "max_cpu_fraction" in budgets and vela.get("cpu_fraction", 0) > budgets["max_cpu_fraction"]:
                on_cpu = ", ".join(f"{op} x{n}" for op, n in vela.get("cpu_ops_by_type", {}).items())
                failures.append(
                    f"{vela['cpu_fraction']:.1%} of ops stay on the CPU ({on_cpu}), "
                    f"max {budgets['max_cpu_fraction']:.1%}"
                )
        return failures


def _kind(report: dict[str, Any], output: str) -> str | None:
    fig = report.get("outputs", {}).get(output)
    return fig.get("kind") if isinstance(fig, dict) else None
