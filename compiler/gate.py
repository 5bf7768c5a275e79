"""The quality gate an int8 model must pass before it may become a bundle.

Thresholds are absolute and per output (worst output counts): a compiled
model that disagrees with its own float original is refused at build time,
long before a fleet rollout could notice. A figure that could not be measured
(non-finite outputs) is a failure, never a pass. An integer output (labels)
is held to the agreement threshold by exact equality, never to cosine or SNR.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from compiler.errors import GateFailed

__all__ = ["Gate", "GateFailed"]


@dataclass(frozen=True)
class Gate:
    """Minimum quality of int8 vs fp32 on the held-out samples."""

    min_top1_agreement: float = 0.98
    min_cosine: float = 0.99
    min_snr_db: float = 20.0
    max_accuracy_drop: float = 0.02
    max_nonfinite: int = 0
    # NPU budgets (Ethos-U); None = the target's own budget (see compiler.targets).
    max_sram_kib: float | None = None
    max_flash_kib: float | None = None
    max_cpu_fraction: float | None = None

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

    def check(self, report: dict[str, Any]) -> list[str]:
        """Human-readable failures (empty list = pass) for an ``evaluate`` report."""
        failures: list[str] = []
        nonfinite = int(report.get("nonfinite_outputs", 0))
        if nonfinite > self.max_nonfinite:
            failures.append(
                f"{nonfinite} non-finite output values (NaN/inf) in the int8 model, max {self.max_nonfinite}"
            )
        for name, fig in report.get("outputs", {}).items():
            if fig.get("kind") == "integer":  # labels: unchanged or not (see compiler.evaluate)
                self._at_least(
                    failures,
                    name,
                    "exact agreement",
                    fig.get("exact_agreement"),
                    self.min_top1_agreement,
                    ".4f",
                )
                continue
            self._at_least(
                failures, name, "cosine similarity", fig.get("cosine_mean"), self.min_cosine, ".4f"
            )
            self._at_least(failures, name, "SNR (dB)", fig.get("snr_db"), self.min_snr_db, ".1f")
            if "top1_agreement" in fig:
                self._at_least(
                    failures, name, "top-1 agreement", fig["top1_agreement"], self.min_top1_agreement, ".4f"
                )
        acc = report.get("accuracy")
        if acc:
            drop = acc.get("drop")
            if drop is None:
                failures.append(f"accuracy on {acc.get('output')!r} not measurable (non-finite outputs)")
            elif drop > self.max_accuracy_drop:
                failures.append(
                    f"accuracy on {acc['output']!r} drops {drop:.4f} (fp32 {acc['fp32']:.4f} -> "
                    f"int8 {acc['int8']:.4f}), max {self.max_accuracy_drop:.4f}"
                )
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

    @staticmethod
    def _at_least(failures: list[str], output: str, what: str, value: Any, minimum: float, fmt: str) -> None:
        if value is None:
            failures.append(f"{what} of {output!r} not measurable (non-finite outputs)")
        elif value < minimum:
            failures.append(f"{what} of {output!r} is {value:{fmt}}, min {minimum:{fmt}}")
