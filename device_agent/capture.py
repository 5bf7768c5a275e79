"""Capture for retraining: keep a sample of live inferences (inputs, outputs or both) with their ids.

The directive's ``capture`` policy (:class:`device_agent.wire.Capture`) says how
many, what and how much disk; without one nothing is kept. ``Agent.infer`` decides
by one random draw against ``rate`` and hands a sampled inference to
:meth:`Capturer.offer`, which copies the arrays and queues them without blocking:
a full queue skips the sample (counted as ``capture_skipped``). One writer thread
encodes the items and appends them to the on-disk store
(:mod:`device_agent.capture_store`), which seals them into upload batches; the
uploader (:mod:`device_agent.capture_upload`) sends those.

An item is counted ``captured`` (in the model's telemetry) once it is on disk.
The writer thread exists only while a policy samples, so a simulated fleet of
thousands of agents without capture carries no threads for it.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from device_agent.capture_store import CaptureStore, PolicyState
from device_agent.ids import format_id, id_millis
from device_agent.metrics import Metrics
from device_agent.telemetry import Telemetry
from device_agent.wire import Capture

log = logging.getLogger(__name__)

QUEUE = 256  # sampled inferences waiting for the writer; more are skipped, never block inference
BATCH_AGE_S = 5.0  # an open batch older than this is sealed, so captures flow while inferences trickle
POLL_S = 0.1  # the writer drains the queue this often

_Item = tuple[int, str, str, np.ndarray, list[np.ndarray], str]  # id, sha, input name, x, outputs, keep


def tensor(a: np.ndarray) -> dict[str, Any]:
    """One array as the upload carries it: dtype name, shape, base64 of its C-order little-endian bytes."""
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return {"dtype": a.dtype.name, "shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode()}


def iso_millis(ms: int) -> str:
    """ISO 8601 UTC with milliseconds and ``Z`` (the UUIDv7's own time)."""
    secs, rem = divmod(ms, 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{rem:03d}Z"


def encode_item(id128: int, input_name: str, x: np.ndarray, outputs: list[np.ndarray], keep: str) -> bytes:
    item: dict[str, Any] = {"inference_id": format_id(id128), "ts": iso_millis(id_millis(id128))}
    if keep in ("inputs", "both"):
        item["inputs"] = {input_name: tensor(x)}
    if keep in ("outputs", "both"):
        item["outputs"] = [tensor(o) for o in outputs]
    return json.dumps(item, separators=(",", ":")).encode()


class Capturer:
    """The capture policy in force, the queue from the inference threads, and the writer thread.

    The queue is a deque the writer drains every ``POLL_S``: appending is atomic and wakes
    no one, so a sampled inference pays for its copies and one append, and the writer
    encodes and writes a burst at a time with one flush, instead of taking the GIL for
    every item while inferences want it.
    """

    def __init__(
        self,
        store: CaptureStore,
        telemetry: Telemetry,
        metrics: Metrics,
        *,
        batch_age_s: float = BATCH_AGE_S,
        on_sealed: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.telemetry = telemetry
        self.metrics = metrics
        self.batch_age_s = batch_age_s
        self.on_sealed = on_sealed  # the uploader's wake-up (called from the writer thread)
        state = store.load_policy()
        self.state = state
        self.rate = 0.0  # read on every inference: 0 means off
        self.keep = "both"
        self._pending: deque[_Item] = deque()
        self._thread: threading.Thread | None = None
        self._quit = threading.Event()
        self._drain_on_quit = True
        self._stopped = False
        if state.capture is not None:
            store.set_quota(state.capture.quota_bytes)

    @property
    def upload_url(self) -> str | None:
        return self.state.upload_url

    def start(self) -> None:
        """Sample by the stored policy (a restart resumes what the last directive asked)."""
        self._stopped = False
        self._enable(self.state.capture)

    def apply(self, capture: Capture | None) -> int:
        """Take a directive's policy (None: stop sampling; what is stored still goes out).

        Persisted first, so a restart resumes it before the retained directive is judged again.
        Returns the items evicted to meet a smaller quota."""
        url = capture.upload_url if capture is not None else self.state.upload_url
        state = PolicyState(capture, url)
        if state != self.state:
            self.store.save_policy(state)
            self.state = state
        evicted = self.store.set_quota(capture.quota_bytes) if capture is not None else 0
        if evicted:
            self._evicted(evicted)
        if not self._stopped:
            self._enable(capture)
        return evicted

    def _enable(self, capture: Capture | None) -> None:
        if capture is None or capture.sample_rate <= 0:
            self.rate = 0.0
            return
        self.keep = capture.keep
        if self._thread is None or not self._thread.is_alive():
            self._quit.clear()
            self._drain_on_quit = True
            self._thread = threading.Thread(
                target=self._work, name=f"{self.store.device_id}-capture", daemon=True
            )
            self._thread.start()
        self.rate = capture.sample_rate

    def offer(self, id128: int, sha256: str, input_name: str, x: Any, outputs: list[np.ndarray]) -> bool:
        """Queue one sampled inference (arrays copied: the caller may reuse its buffers); False if full."""
        if len(self._pending) >= QUEUE:
            return False
        self._pending.append(
            (id128, sha256, input_name, np.array(x, copy=True), [o.copy() for o in outputs], self.keep)
        )
        return True

    def stop(self, wait: bool = True) -> None:
        """Stop sampling and the writer: ``wait`` writes what is queued first (a graceful stop);
        without it (a power cut) what is queued is lost, as it was never captured."""
        self._stopped = True
        self.rate = 0.0
        thread, self._thread = self._thread, None
        if thread is not None:
            self._drain_on_quit = wait
            self._quit.set()
            thread.join(5.0 if wait else 1.0)
        if not wait:
            self._pending.clear()
        self.store.close()

    def _evicted(self, n: int) -> None:
        self.telemetry.record_capture_evicted(n)
        self.metrics.count("capture_evicted", n)

    def _work(self) -> None:
        while True:
            quitting = self._quit.wait(POLL_S)
            if quitting and not self._drain_on_quit:
                return
            self._guarded(self._drain)
            self._guarded(self._seal_old)
            if quitting:
                return

    def _guarded(self, step: Callable[[], None]) -> None:
        """One step of the writer; a failure loses those samples (counted), never the thread."""
        try:
            step()
        except OSError as exc:  # a full disk
            self.metrics.count("capture_write_failures")
            log.warning("%s: capture not written: %s", self.store.device_id, exc)
        except Exception:
            self.metrics.count("capture_write_failures")
            log.exception("%s: capture writer failed", self.store.device_id)

    def _seal_old(self) -> None:
        if self.store.seal_if_older(self.batch_age_s):
            self.on_sealed()

    def _drain(self) -> None:
        """Write everything queued, flush once, then count it captured (it is on disk now)."""
        written: dict[str, int] = {}
        evicted, sealed = 0, False
        pending = self._pending
        while pending:
            id128, sha, name, x, outputs, keep = pending.popleft()
            done = self.store.append(sha, encode_item(id128, name, x, outputs, keep))
            if not done.stored:
                self.metrics.count("capture_too_large")
                continue
            written[sha] = written.get(sha, 0) + 1
            evicted += done.evicted
            sealed = sealed or done.sealed
        if not written:
            return
        self.store.flush()
        for sha, n in written.items():
            self.telemetry.record_captured(sha, n)
            self.metrics.count("captured", n)
        if evicted:
            self._evicted(evicted)
        if sealed:
            self.on_sealed()


__all__ = ["BATCH_AGE_S", "QUEUE", "Capturer", "encode_item", "iso_millis", "tensor"]
