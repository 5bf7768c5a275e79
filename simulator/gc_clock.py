"""When and how long a process's garbage collector ran, per generation (``gc.callbacks``).

A fleet process holds thousands of agents and their millions of objects: a full
collection walks all of them with the GIL held, so on a loaded machine it stalls
every agent's loop for seconds at once. Measuring it is how the fleet's
``gc.freeze()`` after start (:meth:`simulator.fleet.Fleet.start`) is judged.
"""

from __future__ import annotations

import contextlib
import gc
import time
from typing import Any


class GcClock:
    """Collections this process ran while started: totals per generation and the longest one, and
    with ``keep`` each one's (monotonic end, generation, seconds) for :meth:`between` a window.

    A busy fleet process collects its young generation tens of times a second: a record each is
    kept only where a window is asked for (the bench's own process), never in a fleet worker."""

    def __init__(self, keep: bool = False) -> None:
        self.runs: list[tuple[float, int, float]] = []
        self.keep = keep
        self._totals: dict[str, list[float]] = {}
        self._longest = 0.0
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
            return
        seconds, gen = time.perf_counter() - self._start, int(info.get("generation", -1))
        acc = self._totals.setdefault(str(gen), [0, 0.0])
        acc[0] += 1
        acc[1] += seconds
        self._longest = max(self._longest, seconds)
        if self.keep:
            self.runs.append((time.monotonic(), gen, seconds))

    def start(self) -> GcClock:
        gc.callbacks.append(self._callback)
        return self

    def stop(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)

    def totals(self) -> dict[str, list[float]]:
        """Per generation, ``[collections, seconds]`` since started."""
        return {gen: [n, round(sec, 3)] for gen, (n, sec) in self._totals.items()}

    def between(self, t0: float, t1: float) -> dict[str, list[float]]:
        """Per generation, ``[collections, seconds]`` of those that ended within ``[t0, t1]``
        (a clock made with ``keep``)."""
        out: dict[str, list[float]] = {}
        for when, gen, seconds in self.runs:
            if t0 <= when <= t1:
                acc = out.setdefault(str(gen), [0, 0.0])
                acc[0] += 1
                acc[1] = round(acc[1] + seconds, 3)
        return out

    def longest(self) -> float:
        """The longest single collection, seconds (what one stall of every loop in the process cost),
        to the microsecond: a young collection of a small fleet takes well under a millisecond."""
        return round(self._longest, 6)


__all__ = ["GcClock"]
