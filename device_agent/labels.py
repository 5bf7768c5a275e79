"""Ground truth on the device: recent predictions kept by inference id, and labels matched to them.

An application learns the true answer after the fact (the user corrects the
device, the outcome becomes known) and posts it for the inference id it got.
The agent keeps a bounded ring of its recent predictions (:class:`PredictionRing`:
id -> model, top-1 class per row and its score, or a regressor's value) and
:func:`judge` decides what a label is worth:

- ``matched``: its prediction is in the ring and young enough; it counts in the
  model's telemetry (labelled rows, correct rows, confusion counts, label delay,
  a regressor's absolute error);
- ``unknown``: no such prediction here (never made on this device, or lost with a
  restart: the ring lives in memory);
- ``expired``: the prediction is older than ``label_max_age_s``, or was pushed out
  of the ring by newer ones (ids sort in minting order, so an id below the oldest
  one held was pushed out; the id's own time tells its age);
- ``duplicate``: this prediction was labelled already (the first label counts);
- ``invalid``: not a UUIDv7, a label of the wrong kind or length, a label time
  before the inference.

A label that does not match is counted by reason in the telemetry batch
(``labels_unmatched``), never an error that stops anything.

A classifier's label is its class index (an int, or a string of digits); a
regressor's (first output one value per row) a finite number. An inference of
several rows takes a list with one label per row (classifiers). Confusion
counts keep class indices below :data:`~device_agent.wire.MAX_LABEL_CLASSES`
and count the rest as :data:`~device_agent.wire.OTHER_CLASS`: the same classes
on every device and in every window, so the server can add them up.
"""

from __future__ import annotations

import itertools
import math
import threading
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, NamedTuple

from device_agent.ids import id_millis
from device_agent.wire import MAX_LABEL_CLASSES, OTHER_CLASS


class LabelStatus(StrEnum):
    MATCHED = "matched"
    UNKNOWN = "unknown"
    EXPIRED = "expired"
    DUPLICATE = "duplicate"
    INVALID = "invalid"


class Prediction(NamedTuple):
    """What the ring keeps of one inference (a NamedTuple: built on every inference)."""

    id128: int
    sha256: str
    classes: list[int]  # top-1 class per row of the first output; [] when the inference failed
    top: float | None  # the first output's top value (score, or a regressor's value) for one row
    width: int  # the first output's last dimension: 1 for a regressor


@dataclass(frozen=True, slots=True)
class Matched:
    """A label joined to its prediction: what the model's telemetry counts."""

    sha256: str
    rows: int
    correct: int
    confusion: list[str]  # "true:predicted" per classifier row
    delay_s: float
    abs_error: float  # regressors: |label - prediction| summed over rows


@dataclass(frozen=True, slots=True)
class Unmatched:
    status: LabelStatus
    detail: str


Verdict = Matched | Unmatched


Entry = tuple[int, str, list[int], float | None, int]  # a Prediction's fields, as the ring stores them


