"""The health gates of a rollout stage: the figures they read from a policy, and the verdicts.

Pure functions over already-aggregated numbers, so the engine stays pure and
each gate is testable on its own. Each gate has a minimum sample below which
it says nothing, and an action when it trips: ``roll_back`` or ``pause`` (a
human decides). The ML gates are relative, never fixed thresholds: latency p95,
the output distribution and the accuracy on labelled predictions of the new
model are compared with those of the model it replaces *on the same hardware*
(comparable devices).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import zip_longest
from typing import Any

from device_agent.protocol import latency_quantile
from fleet_server import accuracy_stats
from fleet_server.policy import ANY_FAILURE, DELIVERY_FAILURES, GateAction, Policy

ROLL_BACK = GateAction.ROLL_BACK
PAUSE = GateAction.PAUSE
GATE_ACTIONS = tuple(GateAction)
PSI_EPSILON = 1e-4  # share given to an empty bin, so PSI stays finite


@dataclass(frozen=True)
class Histograms:
    """Summed sketches and label counts of one model on one group of devices."""

    latency: tuple[int, ...] = ()
    output: tuple[int, ...] = ()
    labels: int = 0  # predictions an app on the device labelled with the truth
    labels_correct: int = 0  # ... that the model got right

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
    return Histograms(
        _sum_columns(h.latency for h in hs),
        _sum_columns(h.output for h in hs),
        sum(h.labels for h in hs),
        sum(h.labels_correct for h in hs),
    )


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


def accuracy_alpha(p: Policy, cohorts: int) -> float:
    """The false-alarm rate each accuracy verdict may spend: all of ``accuracy_alpha`` with one
    hardware class; with several, an even split (Bonferroni) over one verdict per class and the
    pooled one, so the chance that any of them trips while the model is no worse stays within
    ``accuracy_alpha`` for the whole rollout."""
    return p.accuracy_alpha if cohorts <= 1 else p.accuracy_alpha / (cohorts + 1)


def accuracy_figures(
    p: Policy, new: Mapping[str, Histograms], baseline: Mapping[str, Histograms], alpha: float
) -> dict[str, Any]:
    """Accuracy of the new model vs the replaced one on the hardware groups both have labels on.

    ``alpha``: what this verdict may spend (``accuracy_alpha``). The figures: each model's
    accuracy with its 95% Wilson interval (to read, fixed-sample) and label count, the change
    and its always-valid upper bound, the always-valid p-value, and the same per group.
    """
    assert p.max_accuracy_drop is not None
    groups = {
        hw: accuracy_stats.Group(h.labels, h.labels_correct, base.labels, base.labels_correct)
        for hw, h in sorted(new.items())
        if (base := baseline.get(hw)) is not None
    }
    design = accuracy_stats.design_information(p.min_labels)
    c = accuracy_stats.compare(groups.values(), p.max_accuracy_drop, alpha, design)
    out: dict[str, Any] = {
        "labels": sum(h.labels for h in new.values()),
        "baseline_labels": sum(g.baseline_labels for g in groups.values()),
        "accuracy_alpha": alpha,
        "accuracy": None,
        "accuracy_p_value": None,
    }
    if c is None:
        return out
    per_group = {}
    for hw, g in groups.items():
        if g.labels and g.baseline_labels:
            one = accuracy_stats.compare([g], p.max_accuracy_drop, alpha, design)
            assert one is not None
            per_group[hw] = {
                "labels": g.labels,
                "accuracy": round(one.accuracy, 4),
                "baseline_labels": g.baseline_labels,
                "baseline_accuracy": round(one.baseline_accuracy, 4),
                "change": round(one.change, 4),
            }
    out.update(
        {
            "labels": c.labels,
            "baseline_labels": c.baseline_labels,
            "accuracy": round(c.accuracy, 4),
            "accuracy_ci95": _rounded(accuracy_stats.wilson(c.correct, c.labels)),
            "baseline_accuracy": round(c.baseline_accuracy, 4),
            "baseline_accuracy_ci95": _rounded(accuracy_stats.wilson(c.baseline_correct, c.baseline_labels)),
            "accuracy_change": round(c.change, 4),
            "accuracy_change_upper": round(c.change_upper, 4),
            "accuracy_p_value": c.p_value,
            "accuracy_groups": per_group,
        }
    )
    return out


def _rounded(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [round(interval[0], 4), round(interval[1], 4)]


def labels_wanted(p: Policy, f: Mapping[str, Any]) -> str | None:
    """What the accuracy gate still waits for before it can judge (None: nothing, or no gate).

    A stage does not finish while this says something: without the labels the gate has not
    judged, and promoting then would be promoting blind.
    """
    if p.max_accuracy_drop is None:
        return None
    short = []
    if f["labels"] < p.min_labels:
        short.append(f"{f['labels']} labelled predictions of the new model")
    if f["baseline_labels"] < p.min_labels:
        short.append(f"{f['baseline_labels']} of the replaced model on the same hardware")
    if not short:
        return None
    return f"{' and '.join(short)} (the accuracy gate needs {p.min_labels} of each)"


def delivery_failed(f: Mapping[str, Any]) -> int:
    """Failed devices whose class says the delivery path failed (``policy.DELIVERY_FAILURES``).

    Figures recorded before they carried the count hold none (read by the console)."""
    return int(f.get("delivery_failed", 0))


DELIVERY_HOLD = "the delivery path failed, not the model"
"""Every delivery-gate reason says this, and so does a device held by it (``cohort ... paused:
<reason>``): what tells a resume which holds are the delivery path's to lift."""


