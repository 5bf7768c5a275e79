"""Feature availability: is an inference's input there, whole, and inside what the model was calibrated on?

Three things go wrong with a model's input in the field long before its accuracy
shows it: a value is NaN (a sensor dropped out), the input is missing or has the
wrong shape (an application bug, a changed camera), or the values lie outside the
range the int8 model was calibrated on (it saturates there). :class:`InputCheck`
answers all three for one input; telemetry runs it on a sample of inferences (every
``sketch_every``-th, like the drift sketches) and counts per input name, in
:data:`device_agent.wire.INPUT_CHECKS` order.

On the same sample, an input with a calibration range also has its values counted per
:data:`device_agent.wire.INPUT_BUCKETS` bucket (:meth:`InputCheck.buckets`): equal bins over
``[min, max]`` plus one below and one above. The share outside says *that* inputs drifted;
these counts say *where* they went (all pinned at a rail, shifted, or spread wider), in the
bins the int8 model was calibrated on, so fleets with different input scales still compare.

The declared shape and the calibration range come from the release-signed
manifest the model was installed with (``io_signature`` and
``quantization.input_ranges``, which the compiler writes); a model whose manifest
lacks them is still checked for NaN and rank.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from device_agent.wire import INPUT_BUCKETS

# Values counted per sampled request at most: a large tensor (an image) is read with a stride,
# so the cost of a sample stays bounded whatever the input's size.
MAX_BUCKET_VALUES = 1024
_INNER = len(INPUT_BUCKETS) - 2  # equal bins over [min, max]; then one below, one above

Dim = int | None  # a fixed size, or None for a dynamic (named or unnamed) dimension


@dataclass(frozen=True, slots=True)
class InputCheck:
    """One model input: its name, its declared shape (None: unknown) and its calibration range."""

    name: str
    shape: tuple[Dim, ...] | None = None
    lo: float | None = None
    hi: float | None = None

    @classmethod
    def from_manifest(cls, model_input: str, manifest: Mapping[str, Any] | None) -> InputCheck:
        """The check for the model's (first) input as the manifest declares it.

        The runtime's own input name can differ from the one the compiler saw (a TFLite
        converter renames tensors); with one input on each side they are the same input.
        """
        manifest = manifest or {}
        sig = manifest.get("io_signature") or {}
        declared = [i for i in sig.get("inputs") or [] if isinstance(i, Mapping)]
        spec = next((i for i in declared if i.get("name") == model_input), None)
        if spec is None and len(declared) == 1:
            spec = declared[0]
        name = str(spec["name"]) if spec is not None and "name" in spec else model_input
        shape: tuple[Dim, ...] | None = None
        if spec is not None and isinstance(spec.get("shape"), list):
            shape = tuple(
                d if isinstance(d, int) and not isinstance(d, bool) and d > 0 else None for d in spec["shape"]
            )
        ranges = (manifest.get("quantization") or {}).get("input_ranges") or {}
        rng = ranges.get(name) if isinstance(ranges, Mapping) else None
        if rng is None and isinstance(ranges, Mapping) and len(ranges) == 1:
            rng = next(iter(ranges.values()))
        lo = hi = None
        if isinstance(rng, Mapping):
            lo, hi = _number(rng.get("min")), _number(rng.get("max"))
        return cls(name, shape, lo, hi)

    def __call__(self, x: Any) -> tuple[bool, bool, bool]:
        """(has NaN, missing or misshapen, outside the calibration range) for one request's input."""
        if type(x) is not np.ndarray or x.dtype.kind not in "fiub" or x.size == 0:
            return False, True, False
        if self.shape is not None:
            if x.ndim != len(self.shape):
                return False, True, False
            # The first dimension is the batch: any number of rows is the same input.
            for want, got in zip(self.shape[1:], x.shape[1:], strict=True):
                if want is not None and want != got:
                    return False, True, False
        values = x
        nan = False
        if x.dtype.kind == "f":
            isnan = np.isnan(x)
            nan = bool(isnan.any())
            if nan:
                values = x[~isnan]
        if (self.lo is None and self.hi is None) or values.size == 0:
            return nan, False, False
        low, high = values.min(), values.max()
        outside = bool((self.lo is not None and low < self.lo) or (self.hi is not None and high > self.hi))
        return nan, False, outside

    def buckets(self, x: Any) -> np.ndarray | None:
        """Counts of ``x``'s values per ``INPUT_BUCKETS`` bucket (None: no calibration range, or no
        numeric values). The maximum itself is inside the range, as :meth:`__call__` judges it;
        NaN is not counted (the check counts it), -inf and +inf land below and above."""
        lo, hi = self.lo, self.hi
        if lo is None or hi is None or not hi > lo:
            return None
        if type(x) is not np.ndarray or x.dtype.kind not in "fiub" or x.size == 0:
            return None
        flat = x.reshape(-1)
        if flat.size > MAX_BUCKET_VALUES:
            flat = flat[:: -(-flat.size // MAX_BUCKET_VALUES)]
        v = flat.astype(np.float64)
        if x.dtype.kind == "f":
            v = v[~np.isnan(v)]
        # 0: below min; 1.._INNER: the equal bins (index by floor, the maximum in the last one)
        idx = np.floor((v - lo) * (_INNER / (hi - lo)))
        idx = np.clip(idx, -1, _INNER - 1) + 1
        idx[v > hi] = _INNER + 1
        return np.bincount(idx.astype(np.intp), minlength=_INNER + 2)


def _number(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, int | float):
        return None
    f = float(v)
    return f if f == f and abs(f) != float("inf") else None


__all__ = ["InputCheck"]
