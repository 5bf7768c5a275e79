"""Arrays read on several threads at once: numpy's header parse must not hit CPython's AST race."""

from __future__ import annotations

import gc
import io
import sys
import threading
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from device_agent import npy


@pytest.fixture
def racy_interpreter() -> Iterator[None]:
    """What makes the race likely: GIL switches as often as possible and a Python garbage-collector
    callback (a fleet process clocks its collections with one) run in the middle of the AST
    constructor's allocations; threads at different stack depths."""
    interval, thresholds = sys.getswitchinterval(), gc.get_threshold()

    def callback(phase: str, info: dict[str, int]) -> None:
        pass

    sys.setswitchinterval(1e-6)
    gc.set_threshold(5)
    gc.callbacks.append(callback)
    try:
        yield
    finally:
        gc.callbacks.remove(callback)
        gc.set_threshold(*thresholds)
        sys.setswitchinterval(interval)


def _hammer(read: Callable[[], object], threads: int = 8, each: int = 600) -> list[str]:
    errors: list[str] = []

    def deep(n: int) -> None:  # each thread parses from its own stack depth
        if n:
            deep(n - 1)
            return
        for _ in range(each):
            try:
                read()
            except SystemError as exc:
                errors.append(str(exc))

    workers = [threading.Thread(target=deep, args=(4 * i,)) for i in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return errors


def test_golden_sets_and_npy_bodies_parse_on_many_threads_at_once(racy_interpreter: None) -> None:
    buf = io.BytesIO()
    np.savez(buf, input=np.zeros((4, 8), np.float32), **{"ref:y": np.ones((4, 3))})
    archive = buf.getvalue()
    one = io.BytesIO()
    np.save(one, np.arange(6, dtype=np.float32).reshape(2, 3))
    body = one.getvalue()

    def read() -> None:
        with npy.npz(archive) as a:
            assert a["input"].shape == (4, 8) and a["ref:y"].shape == (4, 3)
        assert npy.array(body).shape == (2, 3)

    assert _hammer(read) == []
