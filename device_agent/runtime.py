"""The runtime seam: turn a verified model file into something that answers ``run(x)``.

The agent depends on the :class:`RuntimeFactory` protocol only, so the
simulator can share sessions between hundreds of devices and later targets
(LiteRT, Ethos-U) plug in without touching the update logic.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import onnxruntime as ort

ONNX_TARGETS = frozenset({"arm64-cpu", "x86_64-cpu", "cpu", "onnx-cpu"})

_NP_TYPES: dict[str, Any] = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(double)": np.float64,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(int8)": np.int8,
    "tensor(uint8)": np.uint8,
    "tensor(bool)": np.bool_,
}


class RuntimeLoadError(Exception):
    """The model could not be loaded or warmed up (corrupt graph, unsupported ops, ...)."""

    code = "load_failed"


class UnsupportedTarget(RuntimeLoadError):
    """The bundle targets hardware/runtimes this device does not have."""

    code = "unsupported_target"


class LoadedModel(Protocol):
    """A ready-to-serve model; ``run`` must be safe to call from several threads at once."""

    sha256: str
    input_name: str
    input_shape: tuple[int, ...]  # dynamic dims resolved to 1
    input_dtype: Any

    def run(self, x: np.ndarray) -> list[np.ndarray]: ...


class RuntimeFactory(Protocol):
    def supports(self, target: str) -> bool: ...

    def load(self, path: Path, sha256: str) -> LoadedModel: ...


class OnnxModel:
    """An onnxruntime InferenceSession (thread-safe ``run``) with its input signature."""

    def __init__(self, session: ort.InferenceSession, sha256: str) -> None:
        self.session = session
        self.sha256 = sha256
        inp = session.get_inputs()[0]
        self.input_name: str = inp.name
        self.input_shape: tuple[int, ...] = tuple(d if isinstance(d, int) and d > 0 else 1 for d in inp.shape)
        self.input_dtype: Any = _NP_TYPES.get(inp.type, np.float32)
        self._extra_inputs = [
            (
                i.name,
                tuple(d if isinstance(d, int) and d > 0 else 1 for d in i.shape),
                _NP_TYPES.get(i.type, np.float32),
            )
            for i in session.get_inputs()[1:]
        ]

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        feed = {self.input_name: np.asarray(x, dtype=self.input_dtype)}
        outputs = self.session.run(None, feed)
        return [np.asarray(o) for o in outputs]

    def warm_up(self) -> None:
        """One run on zeros shaped from every input, so the first real request is not the slow one."""
        feed = {self.input_name: np.zeros(self.input_shape, dtype=self.input_dtype)}
        for name, shape, dtype in self._extra_inputs:
            feed[name] = np.zeros(shape, dtype=dtype)
        self.session.run(None, feed)


class OnnxRuntimeFactory:
    """Loads ONNX models on the CPU execution provider with small thread pools."""

    def __init__(self, targets: frozenset[str] | set[str] = ONNX_TARGETS, intra_op_threads: int = 1) -> None:
        self.targets = frozenset(targets)
        self.intra_op_threads = intra_op_threads

    def supports(self, target: str) -> bool:
        return target in self.targets

    def load(self, path: Path, sha256: str) -> OnnxModel:
        path = Path(path)
        if path.suffix != ".onnx":
            raise UnsupportedTarget(f"{path.name}: onnxruntime runs .onnx files only")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.intra_op_threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3
        try:
            session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
            model = OnnxModel(session, sha256)
            model.warm_up()
        except Exception as exc:  # onnxruntime raises its own exception zoo
            raise RuntimeLoadError(f"{path.name}: {exc}") from exc
        return model


class SharedRuntimeFactory:
    """Caches loaded models by sha256: identical models load once for a whole simulated fleet.

    onnxruntime sessions are thread-safe for ``run``, so sharing one is exactly
    what a real device does with its single session, minus the memory.
    """

    def __init__(self, inner: RuntimeFactory | None = None) -> None:
        self.inner: RuntimeFactory = inner or OnnxRuntimeFactory()
        self._cache: dict[str, LoadedModel] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()
        self.loads = 0

    def supports(self, target: str) -> bool:
        return self.inner.supports(target)

    def load(self, path: Path, sha256: str) -> LoadedModel:
        with self._guard:
            cached = self._cache.get(sha256)
            if cached is not None:
                return cached
            lock = self._locks.setdefault(sha256, threading.Lock())
        with lock:
            cached = self._cache.get(sha256)
            if cached is None:
                cached = self.inner.load(path, sha256)
                self.loads += 1
                with self._guard:
                    self._cache[sha256] = cached
        return cached
