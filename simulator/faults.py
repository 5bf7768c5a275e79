"""Model behaviour of one hardware class: slow silicon, or a model that breaks only there.

A :class:`ClassRuntime` wraps the fleet's shared session cache for one
hardware class. The agent code is the real one; what changes is what the
model does on that class, exactly as a real NPU/driver quirk would look to it:

- ``failing_shas``: models that produce NaN on this class (e.g. an op the
  class's delegate miscompiles). The agent sees non-finite outputs, counts
  them and reports them in telemetry; the gates judge it.
- ``infer_delay_s``: every ``run`` takes that much longer (a slow device).
- ``load_delay_s``: loading/warming a model takes that much longer, which
  widens the window in which a crash lands "mid-swap".
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.runtime import LoadedModel, RuntimeFactory


class NaNModel:
    """A loaded model whose outputs come back NaN-filled (same shapes and dtypes)."""

    def __init__(self, inner: LoadedModel) -> None:
        self.inner = inner
        self.sha256 = inner.sha256
        self.input_name = inner.input_name
        self.input_shape = inner.input_shape
        self.input_dtype: Any = inner.input_dtype

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        outs = self.inner.run(x)
        return [np.full_like(o, np.nan) if np.issubdtype(o.dtype, np.floating) else o for o in outs]


class SlowModel:
    """A loaded model that takes ``delay_s`` longer per call (the caller runs it off the event loop)."""

    def __init__(self, inner: LoadedModel, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s
        self.sha256 = inner.sha256
        self.input_name = inner.input_name
        self.input_shape = inner.input_shape
        self.input_dtype: Any = inner.input_dtype

    def run(self, x: np.ndarray) -> list[np.ndarray]:
        time.sleep(self.delay_s)
        return self.inner.run(x)


class ClassRuntime:
    """The runtime a device of one hardware class sees, over the fleet's shared session cache."""

    def __init__(
        self,
        shared: RuntimeFactory,
        *,
        failing_shas: frozenset[str] = frozenset(),
        infer_delay_s: float = 0.0,
        load_delay_s: float = 0.0,
    ) -> None:
        self.shared = shared
        self.failing_shas = failing_shas
        self.infer_delay_s = infer_delay_s
        self.load_delay_s = load_delay_s
        self._wrapped: dict[str, LoadedModel] = {}
        self._guard = threading.Lock()

    def supports(self, target: str) -> bool:
        return self.shared.supports(target)

    def load(self, path: Path, sha256: str) -> LoadedModel:
        if self.load_delay_s > 0:
            time.sleep(self.load_delay_s)  # runs in the agent's worker thread, like a real load
        model = self.shared.load(path, sha256)
        if sha256 not in self.failing_shas and self.infer_delay_s <= 0:
            return model
        with self._guard:
            cached = self._wrapped.get(sha256)
            if cached is None:
                cached = NaNModel(model) if sha256 in self.failing_shas else model
                if self.infer_delay_s > 0:
                    cached = SlowModel(cached, self.infer_delay_s)
                self._wrapped[sha256] = cached
        return cached


@dataclass(frozen=True)
class ClassBehaviour:
    """What a :class:`ClassRuntime` does, as plain data (a worker process builds its own runtime)."""

    failing_shas: frozenset[str] = frozenset()
    infer_delay_s: float = 0.0
    load_delay_s: float = 0.0

    def runtime(self, shared: RuntimeFactory) -> ClassRuntime:
        return ClassRuntime(
            shared,
            failing_shas=self.failing_shas,
            infer_delay_s=self.infer_delay_s,
            load_delay_s=self.load_delay_s,
        )


__all__ = ["ClassBehaviour", "ClassRuntime", "NaNModel", "SlowModel"]