def held_for_delivery(reason: str | None) -> bool:
    """Whether a held device's reason says the delivery gate held its class (no model gate did)."""
    return reason is not None and DELIVERY_HOLD in reason


def _delivery_trip(p: Policy, f: Mapping[str, Any], why: str) -> Trip:
    """The install gates tripped only once the devices that could not fetch the release count."""
    classes = f.get("failure_classes") or {}
    listed = ", ".join(f"{c} {n}" for c, n in sorted(classes.items()) if c in DELIVERY_FAILURES)
    return Trip(
        "delivery",
        p.delivery_action,
        f"{delivery_failed(f)} of {f['assigned']} devices could not fetch the release"
        f"{f' ({listed})' if listed else ''}: {DELIVERY_HOLD} ({why})",
    )


def _besides(n: int) -> str:
    return f"; {n} more could not fetch the release" if n else ""


# The install gates judge the devices' own failures: devices that could not fetch the release
# say nothing about the model, so they are set aside from the rates and counts. The ``delivery``
# gate, tried after every other gate, trips only when the install gates would trip once those
# devices count too: a hold (``delivery_action``, pause by default) rather than a roll back that
# would send every device another directive down the same failing path. Last, so that no gate
# that judges the model (errors, latency, drift, shadow, accuracy) is hidden behind a hold, and
# an approved hold silences only itself.


def _own_failure_rate(f: Mapping[str, Any]) -> tuple[int, int, float]:
    """(own failures, devices that fetched, their failure rate)."""
    undelivered = delivery_failed(f)
    fetched = f["assigned"] - undelivered
    own = f["failed"] - undelivered
    return own, fetched, own / fetched if fetched else 0.0


def _failure_rate(p: Policy, f: Mapping[str, Any], stage_finished: bool) -> Trip | None:
    if not f["assigned"]:
        return None
    own, fetched, rate = _own_failure_rate(f)
    if rate > f["max_failure_rate"]:
        return Trip(
            "failure_rate",
            p.failure_action,
            f"{own} of {fetched} devices failed or timed out "
            f"({rate:.3f} > {f['max_failure_rate']:g}){_besides(delivery_failed(f))}",
        )
    return None


def _failures(p: Policy, f: Mapping[str, Any], stage_finished: bool) -> Trip | None:
    if p.max_failures is None:
        return None
    undelivered = delivery_failed(f)
    own = f["failed"] - undelivered
    if own > p.max_failures:
        return Trip(
            "failures", p.failure_action, f"{own} devices failed (> {p.max_failures}){_besides(undelivered)}"
        )
    return None


def _install_success(p: Policy, f: Mapping[str, Any], stage_finished: bool) -> Trip | None:
    if not (stage_finished and f["assigned"]):
        return None
    undelivered = delivery_failed(f)
    fetched = f["assigned"] - undelivered
    rate = f["done"] / fetched if fetched else 1.0
    if rate < p.min_success_rate:
        return Trip(
            "install_success",
            p.failure_action,
            f"only {f['done']} of {fetched} devices serve the model "
            f"({rate:.3f} < {p.min_success_rate:g}){_besides(undelivered)}",
        )
    return None


