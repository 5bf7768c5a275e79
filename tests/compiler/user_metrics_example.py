"""A user metric as a user would write one (``--metric user_metrics_example:within_tolerance``)."""

from __future__ import annotations

import numpy as np


def within_tolerance(
    fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray], labels: np.ndarray | None
) -> float:
    """Share of samples whose every output value is within 0.05 of the float model's."""
    close = [np.abs(fp32[k] - int8[k]).reshape(len(fp32[k]), -1).max(axis=1) <= 0.05 for k in fp32]
    return float(np.logical_and.reduce(close).mean())


def broken(fp32: dict[str, np.ndarray], int8: dict[str, np.ndarray], labels: np.ndarray | None) -> float:
    raise RuntimeError("the metric's own bug")
