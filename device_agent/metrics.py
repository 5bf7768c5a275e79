"""The agent's counters (directives, refusals, swaps, reverts, failures by reason, ...).

Bumped from the inference threads and the loop alike, so behind one lock; read
whole by ``Agent.metrics`` (the simulator's and the tests' view of a device).
"""

from __future__ import annotations

import threading
from collections import Counter


class Metrics:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._counts[key] += n

    def get(self, key: str) -> int:
        with self._lock:
            return self._counts[key]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)


__all__ = ["Metrics"]
