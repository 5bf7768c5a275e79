"""Per-model inference statistics, batched for upload.

``record`` is called from whatever thread ran the inference, so it does the
least it can: one bisect, one lock, a few integer adds. The drift sketches
(per-feature input moments and value histograms of inputs and outputs) cost
a few microseconds of numpy each, so they are taken on every
``sketch_every``-th call only; they are estimates of distributions, and a
sample of them is what the drift gates compare.

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
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np

from device_agent import wire as protocol
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
    class_hist: dict[str, int] = field(default_factory=dict)
    input_count: int = 0
    input_mean: np.ndarray | None = None
    input_m2: np.ndarray | None = None
    input_hist: np.ndarray | None = None
    output_hist: np.ndarray | None = None

    def freeze(self) -> protocol.ModelStats:
        return protocol.ModelStats(
            inferences=self.inferences,
            errors=dict(self.errors),
            latency_buckets=list(self.buckets),
            latency_sum_us=self.latency_sum_us,
            class_hist=dict(self.class_hist),
            input_count=self.input_count,
            input_mean=[] if self.input_mean is None else self.input_mean.tolist(),
            input_m2=[] if self.input_m2 is None else self.input_m2.tolist(),
            input_hist=[] if self.input_hist is None else self.input_hist.tolist(),
            output_hist=[] if self.output_hist is None else self.output_hist.tolist(),
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


class Telemetry:
    """Thread-safe accumulator of one device's inference statistics, plus its on-disk queue."""

    def __init__(
        self,
        device_id: str,
        store: BatchStore,
        sketch_every: int = 64,
        now: Callable[[], datetime] = protocol.utcnow,
    ) -> None:
        self.device_id = device_id
        self.store = store
        self.sketch_every = max(1, sketch_every)
        self.now = now  # the device's wall clock (skewable): dates the batch windows
        self._lock = threading.Lock()
        self._window: dict[str, _Stats] = {}
        self._window_count = 0
        self._shadow: dict[str, _Shadow] = {}
        self._window_start = now()
        self._calls = 0
        self.totals: dict[str, ModelTotals] = {}

    def record(
        self,
        sha256: str,
        latency_us: float,
        error: str | None,
        classes: list[int],
        x: Any = None,
        outputs: list[np.ndarray] | None = None,
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
                key = str(c)
                hist[key] = hist.get(key, 0) + 1
            self._calls += 1
            sketch = x is not None and self._calls % self.sketch_every == 0
            if sketch:
                _sketch(st, x, outputs or [])

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
        now = self.now()
        with self._lock:
            window, shadow, start = self._window, self._shadow, self._window_start
            self._window, self._shadow, self._window_start = {}, {}, now
            self._window_count = 0
        if not window and not shadow:
            return None
        batch = protocol.TelemetryBatch(
            device_id=self.device_id,
            batch_id=uuid.uuid4().hex,
            window_start=start,
            window_end=now,
            models={sha: st.freeze() for sha, st in window.items()},
            shadow={sha: sh.freeze() for sha, sh in shadow.items()},
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
