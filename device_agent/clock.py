"""The agent's wall clock, injectable so a device's clock can be wrong (it often is).

``Agent(config, trust, clock=...)`` takes any ``() -> float`` returning seconds since
the epoch, like :func:`time.time` (the default). Everything the agent *dates* reads
it: ``Reported.ts``, ``Event.ts``, ``Status.ts``, telemetry batch windows, the
directive ``expires_at``/``not_before`` checks and the TUF metadata expiry checks.
Everything the agent *times* does not: backoff, probation windows, telemetry
intervals, timeouts and latencies run on :func:`time.monotonic` / the loop's clock,
so a skewed or jumping wall clock never stretches or shortens them.

:class:`SkewedClock` is the simulator's fault: a fixed offset that can be changed
while the agent runs (``clock.skew_s = 7200`` makes the device two hours fast).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, datetime

WallClock = Callable[[], float]  # seconds since the epoch, like time.time


class SkewedClock:
    """``base() + skew_s``; ``skew_s`` may be changed at any time (a clock jump)."""

    def __init__(self, skew_s: float = 0.0, base: WallClock = time.time) -> None:
        self.skew_s = float(skew_s)
        self.base = base

    def __call__(self) -> float:
        return self.base() + self.skew_s

    def __repr__(self) -> str:
        return f"SkewedClock({self.skew_s:+.3f} s)"


def now_utc(clock: WallClock) -> datetime:
    """``clock()`` as an aware UTC datetime."""
    return datetime.fromtimestamp(clock(), UTC)


__all__ = ["SkewedClock", "WallClock", "now_utc"]
