"""Shadow mode: a candidate model runs beside the served one on a sample of live inputs, never served.

Sampled inputs go through a bounded queue to one worker thread, so serving never
waits for the candidate: when the queue is full the sample is skipped (and
counted). The worker records each comparison (latency, errors, top-1 agreement
with the served answer) in telemetry, where the rollout's shadow gate reads it.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time

import numpy as np

from device_agent.serving import Serving, scan
from device_agent.telemetry import Telemetry, top1_classes

QUEUE = 64  # sampled inputs waiting for the candidate; more are skipped, never block serving


def sample_every(rate: float) -> int:
    """Run every n-th live input on the candidate (0: none)."""
    return max(1, round(1.0 / rate)) if rate > 0 else 0


class Shadow:
    """One candidate and its worker thread; ``offer`` is called from the inference threads."""

    def __init__(self, candidate: Serving, rate: float, telemetry: Telemetry, name: str) -> None:
        self.candidate = candidate
        self.every = sample_every(rate)
        self._n = 0
        self._telemetry = telemetry
        self._queue: queue.Queue[tuple[np.ndarray, list[int]] | None] = queue.Queue(QUEUE)
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    @property
    def sha256(self) -> str:
        return self.candidate.sha256

    def offer(self, x: np.ndarray, served: list[int]) -> bool:
        """Queue ``x`` if it is a sampled one; False only when it was sampled but the queue was full."""
        if self.every <= 0:
            return True
        self._n += 1  # racy by design: it only decides sampling
        if self._n % self.every:
            return True
        try:
            self._queue.put_nowait((np.array(x, copy=True), served))
        except queue.Full:
            return False
        return True

    def stop(self, wait: bool = True) -> None:
        """Tell the worker to finish; ``wait``: join it (not on a power cut)."""
        with contextlib.suppress(queue.Full):
            if wait:
                self._queue.put(None, timeout=1.0)
            else:
                self._queue.put_nowait(None)
        if wait:
            self._thread.join(5)

    def _work(self) -> None:
        model, sha = self.candidate.model, self.candidate.sha256
        while True:
            item = self._queue.get()
            if item is None:
                return
            x, served = item
            t0 = time.perf_counter()
            error: str | None = None
            agree: bool | None = None
            try:
                outputs = model.run(x)
                if scan(outputs)[0]:
                    error = "non_finite"
                else:
                    agree = top1_classes(outputs) == served
            except Exception:
                error = "runtime_error"
            self._telemetry.record_shadow(sha, (time.perf_counter() - t0) * 1e6, error, agree)


__all__ = ["QUEUE", "Shadow", "sample_every"]