class PredictionRing:
    """The last ``size`` predictions by id. ``add`` takes no lock (it runs on every inference).

    Each prediction takes the next slot of a fixed list (``itertools.count`` is atomic in
    CPython) and the index maps its id to the slot. A lookup checks that the slot still
    holds that id, so a slot reused under a race reads as a lost prediction, never as
    another one. Labelling (rare) takes a lock of its own. Entries are plain tuples of a
    :class:`Prediction`'s fields: building a NamedTuple costs ~3x more, on every inference.
    """

    def __init__(self, size: int) -> None:
        if size <= 0:
            raise ValueError("the prediction ring needs at least one slot")
        self.size = size
        self._slots: list[Entry | None] = [None] * size
        self._index: dict[int, int] = {}
        self._next = itertools.count()
        self._added = 0
        self._labelled: set[int] = set()
        self._label_lock = threading.Lock()

    def add(self, entry: Entry) -> None:
        """Keep ``(id128, sha256, classes, top, width)``, pushing out the oldest when full."""
        n = next(self._next)
        pos = n % self.size
        old = self._slots[pos]
        self._slots[pos] = entry
        if old is not None:
            self._index.pop(old[0], None)
            if self._labelled:
                self._labelled.discard(old[0])
        self._index[entry[0]] = pos
        self._added = n + 1

    def oldest(self) -> int | None:
        """The id of the oldest prediction still held, once the ring has wrapped (else None): ids
        sort in minting order, so any id below it was pushed out."""
        if self._added < self.size:
            return None
        entry = self._slots[self._added % self.size]
        return entry[0] if entry is not None else None

    def find(self, id128: int) -> tuple[Prediction | None, bool]:
        """(the prediction with this id, was it labelled already?); (None, False) if not held."""
        pos = self._index.get(id128)
        entry = self._slots[pos] if pos is not None else None
        if entry is None or entry[0] != id128:
            return None, False
        return Prediction(*entry), id128 in self._labelled

    def mark(self, id128: int) -> bool:
        """Record that this prediction got its label; False if another label beat this one to it."""
        with self._label_lock:
            if id128 in self._labelled:
                return False
            if len(self._labelled) >= self.size:  # ids evicted under a race: forget them
                self._labelled = {i for i in self._labelled if i in self._index}
            self._labelled.add(id128)
        return True

    def __len__(self) -> int:
        return min(self._added, self.size)


def class_key(c: int) -> str:
    return str(c) if 0 <= c < MAX_LABEL_CLASSES else OTHER_CLASS


def _class_label(v: Any) -> int | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, int):
        return v
    if isinstance(v, str) and v.isdigit() and len(v) <= 9:
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    return None


def _value_label(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if math.isfinite(f) else None


def judge(
    p: Prediction | None,
    labelled_before: bool,
    id128: int,
    label: Any,
    label_ms: int,
    now_ms: int,
    max_age_ms: int,
    oldest: int | None,
) -> Verdict:
    """What one label is worth (pure: the ring lookup and the clock readings are the inputs)."""
    made_ms = id_millis(id128)
    if label_ms < made_ms:
        return Unmatched(LabelStatus.INVALID, "label_time is before the inference")
    if p is None:
        if now_ms - made_ms > max_age_ms or (oldest is not None and id128 < oldest):
            return Unmatched(LabelStatus.EXPIRED, "the prediction is no longer kept")
        return Unmatched(LabelStatus.UNKNOWN, "no prediction with this id on this device")
    if labelled_before:
        return Unmatched(LabelStatus.DUPLICATE, "this prediction was labelled already")
    if now_ms - made_ms > max_age_ms:
        return Unmatched(LabelStatus.EXPIRED, f"the prediction is older than {max_age_ms / 1000:g} s")
    if not p.classes:
        return Unmatched(LabelStatus.INVALID, "the inference gave no prediction to label")
    rows = len(p.classes)
    values = label if isinstance(label, list) else [label]
    if len(values) != rows:
        return Unmatched(LabelStatus.INVALID, f"the inference has {rows} rows, the label {len(values)}")
    delay_s = (label_ms - made_ms) / 1000.0
    if p.width == 1:  # a regressor: compare values
        if p.top is None or rows != 1:
            return Unmatched(LabelStatus.INVALID, "regression labels need a one-row inference")
        value = _value_label(values[0])
        if value is None:
            return Unmatched(LabelStatus.INVALID, "a regression label is a finite number")
        return Matched(p.sha256, 1, 0, [], delay_s, abs(value - p.top))
    truths = [_class_label(v) for v in values]
    if any(t is None or t < 0 for t in truths):
        return Unmatched(LabelStatus.INVALID, "a classification label is a class index (>= 0)")
    known = [t for t in truths if t is not None]
    correct = sum(t == c for t, c in zip(known, p.classes, strict=True))
    confusion = [f"{class_key(t)}:{class_key(c)}" for t, c in zip(known, p.classes, strict=True)]
    return Matched(p.sha256, rows, correct, confusion, delay_s, 0.0)


__all__ = [
    "LabelStatus",
    "Matched",
    "Prediction",
    "PredictionRing",
    "Unmatched",
    "Verdict",
    "class_key",
    "judge",
]
