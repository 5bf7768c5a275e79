"""Per-model inference statistics, batched for upload.

``record`` is called from whatever thread ran the inference, so all counters
sit behind one lock; a flush swaps the whole window out under that lock and
builds the batch outside it. Unsent batches queue in memory (bounded) while
the device is offline and are counted as dropped when the queue overflows.
"""

from __future__ import annotations

import bisect
import threading
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from device_agent import protocol

NUM_BUCKETS = len(protocol.LATENCY_BOUNDS_US) + 1  # last bucket: above the largest bound
MAX_QUEUED_BATCHES = 256


@dataclass
class _Stats:
    inferences: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    buckets: list[int] = field(default_factory=lambda: [0] * NUM_BUCKETS)
    latency_sum_us: float = 0.0
    class_hist: dict[str, int] = field(default_factory=dict)

    def freeze(self) -> protocol.ModelStats:
        return protocol.ModelStats(
            inferences=self.inferences,
            errors=dict(self.errors),
            latency_buckets=list(self.buckets),
            latency_sum_us=self.latency_sum_us,
            class_hist=dict(self.class_hist),
        )


def top1_classes(outputs: list[np.ndarray]) -> list[int]:
    """Argmax over the last axis of the first output, one class per row (empty if not a score tensor)."""
    if not outputs:
        return []
    first = outputs[0]
    if first.size == 0 or first.ndim == 0 or not np.issubdtype(first.dtype, np.number):
        return []
    flat = first.reshape(-1, first.shape[-1])
    return [int(i) for i in np.argmax(flat, axis=-1)]


class Telemetry:
    """Thread-safe accumulator of one device's inference statistics."""

    def __init__(self, device_id: str) -> None:
        self.device_id = device_id
        self._lock = threading.Lock()
        self._window: dict[str, _Stats] = {}
        self._window_start = protocol.utcnow()
        self.queue: deque[protocol.TelemetryBatch] = deque()
        self.dropped_batches = 0

    def record(self, sha256: str, latency_us: float, error: str | None, classes: list[int]) -> None:
        bucket = bisect.bisect_left(protocol.LATENCY_BOUNDS_US, latency_us)
        with self._lock:
            st = self._window.get(sha256)
            if st is None:
                st = self._window[sha256] = _Stats()
            st.inferences += 1
            st.buckets[bucket] += 1
            st.latency_sum_us += latency_us
            if error is not None:
                st.errors[error] = st.errors.get(error, 0) + 1
            for c in classes:
                key = str(c)
                st.class_hist[key] = st.class_hist.get(key, 0) + 1

    def cut(self) -> protocol.TelemetryBatch | None:
        """Close the current window; queue and return its batch (None if nothing happened)."""
        now = protocol.utcnow()
        with self._lock:
            window, start = self._window, self._window_start
            self._window, self._window_start = {}, now
        if not window:
            return None
        batch = protocol.TelemetryBatch(
            device_id=self.device_id,
            batch_id=uuid.uuid4().hex,
            window_start=start,
            window_end=now,
            models={sha: st.freeze() for sha, st in window.items()},
            dropped_batches=self.dropped_batches,
        )
        self.queue.append(batch)
        while len(self.queue) > MAX_QUEUED_BATCHES:
            self.queue.popleft()
            self.dropped_batches += 1
        return batch
