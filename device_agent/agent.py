"""The device agent: reconcile towards the signed desired state, hot-swap, watch, serve, report.

Flow for each retained directive on ``ef/v1/{id}/desired``:

1. directive checks (fleet key signature, device id, seq, expiry) -> ``rejected`` + reason;
2. if the model is already in a slot: re-verify the file and swap (fast rollback);
   otherwise fetch + verify the release-signed envelope, check it agrees with the
   directive (hash, length, hardware id, target), check free disk, download into
   the inactive slot (resumable, bounded, paced, hashed while streaming);
3. load + warm the new model in a worker thread, then swap ONE reference;
4. with ``directive.probation``: keep the previous model loaded and watch the new
   one (errors, non-finite outputs, p95 latency against the old model's); revert
   by itself if it misbehaves (``reverted`` + why), report ``serving`` only after
   the window passed and enough inferences succeeded;
5. with ``directive.shadow``: install the candidate in the inactive slot and run
   it on a sample of live inputs in a background thread, never serving it.

Every failure leaves the serving model untouched. ``infer`` reads the serving
reference once, so calls in flight during a swap finish on the model they started
with. All MQTT work happens on the agent's asyncio loop; ``infer`` may run on any
thread and talks to the loop only through ``call_soon_threadsafe``.

Fault injection for the power-loss tests: ``EDGEFLEET_AGENT_STALL="warming:5,swapping:5"``
makes the agent pause after announcing those states, so a test can kill -9 it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import os
import platform
import queue
import shutil
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from device_agent import __version__
from device_agent import wire as protocol
from device_agent.clock import WallClock, now_utc
from device_agent.config import AgentConfig
from device_agent.downloader import (
    DownloadError,
    IncompleteDownload,
    ServerBusy,
    download_model,
    fetch_envelope,
)
from device_agent.mqtt_link import MqttLink, backoff_delay
from device_agent.runtime import (
    AutoRuntimeFactory,
    LoadedModel,
    RuntimeFactory,
    RuntimeLoadError,
    available_runtimes,
)
from device_agent.slots import SlotStore, is_disk_full
from device_agent.telemetry import ModelTotals, Telemetry, top1_classes
from device_agent.telemetry_store import BatchStore
from signing.dsse import verify_envelope
from signing.errors import DeliveryUnavailable, MalformedEnvelope, MetadataExpired, TrustError, UnknownKey
from signing.keys import PublicKey
from signing.manifest import BundleManifest, FileEntry, manifest_from_envelope, verify_file
from signing.trust import TrustRoot

if TYPE_CHECKING:  # TUF (python-tuf, securesystemslib) is imported only by agents that use it
    from device_agent.trust_state import TrustStore

log = logging.getLogger(__name__)

DS = protocol.DeploymentState
_R = TypeVar("_R")
PROBATION_POLL = 0.05  # s between probation checks
PROBATION_MAX_BOOTS = 3  # restarts during one probation before the model is blamed (crash loop)
MIN_LATENCY_SAMPLES = 20  # per model, before a p95 comparison means anything
SHADOW_QUEUE = 64  # sampled inputs waiting for the candidate; more are skipped, never block serving
STALL_ENV = "EDGEFLEET_AGENT_STALL"


class NoModelError(RuntimeError):
    """``infer`` was called before any model was installed."""


class InstallError(Exception):
    """A directive could not be carried out; ``code`` is the reason reported upstream."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(detail or code)
        self.code = code


class InferenceResult(NamedTuple):
    """One answer and the model that gave it (a NamedTuple: the cheapest immutable record to build)."""

    outputs: list[np.ndarray]
    model_sha256: str
    model_version: str
    ok: bool = True
    error: str | None = None  # "non_finite" | "runtime_error"


@dataclass(frozen=True)
class _Serving:
    """The one reference ``infer`` reads; replaced whole on a swap, never mutated."""

    model: LoadedModel
    sha256: str
    name: str
    version: str
    slot: str


@dataclass
class _Deployment:
    seq: int = 0
    state: protocol.DeploymentState = DS.IDLE
    error: str | None = None


def _stall_plan() -> dict[str, float]:
    plan: dict[str, float] = {}
    for item in filter(None, os.environ.get(STALL_ENV, "").split(",")):
        state, _, seconds = item.partition(":")
        with contextlib.suppress(ValueError):
            plan[state.strip()] = float(seconds or 3600)
    return plan


def _scan(outputs: list[np.ndarray]) -> tuple[bool, list[int]]:
    """(any non-finite value?, top-1 class per row of the first output) in two cheap reductions.

    argmax/argmin propagate NaN (they return its index) and land on +inf/-inf,
    so an array is all-finite iff the values at its argmax and argmin are: the
    same argmax is the top-1 class of a batch-1 classifier. ~0.6 us instead of
    isfinite().all() + a separate argmax (~3 us) on the hot path.
    """
    classes: list[int] = []
    for i, o in enumerate(outputs):
        if o.dtype.kind != "f" or o.size == 0:
            if i == 0:
                classes = top1_classes(outputs)
            continue
        hi = int(o.argmax())
        flat = o.reshape(-1)
        if not (math.isfinite(flat[hi]) and math.isfinite(flat[int(o.argmin())])):
            return True, []
        if i == 0:
            classes = [hi % o.shape[-1]] if o.ndim <= 1 or o.shape[0] == 1 else top1_classes(outputs)
    return False, classes


def _has_non_finite(outputs: list[np.ndarray]) -> bool:
    return _scan(outputs)[0]


