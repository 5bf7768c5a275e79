"""App-reported outcomes on the device: a number an application measured after an inference (a
click, a correction time, a conversion) joined to the model that made the prediction.

``POST /v1/outcomes {"inference_id", "metric", "value"}`` (or ``{"outcomes": [...]}``) is
joined like a label (``device_agent.labels``): the inference must still be in the agent's ring
of recent predictions, which names the model hash. The value is counted in that model's
telemetry as the metric's count, sum and sum of squares (``ModelStats.outcomes``): additive
over windows and devices, and enough for a mean and its variance, which is what an experiment
compares. An outcome is counted once per (inference, metric): a repeat is ``duplicate``, so an
app that retries a post it did not see answered counts nothing twice.
"""

from __future__ import annotations

import math
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

METRIC_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
MAX_METRICS = 16  # distinct outcome metrics per model and window: a bounded telemetry batch


class OutcomeStatus(StrEnum):
    MATCHED = "matched"
    UNKNOWN = "unknown"  # no such prediction held here (never made here, pushed out, or a restart)
    DUPLICATE = "duplicate"
    INVALID = "invalid"


@dataclass(frozen=True, slots=True)
class OutcomeResult:
    status: OutcomeStatus
    detail: str = ""


def check(metric: Any, value: Any) -> str | None:
    """Why ``metric``/``value`` is not an outcome (None: it is one)."""
    if not isinstance(metric, str) or not METRIC_RE.match(metric):
        return "metric must be 1 to 64 characters of a-z, 0-9 and _, starting with a letter"
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(float(value)):
        return "value must be a finite number"
    if abs(float(value)) > 1e12:
        return "value must lie within +-1e12"
    return None


class OutcomeBook:
    """The (inference, metric) pairs counted already, the newest ``size`` of them: a repeat of a
    pair older than that is no longer recognised (its prediction is out of the ring by then)."""

    def __init__(self, size: int) -> None:
        self.size = max(1, size)
        self._seen: OrderedDict[tuple[int, str], None] = OrderedDict()
        self._lock = threading.Lock()

    def mark(self, id128: int, metric: str) -> bool:
        """Record the pair; False if it was counted before."""
        key = (id128, metric)
        with self._lock:
            if key in self._seen:
                return False
            self._seen[key] = None
            if len(self._seen) > self.size:
                self._seen.popitem(last=False)
        return True


__all__ = ["MAX_METRICS", "METRIC_RE", "OutcomeBook", "OutcomeResult", "OutcomeStatus", "check"]