def _delivery(p: Policy, f: Mapping[str, Any], stage_finished: bool) -> Trip | None:
    """The install gates' limits with every failure counted, the undelivered ones included."""
    if not f["assigned"] or not delivery_failed(f):
        return None
    if f["failure_rate"] > f["max_failure_rate"]:
        return _delivery_trip(p, f, f"failure rate {f['failure_rate']:.3f} > {f['max_failure_rate']:g}")
    if p.max_failures is not None and f["failed"] > p.max_failures:
        return _delivery_trip(p, f, f"{f['failed']} devices failed > {p.max_failures}")
    if stage_finished and f["success_rate"] < p.min_success_rate:
        return _delivery_trip(
            p,
            f,
            f"only {f['done']} of {f['assigned']} serve the model,"
            f" {f['success_rate']:.3f} < {p.min_success_rate:g}",
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


def _accuracy(p: Policy, f: Mapping[str, Any], stage_finished: bool) -> Trip | None:
    p_value = f.get("accuracy_p_value")
    if (
        p.max_accuracy_drop is None
        or p_value is None
        or f["labels"] < p.min_labels
        or f["baseline_labels"] < p.min_labels
        or p_value > f["accuracy_alpha"]
    ):
        return None
    return Trip(
        "accuracy",
        p.accuracy_action,
        f"accuracy {f['accuracy']:.1%} over {f['labels']} labels vs {f['baseline_accuracy']:.1%} over "
        f"{f['baseline_labels']} for the replaced model on the same hardware: a change of "
        f"{f['accuracy_change'] * 100:+.1f} points (at most {f['accuracy_change_upper'] * 100:+.1f} at "
        f"{1 - f['accuracy_alpha']:.1%}, always valid) is a loss beyond {p.max_accuracy_drop * 100:g} "
        f"points (p = {p_value:.2g} <= {f['accuracy_alpha']:.3g})",
    )


GATES: dict[str, Callable[[Policy, Mapping[str, Any], bool], Trip | None]] = {
    "failure_rate": _failure_rate,
    "failures": _failures,
    "install_success": _install_success,
    "error_rate": _error_rate,
    "latency_p95": _latency,
    "output_drift": _drift,
    "shadow_agreement": _shadow,
    "accuracy": _accuracy,
    "delivery": _delivery,
}
"""Every gate, in the order ``check`` tries them (install, errors, latency, drift, shadow, accuracy,
then the delivery hold)."""

SAMPLED_GATES = frozenset({"error_rate", "latency_p95", "output_drift", "shadow_agreement", "accuracy"})
"""Gates whose minimum sample grows with serving time (not with the number of devices assigned).

Pooled over several hardware classes they can fail before the class that drives
them has its own minimum sample: the engine then waits for that class's verdict
instead of stopping classes that demonstrably pass (engine.py, "deferred").
"""


def check(p: Policy, f: Mapping[str, Any], stage_finished: bool, approved: bool = False) -> Trip | None:
    """The first gate that trips, in order: install, errors, latency, drift, shadow, accuracy,
    delivery (a hold comes only when nothing that judges the model trips).

    ``approved``: a human accepted the stage, which silences its pausing gates but never a
    roll-back gate; the pausing ones are passed over, so one that trips first cannot hide a
    roll-back gate behind it (a class that both fails installs and serves errors is rolled back)."""
    for gate in GATES.values():
        trip = gate(p, f, stage_finished)
        if trip is not None and not (approved and trip.action == PAUSE):
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
            "min_labels": 1,
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
    if gate == "accuracy":
        return f.get("accuracy_p_value") is not None
    return bool(f["assigned"])


def looks_healthy(p: Policy, f: Mapping[str, Any], stage_finished: bool, gate: str) -> bool:
    """Whether figures below the minimum sample pass ``gate`` on their face (a point estimate).

    For the threshold gates that is their verdict with the minimums waived. The accuracy gate's
    verdict is a test, which on a handful of labels never rejects: its face value is the
    estimated change itself, no worse than the margin.
    """
    if gate == "accuracy":
        change = f.get("accuracy_change")
        return change is not None and p.max_accuracy_drop is not None and change >= -p.max_accuracy_drop
    return verdict(without_minimums(p), f, stage_finished, gate) is None


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
    """Retries of failure class ``cls``: its own limit, else the ``*`` limit, else none, except
    for a delivery failure (``delivery_retries``): an outage of the delivery path is often over
    by the next attempt, and a retry costs the model nothing."""
    default = p.delivery_retries if cls in DELIVERY_FAILURES else 0
    return p.retry_limits.get(cls, p.retry_limits.get(ANY_FAILURE, default))