def capabilities(config: AgentConfig, runtime: RuntimeFactory) -> dict[str, Any]:
    """What this device can run, for the server's targeting and the operator's eyes."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        memory = 0
    try:
        disk_free = shutil.disk_usage(config.data_dir).free
    except OSError:
        disk_free = 0
    runnable = [t for t in config.targets if runtime.supports(t)]
    return {
        "arch": platform.machine(),
        "cores": os.cpu_count() or 1,
        "memory": memory,
        "disk_free": disk_free,
        "runtimes": available_runtimes(),
        "delegates": [config.npu_delegate] if config.npu_delegate else [],
        "targets": list(config.targets),
        "runnable_targets": runnable,
        "python": platform.python_version(),
    }


class Agent:
    """One device. ``start``/``stop`` on an asyncio loop; ``infer`` from any thread."""

    def __init__(
        self,
        config: AgentConfig,
        trust: TrustRoot,
        runtime_factory: RuntimeFactory | None = None,
        *,
        clock: WallClock | None = None,
    ):
        """``clock``: the device's wall clock, seconds since the epoch (default ``time.time``);
        see :mod:`device_agent.clock`. Only dates read it; timers stay monotonic."""
        self.config = config
        self.clock: WallClock = clock or time.time
        self.device_id = config.device_id
        self.trust = trust
        self.runtime: RuntimeFactory = runtime_factory or AutoRuntimeFactory(
            intra_op_threads=config.intra_op_threads, npu_delegate=config.npu_delegate
        )
        self.slots = SlotStore(config.data_dir)
        store = BatchStore(self.slots.data_dir / "telemetry.db", config.telemetry_queue_bytes)
        self.telemetry = Telemetry(config.device_id, store, sketch_every=config.sketch_every, now=self.now)
        self.history: list[str] = []
        self.link: MqttLink | None = None
        self.api: Any = None  # device_agent.local_api.LocalApi when config.api_listen is set
        self._serving: _Serving | None = None
        self._previous: _Serving | None = None  # kept loaded during probation for an instant revert
        self._shadow: _Serving | None = None
        self._shadow_every = 0
        self._shadow_n = 0
        self._shadow_queue: queue.Queue[tuple[_Serving, np.ndarray, list[int]] | None] | None = None
        self._shadow_thread: threading.Thread | None = None
        self._lock = threading.Lock()  # guards counters touched by infer threads
        self._metrics: Counter[str] = Counter()
        self._awaiting_proof: str | None = None
        saved = self.slots.state.deployment or {}
        self._deployment = _Deployment(
            seq=int(saved.get("seq", self.slots.state.last_seq)),
            state=DS(saved["state"]) if saved.get("state") in DS.__members__.values() else DS.IDLE,
            error=saved.get("error"),
        )
        self._last_rejection: protocol.Rejection | None = None
        self._accepted_seq = self.slots.state.last_seq
        self.trust_store: TrustStore | None = None
        if config.tuf_root_path is not None:
            from device_agent.trust_state import TrustStore

            self.trust_store = TrustStore(self.slots.data_dir / "trust", config.tuf_root_path.read_bytes())
            accepted = self.trust_store.state.last_seq
            if accepted > self.slots.state.last_seq:
                # Accepted before a crash or power loss but never finished (the slots record a
                # directive's seq only once it succeeded or failed): the same retained directive
                # must run again, while every older one stays refused.
                accepted -= 1
            self._accepted_seq = max(self._accepted_seq, accepted)
        self._accepted_digest: str | None = None
        self._pending: protocol.Directive | None = None
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._probation_task: asyncio.Task[None] | None = None
        self._send_lock: asyncio.Lock | None = None
        self._stall = _stall_plan()
        self._aborted = False
        self._caps = capabilities(config, self.runtime)
        self._desired_topic = protocol.topic(self.device_id, protocol.Channel.DESIRED)

    def now(self) -> datetime:
        """The device's wall-clock time (``clock``, possibly skewed), as an aware UTC datetime."""
        return now_utc(self.clock)

    # -- keys ------------------------------------------------------------------

    def fleet_keys(self) -> Mapping[str, PublicKey]:
        """Directive signers: the newest verified TUF root's, or the skeleton's ``trust.json``."""
        return self.trust_store.fleet_keys if self.trust_store is not None else self.trust.fleet_keys

    def release_keys(self) -> Mapping[str, PublicKey]:
        """Bundle (DSSE envelope) signers, from the same source as ``fleet_keys``."""
        return self.trust_store.release_keys if self.trust_store is not None else self.trust.release_keys

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        """Load the active slot's model, connect, and begin reconciling and reporting."""
        if self._aborted:
            raise RuntimeError(f"{self.device_id}: an aborted agent cannot start again; build a new one")
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._send_lock = asyncio.Lock()
        await self._restore()
        if self.config.api_listen:
            from device_agent.local_api import LocalApi

            self.api = LocalApi(self, self.config.api_listen, max_body=self.config.api_max_body)
            self.api.start()
        self.link = MqttLink(
            self.device_id,
            self.config.mqtt_host,
            self.config.mqtt_port,
            mqtt_version=self.config.mqtt_version,
            keepalive=self.config.keepalive,
            session_expiry=self.config.session_expiry,
            max_inflight=self.config.max_inflight,
            security=self.config.mqtt_security(),
            on_message=self._on_message,
            on_connected=self._on_connected,
            now=self.now,
        )
        self._tasks = [
            self._loop.create_task(self._reconcile_loop(), name=f"{self.device_id}-reconcile"),
            self._loop.create_task(self._telemetry_loop(), name=f"{self.device_id}-telemetry"),
        ]
        self._resume_probation()
        await self.link.start()

    async def wait_connected(self, timeout: float | None = None) -> bool:
        return self.link is not None and await self.link.wait_connected(timeout)

    async def stop(self) -> None:
        """Stop reconciling, send the last telemetry window, publish offline, disconnect.

        (After :meth:`abort` there is nothing left to stop: a no-op.)"""
        if self._aborted:
            return
        tasks = list(self._tasks)
        if self._probation_task is not None:
            tasks.append(self._probation_task)
            self._probation_task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks = []
        self._stop_shadow()
        if self.api is not None:
            await asyncio.to_thread(self.api.stop)
            self.api = None
        if self.link is not None:
            if self.link.connected:
                self.telemetry.cut()
                await self._send_telemetry()
            await self.link.stop()
        pending = list(self._background)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)

    async def abort(self) -> None:
        """Die like a power cut: the simulator's (and tests') "pull the plug". Call on the agent's loop.

        - no ``offline`` status and no MQTT DISCONNECT: the socket is just closed, so the
          broker publishes the last will (``offline``, retained) after it notices;
        - nothing is flushed: the open telemetry window and unacknowledged publishes are
          lost; what is on disk is exactly what was already written (``state.json`` and
          the trust state are only ever replaced atomically, queued batches are in SQLite);
        - the reconcile, telemetry, probation and background tasks are cancelled where
          they stand (work already handed to a worker thread, e.g. a hash, finishes
          there and its result is dropped); the shadow worker is told to quit, not joined;
        - loaded models are dropped (``infer`` raises ``NoModelError``) and the local API
          stops listening, so a new ``Agent`` on the same ``data_dir`` can boot at once
          (that boot is the crash-recovery path).

        The agent cannot be started again; build a new one. Idempotent.
        """
        if self._aborted:
            return
        self._aborted = True
        tasks = [*self._tasks, *self._background]
        if self._probation_task is not None:
            tasks.append(self._probation_task)
        self._tasks, self._probation_task = [], None
        for task in tasks:
            task.cancel()
        if self.link is not None:
            self.link.abort()
        self._loop = None  # nothing new gets scheduled (``_spawn``, ``infer`` -> loop callbacks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._serving = self._previous = self._shadow = None
        q, self._shadow_queue, self._shadow_thread = self._shadow_queue, None, None
        if q is not None:
            with contextlib.suppress(queue.Full):
                q.put_nowait(None)
        if self.api is not None:
            api, self.api = self.api, None
            await asyncio.to_thread(api.stop)
        self.telemetry.store.close()

    async def _load_slot(self, slot: str) -> _Serving | None:
        """Verify and load what ``slot`` holds; None if it is empty or unusable."""
        info = self.slots.state.slots.get(slot)
        path = self.slots.model_path(slot)
        if info is None or path is None:
            return None
        try:
            await asyncio.to_thread(verify_file, path, FileEntry(info.file, info.sha256, info.length))
            model = await asyncio.to_thread(self.runtime.load, path, info.sha256)
        except (TrustError, RuntimeLoadError, OSError) as exc:
            log.warning("%s: slot %s unusable: %s", self.device_id, slot, exc)
            return None
        return _Serving(model, info.sha256, info.name, info.version, slot)

    async def _restore(self) -> None:
        """Serve what ``state.json`` says is active, after re-checking the file's hash.

        Falls back to the other slot when the active one is unusable, so a device
        with one good model on disk always serves it.
        """
        state = self.slots.state
        candidates = [state.active] if state.active else []
        candidates += [s for s in state.slots if s not in candidates and state.slots[s] is not None]
        for slot in candidates:
            if slot is None:
                continue
            serving = await self._load_slot(slot)
            if serving is None:
                continue
            self._serving = serving
            self.history.append(serving.sha256)
            prob = state.probation
            if slot != state.active:
                self.slots.activate(slot)  # also drops a probation of the unusable slot
            elif prob is not None and prob.get("slot") == slot and prob.get("previous"):
                self._previous = await self._load_slot(str(prob["previous"]))
            if self._deployment.state in (DS.IDLE, DS.FAILED, DS.REJECTED) and self._deployment.seq == 0:
                self._deployment.state = DS.SERVING
            return

    # -- inference (any thread) ---------------------------------------------

    @property
    def running_sha256(self) -> str | None:
        s = self._serving
        return s.sha256 if s else None

    @property
    def running_model(self) -> LoadedModel | None:
        s = self._serving
        return s.model if s else None

    @property
    def running_version(self) -> str | None:
        s = self._serving
        return s.version if s else None

    @property
    def shadow_sha256(self) -> str | None:
        s = self._shadow
        return s.sha256 if s else None

    def infer(self, x: np.ndarray) -> InferenceResult:
        """Run the serving model on ``x``. Thread-safe; never blocks on a swap.

        Failures do not raise: a non-finite output or a runtime exception is
        returned with ``ok=False`` and counted by kind, because the error rate
        is what the rollout gates (and probation) judge a model by.
        """
        s = self._serving  # read the reference once: a swap cannot change it under us
        if s is None:
            raise NoModelError(f"{self.device_id}: no model installed")
        t0 = time.perf_counter()
        error: str | None = None
        classes: list[int] = []
        try:
            outputs = s.model.run(x)
            bad, classes = _scan(outputs)
            if bad:
                error = "non_finite"
        except Exception as exc:
            log.debug("%s: inference failed: %s", self.device_id, exc)
            outputs, error = [], "runtime_error"
        latency_us = (time.perf_counter() - t0) * 1e6
        self.telemetry.record(s.sha256, latency_us, error, classes, x, outputs)
        if error is not None:
            with self._lock:
                self._metrics[f"inference_{error}"] += 1
        elif self._awaiting_proof is not None:
            self._check_proof(s.sha256)
        if self._shadow is not None and error is None:
            self._maybe_shadow(x, classes)
        return InferenceResult(outputs, s.sha256, s.version, error is None, error)

    def _check_proof(self, sha256: str) -> None:
        with self._lock:
            if self._awaiting_proof != sha256:
                return
            self._awaiting_proof = None
        # The server counts a device done only on "new hash running AND >= 1 ok inference".
        self._call_on_loop(lambda: self._spawn(self._publish_reported()))

    def _call_on_loop(self, fn: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closing
            loop.call_soon_threadsafe(fn)

    # -- shadow mode ---------------------------------------------------------

    def _maybe_shadow(self, x: np.ndarray, classes: list[int]) -> None:
        cand, q = self._shadow, self._shadow_queue
        if cand is None or q is None or self._shadow_every <= 0:
            return
        self._shadow_n += 1  # racy by design: it only decides sampling
        if self._shadow_n % self._shadow_every:
            return
        try:
            q.put_nowait((cand, np.array(x, copy=True), classes))
        except queue.Full:
            with self._lock:
                self._metrics["shadow_skipped"] += 1

    def _shadow_worker(self, q: queue.Queue[tuple[_Serving, np.ndarray, list[int]] | None]) -> None:
        while True:
            item = q.get()
            if item is None:
                return
            cand, x, served = item
            t0 = time.perf_counter()
            error: str | None = None
            agree: bool | None = None
            try:
                outputs = cand.model.run(x)
                if _has_non_finite(outputs):
                    error = "non_finite"
                else:
                    agree = top1_classes(outputs) == served
            except Exception:
                error = "runtime_error"
            self.telemetry.record_shadow(cand.sha256, (time.perf_counter() - t0) * 1e6, error, agree)

    def _start_shadow(self, cand: _Serving, rate: float) -> None:
        self._stop_shadow()
        q: queue.Queue[tuple[_Serving, np.ndarray, list[int]] | None] = queue.Queue(SHADOW_QUEUE)
        self._shadow_queue = q
        self._shadow_every = max(1, round(1.0 / rate)) if rate > 0 else 0
        self._shadow_thread = threading.Thread(
            target=self._shadow_worker, args=(q,), name=f"{self.device_id}-shadow", daemon=True
        )
        self._shadow_thread.start()
        self._shadow = cand

    def _stop_shadow(self) -> None:
        self._shadow = None
        q, t = self._shadow_queue, self._shadow_thread
        self._shadow_queue = self._shadow_thread = None
        if q is not None:
            with contextlib.suppress(queue.Full):
                q.put(None, timeout=1.0)
        if t is not None:
            t.join(5)

    # -- metrics / views -----------------------------------------------------

    @property
    def metrics(self) -> dict[str, int]:
        with self._lock:
            m = dict(self._metrics)
        m["telemetry_dropped_batches"] = self.telemetry.dropped_batches
        return m

    @property
    def served_ok(self) -> dict[str, int]:
        return self.telemetry.served_ok()

    @property
    def deployment_state(self) -> protocol.DeploymentState:
        return self._deployment.state

    @property
    def deployment_error(self) -> str | None:
        return self._deployment.error

    def _count(self, key: str, n: int = 1) -> None:
        with self._lock:
            self._metrics[key] += n

    def reported(self) -> protocol.Reported:
        s = self._serving
        with contextlib.suppress(OSError):
            self._caps["disk_free"] = shutil.disk_usage(self.config.data_dir).free
        return protocol.Reported(
            device_id=self.device_id,
            agent_version=__version__,
            hardware_id=self.config.hardware_id,
            running=protocol.RunningModel(name=s.name, version=s.version, sha256=s.sha256) if s else None,
            slots=self.slots.slot_hashes(),
            active_slot=self.slots.state.active,
            deployment_seq=self._deployment.seq,
            deployment_state=self._deployment.state,
            deployment_error=self._deployment.error,
            served_ok=self.served_ok,
            served_errors=self.telemetry.served_errors(),
            shadow_sha256=self.shadow_sha256,
            last_rejection=self._last_rejection,
            capabilities=self._caps,
            ts=self.now(),
        )

    # -- MQTT inbound (loop thread) -----------------------------------------

    def _on_connected(self) -> None:
        self._spawn(self._publish_reported())
        self._spawn(self._send_telemetry())

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic != self._desired_topic:
            return
        if not payload:
            # An empty retained message clears the topic: nothing to do, but worth seeing.
            self._count("malformed_messages")
            log.info("%s: empty desired payload (retained clear) ignored", self.device_id)
            return
        self._count("directives_received")
        self._handle_directive(payload)

    def _handle_directive(
        self, payload: bytes, *, after_root_refresh: bool = False, refresh_failure: TrustError | None = None
    ) -> None:
        try:
            body = verify_envelope(payload, protocol.DIRECTIVE_PAYLOAD_TYPE, self.fleet_keys())
        except MalformedEnvelope as exc:
            self._count("malformed_messages")
            log.warning("%s: malformed directive envelope: %s", self.device_id, exc)
            return
        except UnknownKey as exc:
            if self.trust_store is not None and not after_root_refresh:
                # Maybe the keys were rotated: only a newer root (verified chain) can vouch for them.
                self._spawn(self._refresh_root_and_retry(payload, exc))
                return
            if refresh_failure is not None and not isinstance(refresh_failure, DeliveryUnavailable):
                # The repository offered a root (or metadata) the chain does not vouch for,
                # e.g. a root signed by a retired root key: that is the refusal to report.
                self._reject(0, refresh_failure.code, f"{exc}; root refresh refused: {refresh_failure}")
                return
            self._reject(0, exc.code, f"{exc}" + (f"; {refresh_failure}" if refresh_failure else ""))
            return
        except TrustError as exc:
            self._reject(0, exc.code, str(exc))
            return
        try:
            directive = protocol.decode_directive(body)
        except protocol.ProtocolError as exc:
            self._count("malformed_messages")
            log.warning("%s: malformed directive: %s", self.device_id, exc)
            return
        digest = hashlib.sha256(body).hexdigest()
        if directive.device_id != self.device_id:
            self._reject(directive.seq, "wrong_device", f"directive is for {directive.device_id!r}")
            return
        if directive.seq <= self._accepted_seq:
            if directive.seq == self._accepted_seq and self._accepted_digest in (None, digest):
                # The same retained directive again (reconnect, restart): already handled.
                self._count("duplicate_directives")
                return
            self._reject(
                directive.seq, "stale_sequence", f"seq {directive.seq} <= applied {self._accepted_seq}"
            )
            return
        if directive.expires_at <= self.now():
            self._reject(directive.seq, "expired", f"expired at {directive.expires_at.isoformat()}")
            return
        self._accepted_seq, self._accepted_digest = directive.seq, digest
        if self.trust_store is not None:
            try:
                self.trust_store.advance(seq=directive.seq)
            except OSError as exc:  # disk full: held in memory; a restart runs this directive again
                self._count("state_write_failures")
                log.warning("%s: could not persist accepted seq %d: %s", self.device_id, directive.seq, exc)
        self._count("directives_accepted")
        self._pending = directive  # latest wins: an older queued directive is superseded
        assert self._wake is not None
        self._wake.set()

    async def _refresh_root_and_retry(self, payload: bytes, exc: UnknownKey) -> None:
        """Walk the repository's root chain, then judge the directive again with the newest keys."""
        from device_agent.delivery import refresh_root, repository_url

        store = self.trust_store
        assert store is not None
        before = store.state.root_version
        base = repository_url(self.config.tuf_url, None) or store.state.repository_url
        failure = await asyncio.to_thread(refresh_root, store, base, self.now())
        if store.state.root_version > before:
            log.info("%s: followed the root chain to v%d", self.device_id, store.state.root_version)
        self._handle_directive(payload, after_root_refresh=True, refresh_failure=failure)

    def _reject(self, seq: int, reason: str, detail: str) -> None:
        log.warning(
            "%s: directive seq %d rejected: %s (%s)",
            self.device_id,
            seq,
            reason,
            detail,
            extra={"device_id": self.device_id, "seq": seq, "reason": reason},
        )
        self._count("rejected_directives")
        self._count(f"rejected_{reason}")
        self._last_rejection = protocol.Rejection(seq=seq, reason=reason, detail=detail[:500])
        event = protocol.Event(
            device_id=self.device_id, seq=seq, state=DS.REJECTED, reason=reason, detail=detail, ts=self.now()
        )
        self._spawn(self._publish_event(event))
        self._spawn(self._publish_reported())

    # -- reconcile -----------------------------------------------------------

    async def _reconcile_loop(self) -> None:
        assert self._wake is not None
        while True:
            await self._wake.wait()
            self._wake.clear()
            directive, self._pending = self._pending, None
            if directive is None:
                continue
            if directive.not_before is not None and not await self._wait_not_before(directive):
                continue
            try:
                await self._apply(directive)
            except asyncio.CancelledError:
                raise
            except InstallError as exc:
                await self._fail(directive, exc.code, str(exc))
            except TrustError as exc:
                await self._fail(directive, exc.code, str(exc))
            except RuntimeLoadError as exc:
                await self._fail(directive, exc.code, str(exc))
            except (DownloadError, IncompleteDownload) as exc:
                await self._fail(directive, getattr(exc, "code", "download_failed"), str(exc))
            except OSError as exc:
                if not is_disk_full(exc):
                    log.exception("%s: directive seq %d failed on I/O", self.device_id, directive.seq)
                    await self._fail(directive, "io_error", repr(exc))
                    continue
                # The filesystem filled up under us (the free-space check passed, then something
                # else wrote, or a quota hit): nothing was swapped; free what this install wrote.
                freed = self.slots.discard_unrecorded(self.slots.inactive)
                await self._fail(directive, "disk_full", f"{exc}; removed {freed} bytes of partial download")
            except Exception as exc:
                log.exception("%s: directive seq %d failed unexpectedly", self.device_id, directive.seq)
                await self._fail(directive, "internal_error", repr(exc))

    async def _wait_not_before(self, d: protocol.Directive) -> bool:
        """Hold a directive until its maintenance window opens; False if a newer one superseded it."""
        assert self._wake is not None and d.not_before is not None
        delay = (d.not_before - self.now()).total_seconds()
        if delay <= 0:
            return True
        await self._publish_event(
            protocol.Event(
                device_id=self.device_id,
                seq=d.seq,
                state=self._deployment.state,
                reason="not_before",
                detail=f"waiting until {d.not_before.isoformat()}",
                ts=self.now(),
            )
        )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), delay)
            return self._pending is None  # woken by a newer directive: that one wins
        return True

    async def _apply(self, d: protocol.Directive) -> None:
        self._deployment = _Deployment(seq=d.seq, state=self._deployment.state)
        if d.shadow is None or (self._shadow is not None and self._shadow.sha256 != d.shadow.sha256):
            self._stop_shadow()
        await self._apply_model(d)
        if d.shadow is not None:
            await self._apply_shadow(d)

    def _check_target(self, target: str) -> None:
        if target not in self.config.targets or not self.runtime.supports(target):
            reason = getattr(self.runtime, "unsupported_reason", None)
            why = reason(target) if callable(reason) else f"this runtime cannot run {target}"
            raise InstallError(
                "unsupported_target", f"device runs {self.config.targets}, not {target}: {why}"
            )

    async def _install(self, d: protocol.Directive, ref: protocol.ModelRef) -> tuple[str, Any]:
        """Get ``ref`` verified into a slot (reusing one that already holds it); return (slot, path)."""
        self._check_target(ref.target)
        if self.trust_store is not None:
            await self._verify_release(d, ref)
        slot = self.slots.find(ref.sha256)
        if slot is not None:
            await self._transition(d, DS.VERIFYING, sha=ref.sha256, detail=f"model already in slot {slot}")
            info = self.slots.state.slots[slot]
            assert info is not None
            manifest = BundleManifest.from_dict(info.manifest)
            self._check_manifest(ref, manifest)
            path = self.slots.slot_dir(slot) / info.file
            await asyncio.to_thread(verify_file, path, FileEntry(info.file, info.sha256, info.length))
            return slot, path
        return await self._download(d, ref)

    async def _apply_model(self, d: protocol.Directive) -> None:
        ref = d.model
        serving = self._serving
        if ref is None or (serving is not None and serving.sha256 == ref.sha256):
            if self._probation_task is not None and not self._probation_task.done():
                return  # the same model is still on probation: its watcher reports the outcome
            state = DS.SERVING if serving else DS.IDLE
            try:
                self.slots.record_outcome(d.seq, state.value)
            except OSError as exc:
                if not is_disk_full(exc):
                    raise
                # Nothing on the device changes: it already runs what the directive asks for (a
                # rollback to the served model, say). Only the record is lost; after a restart the
                # retained directive lands here again. Failing it would count a device that serves
                # the right model as a failure on a full disk.
                self._count("state_write_failures")
                log.warning("%s: seq %d done, outcome not persisted: %s", self.device_id, d.seq, exc)
            await self._transition(d, state, sha=serving.sha256 if serving else None)
            return
        await self._end_probation()  # a newer directive supersedes a probation in progress
        slot, path = await self._install(d, ref)
        await self._transition(d, DS.WARMING, sha=ref.sha256)
        model = await asyncio.to_thread(self.runtime.load, path, ref.sha256)
        await self._transition(d, DS.SWAPPING, sha=ref.sha256)
        new = _Serving(model, ref.sha256, ref.name, ref.version, slot)
        previous = self._serving
        if d.probation is not None:
            prob = {
                "seq": d.seq,
                "slot": slot,
                "previous": previous.slot if previous else None,
                "sha256": ref.sha256,
                "params": d.probation.to_dict(),
                "min_inferences": max(d.probation.min_inferences, d.probation_inferences),
                "boots": 0,
            }
            outcome = {"seq": d.seq, "state": DS.PROBATION.value, "error": None}
            # Persist first: if the disk is full this raises and nothing was swapped.
            self.slots.activate(slot, d.seq, probation=prob, deployment=outcome)
            self._previous = previous
            self._serving = new  # the swap
            self._after_swap(ref.sha256)
            await self._transition(d, DS.PROBATION, sha=ref.sha256)
            self._probation_task = asyncio.get_running_loop().create_task(self._watch_probation(prob))
            return
        self.slots.activate(slot, d.seq, deployment={"seq": d.seq, "state": DS.SERVING.value, "error": None})
        with self._lock:
            self._awaiting_proof = ref.sha256
        self._serving = new  # the swap (after the activation is on disk)
        self._after_swap(ref.sha256)
        await self._transition(d, DS.SERVING, sha=ref.sha256)

    def _after_swap(self, sha256: str) -> None:
        self.history.append(sha256)
        self._count("swaps")
        log.info("%s: swapped in %s", self.device_id, sha256[:12], extra={"model_sha256": sha256})

    async def _apply_shadow(self, d: protocol.Directive) -> None:
        ref = d.shadow
        assert ref is not None
        serving = self._serving
        if serving is not None and serving.sha256 == ref.sha256:
            return  # the candidate is what we serve already: nothing to compare
        if self._shadow is not None and self._shadow.sha256 == ref.sha256:
            self._shadow_every = max(1, round(1.0 / d.shadow_sample_rate)) if d.shadow_sample_rate else 0
            return
        if self._probation_task is not None and not self._probation_task.done():
            # The inactive slot holds the revert target until the probation ends.
            await asyncio.shield(self._probation_task)
        slot, path = await self._install(d, ref)
        model = await asyncio.to_thread(self.runtime.load, path, ref.sha256)
        self._start_shadow(_Serving(model, ref.sha256, ref.name, ref.version, slot), d.shadow_sample_rate)
        await self._transition(d, DS.SHADOWING, sha=ref.sha256, detail=f"sample rate {d.shadow_sample_rate}")

    async def _verify_release(self, d: protocol.Directive, ref: protocol.ModelRef) -> None:
        """TUF mode: the release metadata must list ``ref``, agree with the directive, clear the floor."""
        from device_agent.delivery import repository_url, verify_release

        store = self.trust_store
        assert store is not None
        base = repository_url(self.config.tuf_url, ref)
        if not base:
            raise InstallError("no_repository", "no tuf_url configured and none derivable from the directive")
        await self._transition(d, DS.VERIFYING, sha=ref.sha256, detail="release metadata (TUF)")
        # Unreachable is not untrusted: retry with backoff before failing the directive.
        try:
            await self._retrying(
                lambda: asyncio.to_thread(
                    verify_release, store, base, ref, self.config.hardware_id, self.now()
                ),
                (DeliveryUnavailable,),
                "release metadata check",
            )
        except MetadataExpired as exc:
            # A freeze attack, an offline repository, or this device's clock running ahead:
            # say which time the device judged by, so an operator can tell them apart.
            raise MetadataExpired(
                f"{exc} (device clock {self.now().isoformat(timespec='seconds')}; "
                f"host clock off by {self.clock() - time.time():+.0f} s)"
            ) from exc

    async def _retrying(
        self,
        call: Callable[[], Awaitable[_R]],
        transient: tuple[type[BaseException], ...],
        what: str,
        base: float = 0.5,
    ) -> _R:
        """``call()`` again after a ``transient`` error, with backoff and full jitter, until
        ``config.delivery_retry_s`` have passed since the first try; then the last error
        propagates. Any other error propagates at once.

        A budget in time, not in attempts: with full jitter a fixed number of attempts
        is a random time (6 attempts were 0-12.5 s, and a 4 s server restart failed
        14% of the devices caught mid-fetch), while a restart or failover lasts seconds
        whatever the dice say. Progress made meanwhile (a resumed download) is kept.
        """
        deadline = time.monotonic() + self.config.delivery_retry_s
        attempt = 0
        while True:
            try:
                return await call()
            except transient as exc:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise
                log.info("%s: %s failed (%s); retrying", self.device_id, what, exc)
                await asyncio.sleep(min(left, backoff_delay(attempt, base=base, cap=5.0)))
                attempt += 1

    def _check_manifest(self, ref: protocol.ModelRef, manifest: BundleManifest) -> None:
        """Director/image agreement (Uptane): the directive may only point at what a release key signed."""
        entry = manifest.model_file
        if entry.sha256 != ref.sha256 or entry.length != ref.length:
            raise InstallError("directive_mismatch", "directive hash/length differ from the signed manifest")
        if self.config.hardware_id not in manifest.hardware_ids:
            raise InstallError(
                "hardware_mismatch", f"{self.config.hardware_id} not in {manifest.hardware_ids}"
            )
        self._check_target(manifest.target)

    def _check_disk(self, slot: str, ref: protocol.ModelRef) -> None:
        part = self.slots.partial_path(slot, ref.sha256)
        have = part.stat().st_size if part.exists() else 0
        need = ref.length - have + self.config.min_free_disk_bytes
        free = shutil.disk_usage(self.slots.slot_dir(slot)).free
        if free < need:
            raise InstallError(
                "insufficient_disk", f"{free} bytes free, need {need} (model {ref.length} + reserve)"
            )

    async def _download(self, d: protocol.Directive, ref: protocol.ModelRef) -> tuple[str, Any]:
        import httpx  # lazily: an idle agent should not carry the HTTP stack (~18 MB RSS)

        await self._transition(d, DS.DOWNLOADING, sha=ref.sha256)
        try:
            return await self._download_with(httpx, d, ref)
        except httpx.HTTPError as exc:
            raise DownloadError(f"{type(exc).__name__}: {exc}") from exc

    async def _download_with(
        self, httpx: Any, d: protocol.Directive, ref: protocol.ModelRef
    ) -> tuple[str, Any]:
        async with httpx.AsyncClient(timeout=httpx.Timeout(30.0, connect=10.0)) as client:
            envelope: bytes = await self._retrying(  # server away or busy; a refusal (4xx) is final
                lambda: fetch_envelope(client, ref.envelope_url, self.device_id),
                (httpx.TransportError, ServerBusy),
                "envelope fetch",
            )
            await self._transition(d, DS.VERIFYING, sha=ref.sha256, detail="bundle envelope")
            manifest = manifest_from_envelope(envelope, self.release_keys())
            self._check_manifest(ref, manifest)
            slot = self.slots.inactive
            self.slots.prepare(slot, keep_partial_for=ref.sha256)
            self._check_disk(slot, ref)
            part = self.slots.partial_path(slot, ref.sha256)
            await self._transition(d, DS.DOWNLOADING, sha=ref.sha256, detail=f"model into slot {slot}")
            await self._retrying(
                lambda: download_model(
                    client,
                    ref.model_url,
                    part,
                    length=ref.length,
                    sha256=ref.sha256,
                    device_id=self.device_id,
                    max_bytes_per_s=self.config.download_max_bytes_per_s,
                ),
                (IncompleteDownload, ServerBusy, httpx.TransportError),
                "download (resuming)",
                base=0.2,
            )
        await self._transition(d, DS.INSTALLING, sha=ref.sha256)
        info = self.slots.commit(slot, part, envelope, manifest)
        return slot, self.slots.slot_dir(slot) / info.file

    # -- probation -------------------------------------------------------------

    def _resume_probation(self) -> None:
        """After a restart mid-probation: watch again, or revert if the model keeps killing us."""
        prob = self.slots.state.probation
        s = self._serving
        if prob is None or s is None or prob.get("slot") != s.slot or self._loop is None:
            return
        prob = dict(prob, boots=int(prob.get("boots", 0)) + 1)
        self.slots.set_probation(prob)
        self._deployment = _Deployment(seq=int(prob["seq"]), state=DS.PROBATION)
        self._probation_task = self._loop.create_task(self._watch_probation(prob))

    async def _end_probation(self) -> None:
        task, self._probation_task = self._probation_task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.slots.state.probation is not None:
            self.slots.set_probation(None)
        self._previous = None

    async def _watch_probation(self, prob: dict[str, Any]) -> None:
        """Judge the swapped-in model; revert to the previous slot on misbehaviour, else report success."""
        params = protocol.Probation.from_dict(prob["params"])
        seq, sha = int(prob["seq"]), str(prob["sha256"])
        min_n = int(prob.get("min_inferences", params.min_inferences))
        previous = self._previous
        base = self.telemetry.totals_of(sha)
        old = self.telemetry.totals_of(previous.sha256) if previous else ModelTotals()
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        if int(prob.get("boots", 0)) > PROBATION_MAX_BOOTS:
            await self._revert(seq, sha, "crash_loop", f"restarted {prob['boots']} times during probation")
            return
        while True:
            await asyncio.sleep(PROBATION_POLL)
            now = self.telemetry.totals_of(sha)
            ok, errors = now.ok - base.ok, now.errors - base.errors
            n = ok + errors
            if n and n >= max(min_n, 1) and errors / n > params.max_error_rate:
                await self._revert(
                    seq, sha, "error_rate", f"{errors}/{n} failed > {params.max_error_rate:.3f} allowed"
                )
                return
            if loop.time() - t0 < params.seconds or ok < min_n:
                continue
            new_buckets = [a - b for a, b in zip(now.buckets, base.buckets, strict=True)]
            p_new = protocol.latency_quantile(new_buckets, 0.95)
            p_old = protocol.latency_quantile(old.buckets, 0.95)
            if (
                p_new is not None
                and p_old is not None
                and sum(new_buckets) >= MIN_LATENCY_SAMPLES
                and sum(old.buckets) >= MIN_LATENCY_SAMPLES
                and p_new > params.max_latency_ratio * p_old
            ):
                await self._revert(
                    seq,
                    sha,
                    "latency_regression",
                    f"p95 {p_new:.0f} us > {params.max_latency_ratio} x old p95 {p_old:.0f} us",
                )
                return
            break
        self._previous = None
        self._probation_task = None
        self.slots.state.probation = None
        self.slots.record_outcome(seq, DS.SERVING.value)
        await self._transition_seq(seq, DS.SERVING, sha=sha, detail=f"probation passed after {ok} ok")

    async def _revert(self, seq: int, sha: str, reason: str, detail: str) -> None:
        """Go back to the previous slot by ourselves (it was kept loaded), and say why."""
        previous = self._previous
        if previous is None:
            prev_slot = (self.slots.state.probation or {}).get("previous")
            previous = await self._load_slot(str(prev_slot)) if prev_slot else None
        log.warning(
            "%s: probation of %s failed: %s (%s)",
            self.device_id,
            sha[:12],
            reason,
            detail,
            extra={"device_id": self.device_id, "seq": seq, "reason": reason},
        )
        self._count("reverts")
        outcome = {"seq": seq, "state": DS.REVERTED.value, "error": reason}
        try:
            if previous is not None:
                self._serving = previous  # the swap back: first, a misbehaving model must go now
                self.history.append(previous.sha256)
                self.slots.activate(previous.slot, seq, probation=None, deployment=outcome)
            else:
                # Nothing to go back to (first install): keep serving rather than serve nothing.
                self.slots.state.probation = None
                self.slots.record_outcome(seq, DS.REVERTED.value, reason)
        except OSError as exc:
            # Disk full: reverted in memory; after a reboot the probation resumes and judges again.
            self._count("state_write_failures")
            log.warning("%s: could not record the revert of seq %d: %s", self.device_id, seq, exc)
        self._previous = None
        self._probation_task = None
        self._last_rejection = protocol.Rejection(seq=seq, reason=reason, detail=detail)
        self._deployment = _Deployment(seq=seq, state=DS.REVERTED, error=reason)
        await self._publish_event(
            protocol.Event(
                device_id=self.device_id,
                seq=seq,
                state=DS.REVERTED,
                reason=reason,
                detail=detail,
                model_sha256=sha,
                ts=self.now(),
            )
        )
        await self._publish_reported()

    # -- outcomes ---------------------------------------------------------------

    async def _fail(self, d: protocol.Directive, code: str, detail: str) -> None:
        """Record the failure; the serving model is untouched (nothing was swapped)."""
        log.warning(
            "%s: directive seq %d failed: %s (%s)",
            self.device_id,
            d.seq,
            code,
            detail,
            extra={"device_id": self.device_id, "seq": d.seq, "reason": code},
        )
        self._count("failed_directives")
        self._count(f"failed_{code}")
        try:
            self.slots.record_outcome(d.seq, DS.FAILED.value, code)
        except OSError as exc:  # a full disk must not keep the failure from being reported
            self._count("state_write_failures")
            log.warning("%s: could not record the outcome of seq %d: %s", self.device_id, d.seq, exc)
        sha = d.model.sha256 if d.model else None
        self._deployment = _Deployment(seq=d.seq, state=DS.FAILED, error=code)
        self._last_rejection = protocol.Rejection(seq=d.seq, reason=code, detail=detail[:500])
        await self._publish_event(
            protocol.Event(
                device_id=self.device_id,
                seq=d.seq,
                state=DS.FAILED,
                reason=code,
                detail=detail[:500],
                model_sha256=sha,
                ts=self.now(),
            )
        )
        await self._publish_reported()

    async def _transition(
        self,
        d: protocol.Directive,
        state: protocol.DeploymentState,
        *,
        sha: str | None = None,
        detail: str | None = None,
    ) -> None:
        await self._transition_seq(d.seq, state, sha=sha, detail=detail)

    async def _transition_seq(
        self, seq: int, state: protocol.DeploymentState, *, sha: str | None = None, detail: str | None = None
    ) -> None:
        self._deployment = _Deployment(seq=seq, state=state)
        log.info(
            "%s: seq %d %s",
            self.device_id,
            seq,
            state.value,
            extra={"device_id": self.device_id, "seq": seq, "state": state.value, "model_sha256": sha},
        )
        await self._publish_event(
            protocol.Event(
                device_id=self.device_id, seq=seq, state=state, detail=detail, model_sha256=sha, ts=self.now()
            )
        )
        await self._publish_reported()
        stall = self._stall.get(state.value)
        if stall:
            log.warning("%s: stalling %.1fs in %s (%s)", self.device_id, stall, state.value, STALL_ENV)
            if self.link is not None:
                await self.link.drain(timeout=2.0)
            await asyncio.sleep(stall)

    # -- MQTT outbound (loop thread) ----------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self._loop is None or self._loop.is_closed():
            coro.close()
            return
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish_event(self, event: protocol.Event) -> None:
        if self.link is not None:
            topic = protocol.topic(self.device_id, protocol.Channel.EVENTS)
            await self.link.publish(topic, protocol.encode(event), qos=1)

    async def _publish_reported(self) -> None:
        if self.link is not None:
            topic = protocol.topic(self.device_id, protocol.Channel.REPORTED)
            await self.link.publish(topic, protocol.encode(self.reported()), qos=1, retain=True)

    async def _telemetry_loop(self) -> None:
        """Cut a batch every ``telemetry_interval`` or when a window reaches ``telemetry_batch_max``."""
        interval = self.config.telemetry_interval
        tick = min(interval, 0.25)
        last = time.monotonic()
        while True:
            await asyncio.sleep(tick)
            if (
                time.monotonic() - last < interval
                and self.telemetry.window_inferences < self.config.telemetry_batch_max
            ):
                continue
            last = time.monotonic()
            try:
                await asyncio.to_thread(self.telemetry.cut)
                await self._send_telemetry()
            except asyncio.CancelledError:
                raise
            except Exception:  # never let one bad window end telemetry for good
                self._count("telemetry_errors")
                log.exception("%s: telemetry window failed", self.device_id)

    async def _send_telemetry(self) -> None:
        """Send queued batches oldest first, deleting each only once the broker acknowledged it."""
        link, lock = self.link, self._send_lock
        if link is None or lock is None or lock.locked():
            return
        topic = protocol.topic(self.device_id, protocol.Channel.TELEMETRY)
        store = self.telemetry.store
        async with lock:
            while link.connected:
                rows = await asyncio.to_thread(store.oldest, max(1, self.config.max_inflight))
                if not rows:
                    return
                acks = await asyncio.gather(
                    *(link.publish_confirmed(topic, payload) for _, _, payload in rows)
                )
                deleted = True
                for (row_id, _, _), acked in zip(rows, acks, strict=True):
                    if acked:
                        self._count("telemetry_batches")
                        deleted = await asyncio.to_thread(store.delete, row_id) and deleted
                if not all(acks) or not deleted:
                    return  # broker away, or a disk too full to forget sent batches: next tick


__all__ = ["Agent", "InferenceResult", "InstallError", "NoModelError"]
