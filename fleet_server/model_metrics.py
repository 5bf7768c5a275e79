"""The SLIs of one model version on one hardware cohort in one rollout stage, from counts (pure).

Input: what the devices' telemetry adds up to (``ModelAggregate`` rows, summed with
:meth:`Counts.add`) and the server-side labels joined to captured predictions. Output: the
figures a person or a script reads to judge the model in the field:

- accuracy with a Wilson interval (``fleet_server.accuracy_stats.wilson``: it does not collapse
  at 0% or 100%, where accuracies of good models live);
- precision, recall and false positive rate per class, from the confusion counts
  (``"true:predicted" -> n``; ``other`` holds the classes past the device's bound);
- label coverage (labelled predictions / inferences) and label delay p50/p95 (upper bound of
  the histogram bucket; the overflow bucket reports the largest bound, a lower bound then);
- feature availability per input: shares of NaN, missing and out-of-calibration-range inputs;
- input distribution per input: the share of its sampled values below, in each tenth of, and
  above its calibration range;
- prediction availability at the device's local API: requests that got a prediction;
- cost per inference: agent CPU milliseconds. Energy is null: no device reports it yet, and a
  figure made up from CPU time would be a guess presented as a measurement.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from device_agent.protocol import INPUT_BUCKETS, INPUT_CHECKS, LABEL_DELAY_BOUNDS_S
from fleet_server.accuracy_stats import wilson
from fleet_server.gates import add_counts
from fleet_server.server_label_counts import verdict

CONFIDENCE = 0.95
ENERGY_NOTE = "devices report no energy figure: null, not estimated"


@dataclass
class Counts:
    """What the devices counted for one model in one group (sums over their aggregates)."""

    devices: int = 0
    inferences: int = 0
    errors: int = 0
    labels: int = 0
    labels_correct: int = 0
    confusion: dict[str, int] = field(default_factory=dict)
    label_delay_buckets: tuple[int, ...] = ()
    label_abs_error_sum: float = 0.0
    requests: int = 0
    request_errors: dict[str, int] = field(default_factory=dict)
    input_checks: dict[str, tuple[int, ...]] = field(default_factory=dict)
    cpu_ms: float = 0.0
    captured: int = 0
    input_buckets: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def add(self, agg: Any) -> None:
        """Add one device's aggregate (anything with ``ModelAggregate``'s fields)."""
        self.devices += 1
        self.inferences += agg.inferences
        self.errors += agg.errors
        self.labels += agg.labels
        self.labels_correct += agg.labels_correct
        _add_named(self.confusion, agg.confusion)
        self.label_delay_buckets = add_counts(self.label_delay_buckets, agg.label_delay_buckets)
        self.label_abs_error_sum += agg.label_abs_error_sum
        self.requests += agg.requests
        _add_named(self.request_errors, agg.request_errors)
        for name, checks in agg.input_checks.items():
            self.input_checks[name] = add_counts(self.input_checks.get(name, ()), checks)
        self.cpu_ms += agg.cpu_ms
        self.captured += agg.captured
        for name, buckets in (agg.input_buckets or {}).items():
            self.input_buckets[name] = add_counts(self.input_buckets.get(name, ()), buckets)


def _add_named(into: dict[str, int], more: Mapping[str, int]) -> None:
    for k, v in more.items():
        into[k] = into.get(k, 0) + v


def bucket_quantile(buckets: Sequence[int], bounds: Sequence[float], q: float) -> float | None:
    """The upper bound of the bucket holding the ``q`` quantile (None without samples)."""
    n = sum(buckets)
    if n <= 0:
        return None
    rank, seen = q * n, 0
    for i, c in enumerate(buckets):
        seen += c
        if c and seen >= rank:
            return bounds[min(i, len(bounds) - 1)]
    return bounds[-1]


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def accuracy(correct: int, n: int) -> dict[str, Any]:
    """Accuracy of ``correct`` out of ``n`` with its Wilson interval."""
    interval = wilson(correct, n, CONFIDENCE)
    return {
        "labels": n,
        "correct": correct,
        "value": _ratio(correct, n),
        "interval": list(interval) if interval is not None else None,
        "confidence": CONFIDENCE,
    }


def per_class(confusion: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """Precision, recall and FPR of every class seen as truth or prediction."""
    cells: list[tuple[str, str, int]] = []
    for key, n in confusion.items():
        true, sep, predicted = key.partition(":")
        if sep and n > 0:
            cells.append((true, predicted, n))
    total = sum(n for _, _, n in cells)
    classes = sorted({t for t, _, _ in cells} | {p for _, p, _ in cells}, key=_class_order)
    out: dict[str, dict[str, Any]] = {}
    for c in classes:
        tp = sum(n for t, p, n in cells if t == c and p == c)
        support = sum(n for t, _, n in cells if t == c)
        as_c = sum(n for _, p, n in cells if p == c)
        fp = as_c - tp
        negatives = total - support
        out[c] = {
            "support": support,
            "predicted": as_c,
            "precision": _ratio(tp, as_c),
            "recall": _ratio(tp, support),
            "fpr": _ratio(fp, negatives),
        }
    return out


def _class_order(c: str) -> tuple[int, int, str]:
    return (0, int(c), "") if c.isdigit() else (1, 0, c)


def feature_availability(input_checks: Mapping[str, Sequence[int]]) -> dict[str, dict[str, Any]]:
    """Per input: inputs checked, and the share that was NaN, missing or outside the calibration
    range; ``available`` is the share with none of these."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(input_checks):
        counts = dict(zip(INPUT_CHECKS, input_checks[name], strict=False))
        checked = counts.get("checked", 0)
        bad = {k: counts.get(k, 0) for k in INPUT_CHECKS[1:]}
        out[name] = {
            "checked": checked,
            **{f"{k}_share": _ratio(v, checked) for k, v in bad.items()},
            "available": _ratio(max(checked - sum(bad.values()), 0), checked),
        }
    return out


