"""The health gates of a rollout stage: the figures they read from a policy, and the verdicts.

Pure functions over already-aggregated numbers, so the engine stays pure and
each gate is testable on its own. Each gate has a minimum sample below which
it says nothing, and an action when it trips: ``roll_back`` or ``pause`` (a
human decides). The ML gates are relative, never fixed thresholds: latency p95
and the output distribution of the new model are compared with those of the
model it replaces *on the same hardware* (comparable devices).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

from device_agent.protocol import latency_quantile
from fleet_server.policy import ANY_FAILURE, GateAction, Policy

ROLL_BACK = GateAction.ROLL_BACK
PAUSE = GateAction.PAUSE
GATE_ACTIONS = tuple(GateAction)
PSI_EPSILON = 1e-4  # share given to an empty bin, so PSI stays finite


@dataclass(frozen=True)
class Histograms:
    """Summed sketches of one model on one group of devices."""

    latency: tuple[int, ...] = ()
    output: tuple[int, ...] = ()

    @property
    def latency_samples(self) -> int:
        return sum(self.latency)

    @property
    def output_samples(self) -> int:
        return sum(self.output)


@dataclass(frozen=True)
class Trip:
    gate: str
    action: str
    reason: str


def add_counts(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    n = max(len(a), len(b))
    return tuple((a[i] if i < len(a) else 0) + (b[i] if i < len(b) else 0) for i in range(n))


def _sum_columns(rows: Iterable[Sequence[int]]) -> tuple[int, ...]:
    """Bucket-wise sum of histograms of any lengths (missing buckets count 0), column by column
    in C (zip_longest) rather than device by device: the engine merges thousands per tick."""
    present = [r for r in rows if r]
    return tuple(sum(col) for col in zip_longest(*present, fillvalue=0)) if present else ()


def merge(hists: Iterable[Histograms]) -> Histograms:
    hs = list(hists)
    return Histograms(_sum_columns(h.latency for h in hs), _sum_columns(h.output for h in hs))


def p95_us(buckets: Sequence[int]) -> float | None:
    """Upper bound of the bucket holding the 95th percentile (the device's own quantile rule)."""
    return latency_quantile(buckets, 0.95)


def psi(new: Sequence[int], old: Sequence[int]) -> float:
    """Population stability index of two histograms on the same bins (0: identical; > 0.25: a big shift)."""
    n = max(len(new), len(old))
    tn, to = sum(new), sum(old)
    if tn == 0 or to == 0:
        return 0.0
    total = 0.0
    for i in range(n):
        p = max((new[i] if i < len(new) else 0) / tn, PSI_EPSILON)
        q = max((old[i] if i < len(old) else 0) / to, PSI_EPSILON)
        total += (p - q) * math.log(p / q)
    return total


def latency_figures(
    p: Policy, new: Mapping[str, Histograms], baseline: Mapping[str, Histograms]
) -> dict[str, Any]:
    """Worst p95 ratio over the hardware groups where both models have the minimum sample."""
    groups: dict[str, Any] = {}
    worst: float | None = None
    for hw, h in sorted(new.items()):
        base = baseline.get(hw)
        if base is None:
            continue
        if h.latency_samples < p.min_latency_samples or base.latency_samples < p.min_latency_samples:
            continue
        p_new, p_old = p95_us(h.latency), p95_us(base.latency)
        if p_new is None or p_old is None:
            continue
        ratio = p_new / p_old
        groups[hw] = {
            "p95_us": p_new,
            "baseline_p95_us": p_old,
            "ratio": round(ratio, 3),
            "samples": h.latency_samples,
            "baseline_samples": base.latency_samples,
        }
        worst = ratio if worst is None else max(worst, ratio)
    return {"latency_p95_ratio": worst, "latency_groups": groups}


def drift_figures(new: Mapping[str, Histograms], baseline: Mapping[str, Histograms]) -> dict[str, Any]:
    """Output PSI of the new model vs the replaced one, over the hardware groups both were seen on."""
    common = [hw for hw in new if hw in baseline]
    n = merge(new[hw] for hw in common)
    b = merge(baseline[hw] for hw in common)
    return {
        "output_psi": round(psi(n.output, b.output), 4) if n.output_samples and b.output_samples else None,
        "drift_samples": n.output_samples,
        "drift_baseline_samples": b.output_samples,
    }


def _failure_rate(p: Policy, f: Mapping[str, Any], stage_finished: bool) -> Trip | None:
    if f["assigned"] and f["failure_rate"] > f["max_failure_rate"]:
        return Trip(
            "failure_rate",
            p.failure_action,
            f"{f['failed']} of {f['assigned']} devices failed or timed out "
            f"({f['failure_rate']:.3f} > {f['max_failure_rate']:g})",
        )
    return None


def _failures(p: Policy, f: Mapping[str, Any], stage_finished: bool) -> Trip | None:
    if p.max_failures is not None and f["failed"] > p.max_failures:
        return Trip("failures", p.failure_action, f"{f['failed']} devices failed (> {p.max_failures})")
    return None


def _install_success(p: Policy, f: Mapping[str, Any], stage_finished: bool) -> Trip | None:
    if stage_finished and f["assigned"] and f["success_rate"] < p.min_success_rate:
        return Trip(
            "install_success",
            p.failure_action,
            f"only {f['done']} of {f['assigned']} devices serve the model "
            f"({f['success_rate']:.3f} < {p.min_success_rate:g})",
        )
    return None


def _error_rate(p: Policy, f: Mapping[str, Any], stage_finished: bool) -> Trip | None:
    if (
        f["inferences"] > 0
        and f["inferences"] >= f["min_inferences"]
        and f["error_rate"] > f["max_error_rate"]
    ):
        return Trip(
            "error_rate",
            p.error_action,
            f"error rate {f['error_rate']:.3f} over {f['inferences']} inferences "
            f"exceeds {f['max_error_rate']:g}",
        )
    return None


def _latency(p: Policy, f: Mapping[str, Any], stage_finished: bool) -> Trip | None:
    ratio = f.get("latency_p95_ratio")
    if p.max_latency_ratio is not None and ratio is not None and ratio > p.max_latency_ratio:
        return Trip(
            "latency_p95",
            p.latency_action,
            f"p95 latency {ratio:.2f}x the replaced model on comparable devices (> {p.max_latency_ratio:g}x)",
        )
    return None


def _drift(p: Policy, f: Mapping[str, Any], stage_finished: bool) -> Trip | None:
    value = f.get("output_psi")
    if (
        p.max_output_psi is not None
        and value is not None
        and f["drift_samples"] >= p.min_drift_samples
        and f["drift_baseline_samples"] >= p.min_drift_samples
        and value > p.max_output_psi
    ):
        return Trip(
            "output_drift",
            p.drift_action,
            f"output PSI {value:.3f} vs the replaced model exceeds {p.max_output_psi:g}",
        )
    return None


def _shadow(p: Policy, f: Mapping[str, Any], stage_finished: bool) -> Trip | None:
    agreement = f.get("shadow_agreement")
    if (
        p.min_shadow_agreement is not None
        and agreement is not None
        and f["shadow_samples"] >= p.min_shadow_samples
        and agreement < p.min_shadow_agreement
    ):
        return Trip(
            "shadow_agreement",
            p.shadow_action,
            f"shadow top-1 agreement {agreement:.3f} over {f['shadow_samples']} samples "
            f"is below {p.min_shadow_agreement:g}",
        )
    return None


GATES: dict[str, Callable[[Policy, Mapping[str, Any], bool], Trip | None]] = {
    "failure_rate": _failure_rate,
    "failures": _failures,
    "install_success": _install_success,
    "error_rate": _error_rate,
    "latency_p95": _latency,
    "output_drift": _drift,
    "shadow_agreement": _shadow,
}
"""Every gate, in the order ``check`` tries them (install, errors, latency, drift, shadow)."""

SAMPLED_GATES = frozenset({"error_rate", "latency_p95", "output_drift", "shadow_agreement"})
"""Gates whose minimum sample grows with serving time (not with the number of devices assigned).

Pooled over several hardware classes they can fail before the class that drives
them has its own minimum sample: the engine then waits for that class's verdict
instead of stopping classes that demonstrably pass (engine.py, "deferred").
"""


def check(p: Policy, f: Mapping[str, Any], stage_finished: bool) -> Trip | None:
    """The first gate that trips, in order: install, errors, latency, drift, shadow."""
    for gate in GATES.values():
        trip = gate(p, f, stage_finished)
        if trip is not None:
            return trip
    return None


def verdict(p: Policy, f: Mapping[str, Any], stage_finished: bool, gate: str) -> Trip | None:
    """One named gate's verdict (a key of ``GATES``)."""
    return GATES[gate](p, f, stage_finished)


def without_minimums(p: Policy) -> Policy:
    """The policy with every minimum sample waived (1): a point estimate, never a verdict on its own.

    Used to ask "does this hardware class, on what little it has shown, look
    healthy?" when a pooled gate fails; see ``engine.decide``.
    """
    return p.model_copy(
        update={
            "min_inferences": 1,
            "min_latency_samples": 1,
            "min_drift_samples": 1,
            "min_shadow_samples": 1,
        }
    )


def has_evidence(gate: str, f: Mapping[str, Any]) -> bool:
    """Whether the figures hold any data at all for ``gate`` (a class with none neither passes nor fails)."""
    if gate == "error_rate":
        return bool(f["inferences"])
    if gate == "latency_p95":
        return f.get("latency_p95_ratio") is not None
    if gate == "output_drift":
        return f.get("output_psi") is not None
    if gate == "shadow_agreement":
        return bool(f["shadow_samples"])
    return bool(f["assigned"])


def shadow_passed(p: Policy, f: Mapping[str, Any]) -> bool:
    agreement = f.get("shadow_agreement")
    return (
        p.min_shadow_agreement is not None
        and agreement is not None
        and f["shadow_samples"] >= p.min_shadow_samples
        and agreement >= p.min_shadow_agreement
    )


def rate_budget(p: Policy, minutes_running: float, notified_last_minute: int) -> int | None:
    """How many more devices may be notified now (None: unlimited)."""
    if p.rate_per_minute is None:
        return None
    rate = p.rate_per_minute * p.rate_increment_factor ** math.floor(max(minutes_running, 0.0))
    if p.max_rate_per_minute is not None:
        rate = min(rate, p.max_rate_per_minute)
    return max(0, math.floor(rate) - notified_last_minute)


def failure_class(reason: str | None) -> str:
    """``digest_mismatch: ...`` -> ``digest_mismatch``: the reason code a failure's reason starts with.

    Reasons are written ``code`` or ``code: detail`` (the agent's reason code, or ``timed_out`` /
    ``reverted`` from the engine), so the class is what ``Policy.retry_limits`` keys on. A failure
    that came without any reason is class ``failed``, which only the ``*`` limit covers.
    """
    return (reason or "failed").split(":", 1)[0].strip() or "failed"


def retries_allowed(p: Policy, cls: str) -> int:
    return p.retry_limits.get(cls, p.retry_limits.get(ANY_FAILURE, 0))
