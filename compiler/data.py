"""Calibration and evaluation samples from ``.npz`` files.

Two layouts are accepted, because both are what people actually save:

- one array per model input, keyed by the input's name;
- for single-input models, one array under ``x``, ``input`` or ``inputs``.

Labels (optional) live under ``y`` or ``labels``. The first axis of every
array is the sample axis. Shapes and dtypes are checked against the model's
declared inputs *before* quantization, so a wrong file fails in milliseconds
with a message naming the key and the expected shape, not deep inside
onnxruntime.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from onnxruntime.quantization import CalibrationDataReader

from compiler.errors import InvalidData
from compiler.signature import TensorSpec
from compiler.sniff import describe, is_zip, read_head

SINGLE_INPUT_KEYS = ("x", "input", "inputs")
LABEL_KEYS = ("y", "labels")
DEFAULT_BATCH = 32


@dataclass(frozen=True)
class Samples:
    """Validated model inputs (one array per input name, same length) and optional labels."""

    inputs: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.inputs.values())))

    def take(self, index: np.ndarray) -> Samples:
        labels = None if self.labels is None else self.labels[index]
        return Samples({k: v[index] for k, v in self.inputs.items()}, labels)

    def ranges(self) -> dict[str, dict[str, float]]:
        """Per input: the smallest and largest finite value, the range the model was calibrated on.

        The manifest carries it (``quantization.input_ranges``) so a device can count inputs
        outside it: an int8 model saturates there, however good it was inside.
        """
        out: dict[str, dict[str, float]] = {}
        for name, values in self.inputs.items():
            v = np.asarray(values)
            if v.dtype.kind not in "fiu" or v.size == 0:
                continue
            finite = v[np.isfinite(v)] if v.dtype.kind == "f" else v
            if finite.size:
                out[name] = {"min": float(finite.min()), "max": float(finite.max())}
        return out

    def split(self, held_out: float = 0.2, seed: int = 0) -> tuple[Samples, Samples]:
        """Deterministic shuffle-split into (calibration, held-out).

        Deterministic so that compiling the same model and data twice gives
        the same report; both parts must be non-empty.
        """
        n = len(self)
        n_eval = round(n * held_out)
        if n < 2 or n_eval < 1 or n_eval >= n:
            raise InvalidData(
                f"{n} samples cannot be split into calibration and held-out sets; "
                "give more samples or a separate evaluation file"
            )
        order = np.random.default_rng(seed).permutation(n)
        return self.take(np.sort(order[n_eval:])), self.take(np.sort(order[:n_eval]))

    def batches(
        self, specs: tuple[TensorSpec, ...], size: int | None = None
    ) -> Iterator[dict[str, np.ndarray]]:
        """Feeds for ``session.run``: the model's fixed batch size, else ``size`` (DEFAULT_BATCH)."""
        size = _batch_size(specs) if _fixed(specs) or size is None else size
        n = len(self)
        for start in range(0, n - n % size if _fixed(specs) else n, size):
            yield {k: v[start : start + size] for k, v in self.inputs.items()}

    def usable(self, specs: tuple[TensorSpec, ...]) -> int:
        """How many samples ``batches`` feeds (a fixed batch size drops the remainder)."""
        n = len(self)
        return n - n % _batch_size(specs) if _fixed(specs) else n


def _fixed(specs: tuple[TensorSpec, ...]) -> bool:
    return any(s.batch_size is not None for s in specs)


def _batch_size(specs: tuple[TensorSpec, ...]) -> int:
    fixed = {s.batch_size for s in specs if s.batch_size is not None}
    if len(fixed) > 1:
        raise InvalidData(f"model inputs declare different fixed batch sizes: {sorted(fixed)}")
    return fixed.pop() if fixed else DEFAULT_BATCH


class SamplesReader(CalibrationDataReader):
    """Feeds samples to onnxruntime's calibrator batch by batch (one pass).

    ``batch_size`` applies to dynamic-batch models only: a moving-average
    calibration averages per-feed ranges, so one sample per feed makes it a
    per-sample average that does not depend on how the data was chunked.
    """

    def __init__(
        self, samples: Samples, specs: tuple[TensorSpec, ...], batch_size: int | None = None
    ) -> None:
        self._feeds = samples.batches(specs, batch_size)

    def get_next(self) -> dict[str, Any] | None:
        return next(self._feeds, None)