def input_distribution(input_buckets: Mapping[str, Sequence[int]]) -> dict[str, dict[str, Any]]:
    """Per input with counted values: how many, and their share per ``INPUT_BUCKETS`` bucket."""
    out: dict[str, dict[str, Any]] = {}
    for name in sorted(input_buckets):
        counts = list(input_buckets[name][: len(INPUT_BUCKETS)])
        n = sum(counts)
        if n > 0:
            out[name] = {
                "values": n,
                "shares": {b: c / n for b, c in zip(INPUT_BUCKETS, counts, strict=False)},
            }
    return out


def joined_accuracy(pairs: Iterable[tuple[Any, str | None]]) -> dict[str, Any]:
    """Accuracy of server-side labels against the captured top-1: ``(label, predicted)`` pairs of
    labels whose inference was captured with its outputs (a label list counts its first row)."""
    n = correct = 0
    for label, predicted in pairs:
        right = verdict(label, predicted)
        if right is not None:
            n += 1
            correct += right
    return accuracy(correct, n)


def metrics(c: Counts, joined: Iterable[tuple[Any, str | None]] = ()) -> dict[str, Any]:
    """Every figure of one group (see the module doc)."""
    failed = sum(c.request_errors.values())
    classifier = bool(c.confusion) or c.labels_correct > 0
    return {
        "devices": c.devices,
        "inferences": c.inferences,
        "accuracy": accuracy(c.labels_correct, c.labels) if classifier or not c.labels else None,
        "mean_abs_error": None if classifier else _ratio(c.label_abs_error_sum, c.labels),
        "classes": per_class(c.confusion),
        "label_coverage": _ratio(c.labels, c.inferences),
        "label_delay_p50_s": bucket_quantile(c.label_delay_buckets, LABEL_DELAY_BOUNDS_S, 0.5),
        "label_delay_p95_s": bucket_quantile(c.label_delay_buckets, LABEL_DELAY_BOUNDS_S, 0.95),
        "feature_availability": feature_availability(c.input_checks),
        "input_distribution": input_distribution(c.input_buckets),
        "prediction_availability": {
            "requests": c.requests,
            "failed": failed,
            "by_kind": dict(sorted(c.request_errors.items())),
            "value": _ratio(c.requests - failed, c.requests),
        },
        "cpu_ms_per_inference": _ratio(c.cpu_ms, c.inferences),
        "energy_mj_per_inference": None,
        "energy_note": ENERGY_NOTE,
        "captured": c.captured,
        "server_labels": joined_accuracy(joined),
    }


__all__ = [
    "CONFIDENCE",
    "ENERGY_NOTE",
    "Counts",
    "accuracy",
    "bucket_quantile",
    "feature_availability",
    "input_distribution",
    "joined_accuracy",
    "metrics",
    "per_class",
]
