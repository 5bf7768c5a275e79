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
    """Collections this process ran while started: (monotonic end, generation, seconds) each."""

    def __init__(self) -> None:
        self.runs: list[tuple[float, int, float]] = []
        self._start = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.runs.append(
                (time.monotonic(), int(info.get("generation", -1)), time.perf_counter() - self._start)
            )

    def start(self) -> GcClock:
        gc.callbacks.append(self._callback)
        return self

    def stop(self) -> None:
        with contextlib.suppress(ValueError):
            gc.callbacks.remove(self._callback)

    def between(self, t0: float = float("-inf"), t1: float = float("inf")) -> dict[str, list[float]]:
        """Per generation, ``[collections, seconds]`` of those that ended within ``[t0, t1]``."""
        out: dict[str, list[float]] = {}
        for when, gen, seconds in self.runs:
            if t0 <= when <= t1:
                acc = out.setdefault(str(gen), [0, 0.0])
                acc[0] += 1
                acc[1] = round(acc[1] + seconds, 3)
        return out

    def longest(self) -> float:
        """The longest single collection, seconds (what one stall of every loop in the process cost)."""
        return round(max((s for _, _, s in self.runs), default=0.0), 3)


__all__ = ["GcClock"]