def load_samples(path: Path, specs: tuple[TensorSpec, ...]) -> Samples:
    """Load and validate an ``.npz`` against the model's input specs."""
    path = Path(path)
    if not path.is_file():
        raise InvalidData(f"{path}: no such file")
    head = read_head(path)
    if not is_zip(head):  # np.load would take it for a pickle ("contains pickled data") or an .npy
        raise InvalidData(f"{path}: not an .npz archive: the file is {describe(head)}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise InvalidData(f"{path}: not a readable .npz file ({exc})") from exc
    return samples_from_arrays(path, arrays, specs)


def samples_from_arrays(
    path: Path | str, arrays: dict[str, np.ndarray], specs: tuple[TensorSpec, ...]
) -> Samples:
    """Validate arrays laid out like an ``.npz`` (see module doc); ``path`` names the source in errors."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    inputs = _select_inputs(path, arrays, specs)
    n = None
    for spec in specs:
        inputs[spec.name] = _check_array(path, spec, inputs[spec.name])
        count = len(inputs[spec.name])
        if n is not None and count != n:
            raise InvalidData(
                f"{path}: inputs have different sample counts ({n} vs {count} for {spec.name!r})"
            )
        n = count
    if not n:
        raise InvalidData(f"{path}: holds no samples")
    labels = _labels(path, arrays, n)
    return Samples(inputs, labels)


def _select_inputs(
    path: Path | str, arrays: dict[str, np.ndarray], specs: tuple[TensorSpec, ...]
) -> dict[str, Any]:
    names = [s.name for s in specs]
    if all(name in arrays for name in names):
        return {name: arrays[name] for name in names}
    if len(specs) == 1:
        for key in SINGLE_INPUT_KEYS:
            if key in arrays:
                return {names[0]: arrays[key]}
        expected = " or ".join(repr(k) for k in (names[0], *SINGLE_INPUT_KEYS))
    else:
        missing = [n for n in names if n not in arrays]
        expected = "one array per model input; missing " + ", ".join(repr(m) for m in missing)
    raise InvalidData(f"{path}: expected {expected}; found keys {sorted(arrays) or 'none'}")


def _check_array(path: Path | str, spec: TensorSpec, array: np.ndarray) -> np.ndarray:
    want = spec.numpy_dtype
    # Numbers widen into a float input; floats never silently truncate into an integer input.
    allowed = {"f": "biuf", "i": "biu", "u": "biu", "b": "b"}.get(want.kind, "")
    if array.dtype.kind not in allowed:
        raise InvalidData(f"{path}: {spec.name!r} has dtype {array.dtype}, the model wants {want}")
    expected_rank = len(spec.shape)
    if array.ndim != expected_rank or expected_rank == 0:
        raise InvalidData(
            f"{path}: {spec.name!r} has shape {list(array.shape)}, expected rank {expected_rank} "
            f"(samples first) matching the model's {list(spec.shape)}"
        )
    for axis, (got, declared) in enumerate(zip(array.shape[1:], spec.shape[1:], strict=True), start=1):
        if isinstance(declared, int) and got != declared:
            raise InvalidData(
                f"{path}: {spec.name!r} has shape {list(array.shape)}; axis {axis} must be {declared} "
                f"(model input shape {list(spec.shape)})"
            )
    converted = np.ascontiguousarray(array, dtype=want)
    if want.kind == "f" and not np.isfinite(converted).all():
        raise InvalidData(f"{path}: {spec.name!r} contains NaN or infinite values")
    return converted


def _labels(path: Path | str, arrays: dict[str, np.ndarray], n: int) -> np.ndarray | None:
    for key in LABEL_KEYS:
        if key in arrays:
            labels = arrays[key]
            if labels.ndim != 1 or len(labels) != n:
                raise InvalidData(f"{path}: labels {key!r} must have shape [{n}], got {list(labels.shape)}")
            integral = labels.dtype.kind in "iu" or (
                labels.dtype.kind == "f" and np.array_equal(labels, np.round(labels))
            )
            if not integral:
                raise InvalidData(f"{path}: labels {key!r} must be integer class ids, got {labels.dtype}")
            return labels.astype(np.int64)
    return None
