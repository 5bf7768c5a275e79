"""Per-input and per-class figures of the busiest model groups, for the debug dashboard (pure).

The devices count feature checks per input tensor (checked, NaN, missing, outside the
calibration range: the share outside is a model's input drift, input by input), each input's
values per ``INPUT_BUCKETS`` bucket of its calibration range (where the values went), the top-1
class of every prediction, and for labelled predictions the confusion cells "true:predicted".
The SLO pass sums them per (model hash, cohort) (``Detail``); ``/metrics`` exports them for a
few groups only, since every input and class multiplies the series: the ``DEBUG_GROUPS``
busiest (model, version, cohort) groups, in each the ``DEBUG_INPUTS`` inputs with the most
checks and the ``DEBUG_CLASSES`` classes with the most predictions and labels, the rest of
each summed as ``other``. The value buckets are kept for the first ``DEBUG_BUCKET_INPUTS`` of
those inputs and not summed as ``other``: each input's buckets are relative to its own range, so
a sum across inputs would be no distribution at all; 12 series an input is the dearest figure,
and three inputs keep a fleet's whole ``/metrics`` under its 2,000-series budget when every group
has every input and class. So the series stay under ``DEBUG_GROUPS x (DEBUG_INPUTS + 1) x 4 +
DEBUG_GROUPS x DEBUG_BUCKET_INPUTS x 12 + DEBUG_GROUPS x (DEBUG_CLASSES + 1) x 4`` however large
the fleet, its models or their outputs.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from device_agent.protocol import INPUT_BUCKETS, INPUT_CHECKS, OTHER_CLASS
from fleet_server.gates import add_counts

DEBUG_GROUPS = 5
DEBUG_INPUTS = 6
DEBUG_BUCKET_INPUTS = 3
DEBUG_CLASSES = 10
OTHER = OTHER_CLASS  # the devices' own name for the classes past their bound
CLASS_KINDS = ("predictions", "true", "predicted", "correct")


@dataclass(frozen=True)
class Detail:
    """One group's per-input checks (``INPUT_CHECKS`` order), predictions per top-1 class,
    confusion cells of its labelled predictions, and per-input value buckets (``INPUT_BUCKETS``)."""

    inputs: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    classes: Mapping[str, int] = field(default_factory=dict)
    confusion: Mapping[str, int] = field(default_factory=dict)
    buckets: Mapping[str, tuple[int, ...]] = field(default_factory=dict)

    def __add__(self, other: Detail) -> Detail:
        return Detail(
            _add_rows(self.inputs, other.inputs),
            _add(self.classes, other.classes),
            _add(self.confusion, other.confusion),
            _add_rows(self.buckets, other.buckets),
        )


def _add_rows(
    a: Mapping[str, tuple[int, ...]], b: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, ...]]:
    out = dict(a)
    for name, counts in b.items():
        out[name] = add_counts(out.get(name, ()), counts)
    return out


def _add(a: Mapping[str, int], b: Mapping[str, int]) -> dict[str, int]:
    out = dict(a)
    for k, n in b.items():
        out[k] = out.get(k, 0) + n
    return out


Stored = tuple[
    Mapping[str, Iterable[int]] | None,  # input name -> INPUT_CHECKS counts
    Mapping[str, int] | None,  # top-1 class -> predictions
    Mapping[str, int] | None,  # "true:predicted" -> labelled predictions
    Mapping[str, Iterable[int]] | None,  # input name -> INPUT_BUCKETS counts
]


def pooled(devices: Iterable[Stored]) -> Detail:
    """The sum of many devices' figures as stored (JSON columns, possibly empty or null), in place:
    a pass sums thousands of devices."""
    inputs: dict[str, list[int]] = {}
    buckets: dict[str, list[int]] = {}
    classes: Counter[str] = Counter()
    confusion: Counter[str] = Counter()
    for checks, hist, cells, values in devices:
        if checks:
            _accumulate(inputs, checks, len(INPUT_CHECKS))
        if hist:
            classes.update(hist)
        if cells:
            confusion.update(cells)
        if values:
            _accumulate(buckets, values, len(INPUT_BUCKETS))
    return Detail(
        {k: tuple(v) for k, v in inputs.items()},
        dict(classes),
        dict(confusion),
        {k: tuple(v) for k, v in buckets.items()},
    )


def _accumulate(into: dict[str, list[int]], rows: Mapping[str, Iterable[int]], width: int) -> None:
    for name, counts in rows.items():
        acc = into.get(name)
        if acc is None:
            acc = into[name] = [0] * width
        for i, n in enumerate(list(counts)[:width]):
            acc[i] += n


def _ranked(detail: Detail) -> list[tuple[str, tuple[int, ...]]]:
    return sorted(detail.inputs.items(), key=lambda kv: (-(kv[1][0] if kv[1] else 0), kv[0]))


def input_series(detail: Detail) -> dict[str, tuple[int, ...]]:
    """Checks per input: the ``DEBUG_INPUTS`` inputs checked most, the rest summed as ``other``."""
    ranked = _ranked(detail)
    out = dict(ranked[:DEBUG_INPUTS])
    for _, counts in ranked[DEBUG_INPUTS:]:
        out[OTHER] = add_counts(out.get(OTHER, ()), counts)
    return {name: tuple(counts) + (0,) * (len(INPUT_CHECKS) - len(counts)) for name, counts in out.items()}


def bucket_series(detail: Detail) -> dict[str, tuple[int, ...]]:
    """Value buckets per input (``INPUT_BUCKETS`` order) of the inputs ``input_series`` names, those
    with a calibration range; an input with buckets but no checks ranks after the checked ones."""
    checked = [name for name, _ in _ranked(detail) if name in detail.buckets]
    rest = sorted(name for name in detail.buckets if name not in detail.inputs)
    width = len(INPUT_BUCKETS)
    return {
        name: tuple(detail.buckets[name][:width]) + (0,) * (width - len(detail.buckets[name][:width]))
        for name in (checked + rest)[:DEBUG_BUCKET_INPUTS]
    }


def class_series(detail: Detail) -> dict[str, dict[str, int]]:
    """Per class (``CLASS_KINDS``): predictions with it as top-1, labelled predictions whose truth it
    is, labelled predictions of it, and right ones; the ``DEBUG_CLASSES`` busiest classes, the rest
    summed as ``other`` (precision and recall of ``other`` are those of the classes in it, pooled)."""
    per: dict[str, dict[str, int]] = {}

    def add(c: str, kind: str, n: int) -> None:
        row = per.setdefault(c, dict.fromkeys(CLASS_KINDS, 0))
        row[kind] += n

    for c, n in detail.classes.items():
        add(c, "predictions", n)
    for key, n in detail.confusion.items():
        true, sep, predicted = key.partition(":")
        if not sep or n <= 0:
            continue
        add(true, "true", n)
        add(predicted, "predicted", n)
        if true == predicted:
            add(true, "correct", n)
    named = sorted(
        (c for c in per if c != OTHER), key=lambda c: (-(per[c]["predictions"] + per[c]["true"]), c)
    )
    out = {c: per[c] for c in named[:DEBUG_CLASSES]}
    rest = [per[c] for c in named[DEBUG_CLASSES:]] + ([per[OTHER]] if OTHER in per else [])
    if rest:
        out[OTHER] = {kind: sum(row[kind] for row in rest) for kind in CLASS_KINDS}
    return out


__all__ = [
    "CLASS_KINDS",
    "DEBUG_BUCKET_INPUTS",
    "DEBUG_CLASSES",
    "DEBUG_GROUPS",
    "DEBUG_INPUTS",
    "OTHER",
    "Detail",
    "bucket_series",
    "class_series",
    "input_series",
    "pooled",
]
