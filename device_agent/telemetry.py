"""Per-model inference statistics, batched for upload.

``record`` is called from whatever thread ran the inference, so it does the
least it can: one bisect, one lock, a few integer adds. The drift sketches
(per-feature input moments and value histograms of inputs and outputs) cost
a few microseconds of numpy each, so they are taken on every
``sketch_every``-th call only; they are estimates of distributions, and a
sample of them is what the drift gates compare. The input checks (NaN, missing,
outside the calibration range: :mod:`device_agent.input_checks`) and the inputs'
value distributions over their calibration ranges ride on the same sample.

Ground truth and availability arrive beside the inferences: labels matched to
a model's predictions (:mod:`device_agent.labels`), the local API's requests and
the errors that left them without a prediction, inferences captured for
retraining, and the process CPU time of the window, shared among the models by
their inferences.

Everything in a batch is mergeable on the server: latency counts per fixed
log bucket, counts per class and per value bin, and Welford moments
(count, mean, M2) combined with Chan's parallel formula.

A closed window becomes a ``TelemetryBatch`` with a unique ``batch_id`` and is
queued on disk (:mod:`device_agent.telemetry_store`) until the broker
acknowledges it.
"""

from __future__ import annotations

import bisect
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from device_agent import wire as protocol
from device_agent.input_checks import InputCheck
from device_agent.telemetry_store import BatchStore

NUM_BUCKETS = protocol.LATENCY_BUCKETS
NUM_VALUE_BINS = len(protocol.VALUE_BOUNDS) + 1
_VALUE_BOUNDS = np.asarray(protocol.VALUE_BOUNDS, dtype=np.float64)
_LAT_BOUNDS = protocol.LATENCY_BOUNDS_US


@dataclass
class _Stats:
    inferences: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * NUM_BUCKETS)
    latency_sum_us: float = 0.0
    class_hist: dict[int, int] = field(default_factory=dict)  # keyed by int: str() at freeze, not per call
    input_count: int = 0
    input_mean: np.ndarray | None = None
    input_m2: np.ndarray | None = None
    input_hist: np.ndarray | None = None
    output_hist: np.ndarray | None = None
    labels: int = 0
    labels_correct: int = 0
    confusion: dict[str, int] = field(default_factory=dict)
    label_delay: list[int] | None = None
    label_abs_error_sum: float = 0.0
    requests: int = 0
    request_errors: dict[str, int] = field(default_factory=dict)
    input_checks: dict[str, list[int]] = field(default_factory=dict)
    cpu_ms: float = 0.0
    captured: int = 0
    input_buckets: dict[str, np.ndarray] = field(default_factory=dict)
    outcomes: dict[str, list[float]] = field(default_factory=dict)  # metric -> [n, sum, sum of squares]

    def checks_of(self, name: str) -> list[int]:
        counts = self.input_checks.get(name)
        if counts is None:
            counts = self.input_checks[name] = [0] * len(protocol.INPUT_CHECKS)
        return counts

    def freeze(self) -> protocol.ModelStats:
        return protocol.ModelStats(
            inferences=self.inferences,
            errors=dict(self.errors),
            latency_buckets=list(self.buckets),
            latency_sum_us=self.latency_sum_us,
            class_hist={str(k): v for k, v in self.class_hist.items()},
            input_count=self.input_count,
            input_mean=[] if self.input_mean is None else self.input_mean.tolist(),
            input_m2=[] if self.input_m2 is None else self.input_m2.tolist(),
            input_hist=[] if self.input_hist is None else self.input_hist.tolist(),
            output_hist=[] if self.output_hist is None else self.output_hist.tolist(),
            labels=self.labels,
            labels_correct=self.labels_correct,
            confusion=dict(self.confusion),
            label_delay_buckets=list(self.label_delay or []),
            label_abs_error_sum=self.label_abs_error_sum,
            requests=self.requests,
            request_errors=dict(self.request_errors),
            input_checks={k: list(v) for k, v in self.input_checks.items()},
            cpu_ms=round(self.cpu_ms, 3),
            captured=self.captured,
            input_buckets={k: v.tolist() for k, v in self.input_buckets.items()},
            outcomes={k: list(v) for k, v in self.outcomes.items()},
        )


