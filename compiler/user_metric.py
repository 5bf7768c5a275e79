"""A user's own quality measure: ``metric(fp32_outputs, int8_outputs, labels) -> float``.

For tasks no built-in kind measures (a keyword spotter's detection rate, an
OCR pipeline's character error rate after decoding), the user names a Python
callable as ``module:function``. It gets the fp32 and int8 outputs of the
held-out samples as ``{output name: array}`` (sample axis first) and the labels
(or None), and returns one number; higher is better and the gate holds it to
``metric_threshold`` (``compiler.gate``), alone (``metric_only``) or with the
kinds' own figures.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from compiler.errors import InvalidData

MetricFn = Callable[[dict[str, np.ndarray], dict[str, np.ndarray], np.ndarray | None], float]


@dataclass(frozen=True)
class UserMetric:
    name: str
    fn: MetricFn

    @classmethod
    def load(cls, spec: str) -> UserMetric:
        """``module:function``; an import or lookup failure is one line naming the spec."""
        module, sep, attr = spec.partition(":")
        if not sep or not module or not attr:
            raise InvalidData(f"--metric: expected module:function, got {spec!r}")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as exc:
            raise InvalidData(f"--metric {spec}: cannot import ({exc})") from exc
        if not callable(fn):
            raise InvalidData(f"--metric {spec}: {attr} is not callable")
        return cls(spec, fn)

    def measure(
        self, fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray], labels: np.ndarray | None
    ) -> dict[str, Any]:
        """``{"name", "value"}``; a non-finite value is ``None`` (the gate fails it)."""
        try:
            value = float(self.fn(dict(fp32), dict(int8), labels))
        except Exception as exc:  # the user's code: any failure is reported, not a traceback
            raise InvalidData(f"metric {self.name} raised {type(exc).__name__}: {exc}") from exc
        return {"name": self.name, "value": value if math.isfinite(value) else None}