@dataclass
class _Shadow:
    samples: int = 0
    top1_agree: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * NUM_BUCKETS)
    latency_sum_us: float = 0.0

    def freeze(self) -> protocol.ShadowStats:
        return protocol.ShadowStats(
            samples=self.samples,
            top1_agree=self.top1_agree,
            errors=dict(self.errors),
            latency_buckets=list(self.buckets),
            latency_sum_us=self.latency_sum_us,
        )


@dataclass
class ModelTotals:
    """Cumulative counts for one model hash since the agent started (probation reads these)."""

    ok: int = 0
    errors: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * NUM_BUCKETS)

    def copy(self) -> ModelTotals:
        return ModelTotals(self.ok, self.errors, list(self.buckets))


def top1_classes(outputs: list[np.ndarray]) -> list[int]:
    """Argmax over the last axis of the first output, one class per row (empty if not a score tensor)."""
    if not outputs:
        return []
    first = outputs[0]
    if first.size == 0 or first.ndim == 0 or not np.issubdtype(first.dtype, np.number):
        return []
    if first.ndim == 1 or first.shape[0] == 1:
        return [int(first.argmax())]
    flat = first.reshape(-1, first.shape[-1])
    return [int(i) for i in np.argmax(flat, axis=-1)]


def value_hist(values: np.ndarray) -> np.ndarray:
    """Counts of ``values`` per VALUE_BOUNDS bin (non-finite values land in the last bin)."""
    v = np.asarray(values, dtype=np.float64).ravel()
    v = np.where(np.isfinite(v), v, np.inf)
    idx = np.searchsorted(_VALUE_BOUNDS, v, side="left")
    return np.bincount(idx, minlength=NUM_VALUE_BINS)


def merge_moments(
    n_a: int, mean_a: np.ndarray | None, m2_a: np.ndarray | None, rows: np.ndarray
) -> tuple[int, np.ndarray, np.ndarray]:
    """Fold a batch of rows into (count, mean, M2) with Chan's parallel update (mergeable)."""
    n_b = rows.shape[0]
    mean_b = rows.mean(axis=0)
    m2_b = ((rows - mean_b) ** 2).sum(axis=0)
    if mean_a is None or m2_a is None or n_a == 0 or mean_a.shape != mean_b.shape:
        return n_b, mean_b, m2_b
    n = n_a + n_b
    delta = mean_b - mean_a
    return n, mean_a + delta * (n_b / n), m2_a + m2_b + delta**2 * (n_a * n_b / n)


def _sketch(st: _Stats, x: np.ndarray, outputs: list[np.ndarray]) -> None:
    arr = np.asarray(x)
    if arr.size and np.issubdtype(arr.dtype, np.number):
        rows = arr.reshape(arr.shape[0] if arr.ndim > 1 else 1, -1)[:, : protocol.INPUT_STAT_FEATURES]
        rows = rows.astype(np.float64)
        if np.isfinite(rows).all():
            st.input_count, st.input_mean, st.input_m2 = merge_moments(
                st.input_count, st.input_mean, st.input_m2, rows
            )
        h = value_hist(arr)
        st.input_hist = h if st.input_hist is None else st.input_hist + h
    for out in outputs:
        if np.issubdtype(out.dtype, np.floating):
            h = value_hist(out)
            st.output_hist = h if st.output_hist is None else st.output_hist + h
            break


def share_cpu(window: dict[str, _Stats], cpu_ms: float) -> None:
    """Attribute a window's process CPU time to its models by their share of its inferences.

    The agent cannot tell whose thread burned which millisecond without a clock read per
    inference; the share is exact when the models cost alike and the agent does little else.
    A window without inferences attributes nothing (idle cost is nobody's inference)."""
    total = sum(st.inferences for st in window.values())
    if total <= 0 or cpu_ms <= 0:
        return
    for st in window.values():
        st.cpu_ms = cpu_ms * st.inferences / total


class Telemetry:
    """Thread-safe accumulator of one device's inference statistics, plus its on-disk queue.

    ``cpu_clock``: the process's CPU seconds (``time.process_time``), read once per window
    and shared among the models by their share of the window's inferences.
    """

    def __init__(
        self,
        device_id: str,
        store: BatchStore,
        sketch_every: int = 64,
        now: Callable[[], datetime] = protocol.utcnow,
        cpu_clock: Callable[[], float] = time.process_time,
    ) -> None:
        self.device_id = device_id
        self.store = store
        self.sketch_every = max(1, sketch_every)
        self.now = now  # the device's wall clock (skewable): dates the batch windows
        self.cpu_clock = cpu_clock
        self._lock = threading.Lock()
        self._window: dict[str, _Stats] = {}
        self._window_count = 0
        self._shadow: dict[str, _Shadow] = {}
        self._unmatched: dict[str, int] = {}
        self._evicted = 0
        self._window_start = now()
        self._cpu_start = cpu_clock()
        self._calls = 0
        self._missing_calls = 0
        self.totals: dict[str, ModelTotals] = {}
        self._full_at = 0  # window size at which ``_on_full`` is called (0: never)
        self._on_full: Callable[[], None] | None = None

    def notify_full(self, at: int, callback: Callable[[], None] | None) -> None:
        """Call ``callback`` (from the recording thread, once per window) when a window reaches
        ``at`` inferences: the uplink sleeps until its interval ends instead of polling the
        window's size, and is woken by this when a busy window must be cut early."""
        self._full_at, self._on_full = (at, callback) if callback is not None else (0, None)

    def _stats(self, sha256: str) -> _Stats:
        """The window's stats of ``sha256`` (the caller holds the lock)."""
        st = self._window.get(sha256)
        if st is None:
            st = self._window[sha256] = _Stats()
        return st

    def record(
        self,
        sha256: str,
        latency_us: float,
        error: str | None,
        classes: list[int],
        x: Any = None,
        outputs: list[np.ndarray] | None = None,
        check: InputCheck | None = None,
    ) -> None:
        bucket = bisect.bisect_left(_LAT_BOUNDS, latency_us)
        with self._lock:
            st = self._window.get(sha256)
            if st is None:
                st = self._window[sha256] = _Stats()
            tot = self.totals.get(sha256)
            if tot is None:
                tot = self.totals[sha256] = ModelTotals()
            st.inferences += 1
            self._window_count += 1
            full = self._window_count == self._full_at
            st.buckets[bucket] += 1
            tot.buckets[bucket] += 1
            st.latency_sum_us += latency_us
            if error is not None:
                st.errors[error] = st.errors.get(error, 0) + 1
                tot.errors += 1
            else:
                tot.ok += 1
            hist = st.class_hist
            for c in classes:
                hist[c] = hist.get(c, 0) + 1
            self._calls += 1
            sketch = x is not None and self._calls % self.sketch_every == 0
            if sketch:
                _sketch(st, x, outputs or [])
                if check is not None:
                    nan, missing, outside = check(x)
                    counts = st.checks_of(check.name)
                    counts[0] += 1
                    counts[1] += nan
                    counts[2] += missing
                    counts[3] += outside
                    b = check.buckets(x)  # None without a calibration range
                    if b is not None:
                        acc = st.input_buckets.get(check.name)
                        st.input_buckets[check.name] = b if acc is None else acc + b
        if full:
            on_full = self._on_full
            if on_full is not None:
                on_full()

    def record_input_missing(self, sha256: str, name: str) -> None:
        """A request that never reached the model for want of an input (the local API read none).

        Sampled like the checks in :meth:`record` (every ``sketch_every``-th), so the share of
        missing inputs among the checked ones is the true share."""
        with self._lock:
            self._missing_calls += 1
            if self._missing_calls % self.sketch_every == 0:
                counts = self._stats(sha256).checks_of(name)
                counts[0] += 1
                counts[2] += 1

    def record_request(self, sha256: str, error: str | None) -> None:
        """One local API request for ``sha256``; ``error``: the kind, when it got no prediction."""
        with self._lock:
            st = self._stats(sha256)
            st.requests += 1
            if error is not None:
                st.request_errors[error] = st.request_errors.get(error, 0) + 1

    def record_label(
        self, sha256: str, *, rows: int, correct: int, confusion: list[str], delay_s: float, abs_error: float
    ) -> None:
        """A label matched to one of ``sha256``'s predictions (``rows`` labelled rows)."""
        bucket = bisect.bisect_left(protocol.LABEL_DELAY_BOUNDS_S, delay_s)
        with self._lock:
            st = self._stats(sha256)
            st.labels += rows
            st.labels_correct += correct
            for key in confusion:
                st.confusion[key] = st.confusion.get(key, 0) + 1
            if st.label_delay is None:
                st.label_delay = [0] * protocol.LABEL_DELAY_BUCKETS
            st.label_delay[bucket] += rows
            st.label_abs_error_sum += abs_error

    def record_outcome(self, sha256: str, metric: str, value: float, max_metrics: int) -> bool:
        """An app's outcome value joined to one of ``sha256``'s predictions; False (not counted) when
        the window holds ``max_metrics`` other metrics of that model already."""
        with self._lock:
            outcomes = self._stats(sha256).outcomes
            acc = outcomes.get(metric)
            if acc is None:
                if len(outcomes) >= max_metrics:
                    return False
                acc = outcomes[metric] = [0.0, 0.0, 0.0]
            acc[0] += 1
            acc[1] += value
            acc[2] += value * value
        return True

    def record_unmatched(self, reason: str) -> None:
        """A label that matched no prediction, by reason (``wire.LABEL_UNMATCHED``)."""
        with self._lock:
            self._unmatched[reason] = self._unmatched.get(reason, 0) + 1

    def record_captured(self, sha256: str, n: int = 1) -> None:
        with self._lock:
            self._stats(sha256).captured += n

    def record_capture_evicted(self, n: int) -> None:
        with self._lock:
            self._evicted += n

    def record_shadow(self, candidate: str, latency_us: float, error: str | None, agree: bool | None) -> None:
        """One sampled input run on a shadowed candidate, compared with the served answer."""
        bucket = bisect.bisect_left(_LAT_BOUNDS, latency_us)
        with self._lock:
            cur = self._shadow.get(candidate)
            if cur is None:
                cur = self._shadow[candidate] = _Shadow()
            cur.samples += 1
            cur.top1_agree += 1 if agree else 0
            cur.buckets[bucket] += 1
            cur.latency_sum_us += latency_us
            if error is not None:
                cur.errors[error] = cur.errors.get(error, 0) + 1

    def totals_of(self, sha256: str) -> ModelTotals:
        with self._lock:
            tot = self.totals.get(sha256)
            return tot.copy() if tot else ModelTotals()

    def served_ok(self) -> dict[str, int]:
        with self._lock:
            return {k: v.ok for k, v in self.totals.items()}

    def served_errors(self) -> dict[str, int]:
        with self._lock:
            return {k: v.errors for k, v in self.totals.items() if v.errors}

    @property
    def window_inferences(self) -> int:
        return self._window_count

    def cut(self) -> protocol.TelemetryBatch | None:
        """Close the current window; queue its batch on disk and return it (None if nothing happened)."""
        now, cpu = self.now(), self.cpu_clock()
        with self._lock:
            window, shadow, start = self._window, self._shadow, self._window_start
            unmatched, evicted, cpu_start = self._unmatched, self._evicted, self._cpu_start
            self._window, self._shadow, self._window_start = {}, {}, now
            self._unmatched, self._evicted, self._cpu_start = {}, 0, cpu
            self._window_count = 0
        if not window and not shadow and not unmatched and not evicted:
            return None
        share_cpu(window, (cpu - cpu_start) * 1000.0)
        batch = protocol.TelemetryBatch(
            device_id=self.device_id,
            batch_id=uuid.uuid4().hex,
            window_start=start,
            window_end=now,
            models={sha: st.freeze() for sha, st in window.items()},
            shadow={sha: sh.freeze() for sha, sh in shadow.items()},
            labels_unmatched=unmatched,
            capture_evicted=evicted,
        )
        final: list[protocol.TelemetryBatch] = [batch]

        def encode(dropped: int) -> bytes:
            final[0] = batch.with_dropped(dropped)
            return protocol.encode_telemetry(final[0])

        self.store.put(batch.batch_id, encode)
        return final[0]

    @property
    def dropped_batches(self) -> int:
        return self.store.dropped_total
