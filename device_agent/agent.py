"""The device agent's shell: it carries out what the pure core decides, and does all the I/O.

The decisions live in small modules without I/O: :mod:`~device_agent.judgement`
(accept or refuse a directive), :mod:`~device_agent.deployment` (the state
machine every state change goes through), :mod:`~device_agent.probation` (keep
or revert a swapped-in model). Carrying out an accepted directive (install,
swap, probation, shadow) is :mod:`~device_agent.reconcile`. The agent takes its
message link and its fetcher as injected interfaces (:mod:`device_agent.ports`);
by default it builds the real ones from its config (MQTT, HTTP(S) and TUF).

For each retained directive on ``ef/v1/{id}/desired``:

1. judge it (fleet signature, device id, seq, expiry) -> ``rejected`` + reason;
2. install the model it names into the inactive slot, or reuse the slot holding it;
3. load + warm it in a worker thread, then swap ONE reference;
4. with ``directive.probation``: keep the previous model loaded and watch the new
   one; revert by itself if it misbehaves (``reverted`` + why), report ``serving``
   only after the window passed and enough inferences succeeded;
5. with ``directive.shadow``: run the candidate on a sample of live inputs;
6. with ``directive.capture``: keep a sample of inferences on disk and upload them
   (:mod:`~device_agent.capture`, :mod:`~device_agent.capture_upload`).

Every answer of ``infer`` carries a UUIDv7 inference id; ``label`` joins a later
label to the prediction it names (:mod:`~device_agent.labels`).

Every failure leaves the serving model untouched. ``infer`` reads the serving
reference once, so calls in flight during a swap finish on the model they started
with. All link work happens on the agent's asyncio loop; ``infer`` may run on any
thread and talks to the loop only through ``call_soon_threadsafe``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import threading
import time
from collections.abc import Coroutine, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from device_agent import __version__
from device_agent import wire as protocol
from device_agent.capabilities import capabilities, device_fit
from device_agent.capture import Capturer
from device_agent.capture_store import CaptureStore
from device_agent.capture_upload import CaptureUploader, UploadSettings
from device_agent.clock import WallClock, now_utc
from device_agent.config import AgentConfig
from device_agent.deployment import Deployment
from device_agent.errors import InstallError, NoModelError
from device_agent.event_outbox import EventOutbox
from device_agent.http_fetcher import HttpFetcher, fetcher_for
from device_agent.ids import IdMinter, format_id, parse_id
from device_agent.install import Installer
from device_agent.judgement import Accept, Duplicate, Mark, RefreshRoot, Reject, RootWalk, judge
from device_agent.labels import LabelStatus, Matched, PredictionRing, Unmatched
from device_agent.labels import judge as judge_label
from device_agent.metrics import Metrics
from device_agent.mirrors import repository_url
from device_agent.mqtt_link import MqttLink
from device_agent.outcomes import MAX_METRICS as MAX_OUTCOME_METRICS
from device_agent.outcomes import OutcomeBook, OutcomeResult, OutcomeStatus
from device_agent.outcomes import check as check_outcome
from device_agent.ports import Admission, Fetcher, Link
from device_agent.reconcile import DETAIL_MAX, Reconciler
from device_agent.runtime import AutoRuntimeFactory, LoadedModel, RuntimeFactory
from device_agent.serving import InferenceResult, Models, Serving, scan
from device_agent.slots import SlotStore
from device_agent.telemetry import Telemetry
from device_agent.telemetry_store import BatchStore
from device_agent.uplink import TelemetryUplink
from device_agent.wire import ReasonCode
from signing.errors import DeliveryError, Unavailable
from signing.keys import PublicKey
from signing.trust import TrustRoot

if TYPE_CHECKING:  # TUF (python-tuf, securesystemslib) is imported only by agents that use it
    from device_agent.trust_state import TrustStore

log = logging.getLogger(__name__)

EVENT_RETRY_S = 1.0  # a refused event while connected (the publish window stayed full): next try
STOP_SEND_S = 2.0  # how long a stop gives the events still queued, as it gives the last telemetry


class LabelResult(NamedTuple):
    """What became of one label: its status and, when it did not match, why."""

    status: LabelStatus
    detail: str


def _label_time(value: Any, now: datetime) -> datetime | None:
    """A label's time as an aware datetime (naive ones are UTC, as everywhere in the fleet)."""
    if value is None:
        return now
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


class Agent:
    """One device. ``start``/``stop`` on an asyncio loop; ``infer`` from any thread."""

    def __init__(
        self,
        config: AgentConfig,
        trust: TrustRoot,
        runtime_factory: RuntimeFactory | None = None,
        *,
        clock: WallClock | None = None,
        link: Link | None = None,
        fetcher: Fetcher | None = None,
        admission: Admission | None = None,
    ):
        """``clock``: the device's wall clock, seconds since the epoch (default ``time.time``);
        see :mod:`device_agent.clock`. Only dates read it; timers stay monotonic.
        ``link``: default MQTT to ``config.mqtt_*`` (built at ``start``, when the password file
        is read); ``fetcher``: default HTTP(S) + TUF with the config's TLS settings;
        ``admission``: turns at an install's heavy steps shared with other agents on the same CPU
        (:class:`device_agent.ports.Admission`; default none, a device's CPU is its own)."""
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
        self.link: Link | None = link
        # The connections of a fetcher the agent built are the agent's to close; an injected one's
        # are its maker's.
        self._own_fetcher: HttpFetcher | None = None
        if fetcher is None:
            fetcher = self._own_fetcher = fetcher_for(config)
        self.fetcher: Fetcher = fetcher
        self.api: Any = None  # device_agent.local_api.LocalApi when config.api_listen is set
        self.trust_store: TrustStore | None = None
        accepted: int | None = None
        if config.tuf_root_path is not None:
            from device_agent.trust_state import TrustStore

            self.trust_store = TrustStore(self.slots.data_dir / "trust", config.tuf_root_path.read_bytes())
            accepted = self.trust_store.state.last_seq
        self._mark = Mark.restored(self.slots.state.last_seq, accepted)
        self._models = Models()
        self._proof_lock = threading.Lock()
        self._metrics = Metrics()
        self._new_id = IdMinter(clock)  # the device's clock dates its inference ids
        self._predictions = PredictionRing(config.label_ring_size)
        self._outcomes = OutcomeBook(4 * config.label_ring_size)
        captures = CaptureStore(
            self.slots.data_dir / "capture", config.device_id, lambda: format_id(self._new_id())
        )
        self.capture = Capturer(
            captures,
            self.telemetry,
            self._metrics,
            batch_age_s=config.capture_batch_age_s,
            on_sealed=lambda: self._call_on_loop(self._wake_uploader),
        )
        self._uploader = CaptureUploader(
            UploadSettings(
                config.device_id,
                config.mqtt_cert_file,
                config.mqtt_key_file,
                config.http_ca_file,
                config.capture_upload_bytes_per_s,
            ),
            captures,
            self._metrics,
            lambda: self.capture.upload_url,
        )
        self._upload_task: asyncio.Task[None] | None = None
        installer = Installer(
            config,
            self.slots,
            self.fetcher,
            release_keys=self.release_keys,
            fit=lambda: device_fit(self.config, self.runtime),
            trust_store=self.trust_store,
            now=self.now,
            clock=self.clock,
            admission=admission,
        )
        self._reconciler = Reconciler(
            config,
            self.slots,
            self.runtime,
            self.telemetry,
            self._models,
            self._metrics,
            installer,
            publish_event=self._publish_event,
            publish_reported=self._publish_reported,
            drain=self._drain,
            now=self.now,
            admission=admission,
            idle=self._close_fetcher,
        )
        self._uplink = TelemetryUplink(config, self.telemetry, self._metrics, lambda: self.link)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self._events = EventOutbox()
        self._events_sending = asyncio.Lock()  # one sender at a time: the queue leaves in order
        self._restored = False
        self._aborted = False
        self._stopping = False  # stop() began: background work is no longer started
        self._caps = capabilities(config, self.runtime)
        self._desired_topic = protocol.topic(self.device_id, protocol.Channel.DESIRED)

    def now(self) -> datetime:
        """The device's wall-clock time (``clock``, possibly skewed), as an aware UTC datetime."""
        return now_utc(self.clock)

    # -- keys and fit ------------------------------------------------------------

    def fleet_keys(self) -> Mapping[str, PublicKey]:
        """Directive signers: the newest verified TUF root's, or those in ``trust.json``."""
        return self.trust_store.fleet_keys if self.trust_store is not None else self.trust.fleet_keys

    def release_keys(self) -> Mapping[str, PublicKey]:
        """Bundle (DSSE envelope) signers, from the same source as ``fleet_keys``."""
        return self.trust_store.release_keys if self.trust_store is not None else self.trust.release_keys

    # -- lifecycle ---------------------------------------------------------------

    async def restore(self) -> None:
        """Serve what ``state.json`` says is active (re-hashed first; the other slot if it is unusable).

        ``start`` does this first; a caller that only wants the model on disk served
        (a benchmark) may call it alone. Idempotent.
        """
        if not self._restored:
            self._restored = True
            await self._reconciler.restore()

    async def start(self) -> None:
        """Load the active slot's model, connect, and begin reconciling and reporting."""
        if self._aborted:
            raise RuntimeError(f"{self.device_id}: an aborted agent cannot start again; build a new one")
        self._loop = asyncio.get_running_loop()
        await self.restore()
        if self.config.api_listen:
            from device_agent.local_api import LocalApi

            self.api = LocalApi(
                self,
                self.config.api_listen,
                max_body=self.config.api_max_body,
                timeout=self.config.api_request_timeout_s,
                workers=self.config.api_workers,
            )
            self.api.start()
        if self.link is None:
            self.link = MqttLink(
                self.device_id,
                self.config.mqtt_host,
                self.config.mqtt_port,
                mqtt_version=self.config.mqtt_version,
                keepalive=self.config.keepalive,
                session_expiry=self.config.session_expiry,
                max_inflight=self.config.max_inflight,
                security=self.config.mqtt_security(),
                now=self.now,
            )
        self._tasks = [
            self._loop.create_task(self._reconciler.run(), name=f"{self.device_id}-reconcile"),
            self._loop.create_task(self._uplink.run(), name=f"{self.device_id}-telemetry"),
        ]
        self.capture.start()
        self._start_uploader()
        self._reconciler.resume_probation()
        await self.link.start(self._on_message, self._on_connected)

    async def wait_connected(self, timeout: float | None = None) -> bool:
        return self.link is not None and await self.link.wait_connected(timeout)

    def _own_tasks(self) -> list[asyncio.Task[Any]]:
        tasks: list[asyncio.Task[Any]] = list(self._tasks)
        probation, self._reconciler.probation_task = self._reconciler.probation_task, None
        if probation is not None:
            tasks.append(probation)
        upload, self._upload_task = self._upload_task, None
        if upload is not None:
            tasks.append(upload)
        self._tasks = []
        return tasks

    async def stop(self) -> None:
        """Stop reconciling, send the last telemetry window, publish offline, disconnect, close
        the telemetry queue.

        (After :meth:`abort` there is nothing left to stop: a no-op.)"""
        if self._aborted:
            return
        # From here a late callback (a reconnect's "send what is queued", a state change's report)
        # must not start work that would outlive the telemetry queue closed below.
        self._stopping = True
        tasks = self._own_tasks()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._reconciler.stop_shadow()
        if self.api is not None:
            await asyncio.to_thread(self.api.stop)
            self.api = None
        await asyncio.to_thread(self.capture.stop)
        # The open window is queued even with the broker away: on disk, it goes out at the next start.
        try:
            await self._uplink.flush()
        except Exception:  # the rest of the stop (offline, disconnect, closing) must still happen
            self._metrics.count("telemetry_errors")
            log.exception("%s: the last telemetry window could not be queued or sent", self.device_id)
        if self.link is not None:
            if len(self._events):  # what waited for the link, if it is there: briefly, as telemetry
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._send_events(), STOP_SEND_S)
            await self.link.stop()
        pending = list(self._background)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        await self._close_fetcher()
        self.telemetry.store.close()  # what is still queued stays on disk for the next start

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
          (that boot is the crash-recovery path);
        - sampled inferences still queued for the capture writer are lost (they were never
          captured); an upload in flight is cut off and its batch stays on disk, to be sent
          again by the next boot; the prediction ring (labels) is gone with the process.

        The agent cannot be started again; build a new one. Idempotent.
        """
        if self._aborted:
            return
        self._aborted = True
        tasks = [*self._own_tasks(), *self._background]
        for task in tasks:
            task.cancel()
        if self.link is not None:
            self.link.abort()
        self._loop = None  # nothing new gets scheduled (``_spawn``, ``infer`` -> loop callbacks)
        await asyncio.gather(*tasks, return_exceptions=True)
        self._reconciler.stop_shadow(wait=False)
        self._models.serving = self._models.previous = None
        if self.api is not None:
            api, self.api = self.api, None
            await asyncio.to_thread(api.stop)
        # The writer finishes the item it is writing (a real power cut could tear it: the next
        # start drops a torn line); what is still queued was never captured and is lost.
        await asyncio.to_thread(self.capture.stop, False)
        await self._close_fetcher()  # the sockets go with the power (the next boot opens its own)
        self.telemetry.store.close()

    async def _close_fetcher(self) -> None:
        """Close the connections the agent's own fetcher opened (after each directive, and at the
        end); it opens new ones on its next request."""
        if self._own_fetcher is not None:
            await self._own_fetcher.aclose()

    # -- inference (any thread) --------------------------------------------------

    @property
    def serving(self) -> Serving | None:
        """The model answering now (one reference, replaced whole on a swap)."""
        return self._models.serving

    @property
    def running_sha256(self) -> str | None:
        s = self._models.serving
        return s.sha256 if s else None

    @property
    def running_model(self) -> LoadedModel | None:
        s = self._models.serving
        return s.model if s else None

    @property
    def running_version(self) -> str | None:
        s = self._models.serving
        return s.version if s else None

    @property
    def shadow_sha256(self) -> str | None:
        s = self._models.shadow
        return s.sha256 if s else None

    @property
    def history(self) -> list[str]:
        """Every model that served, in order (boot, swaps, reverts)."""
        return self._models.history

    def infer(self, x: np.ndarray) -> InferenceResult:
        """Run the serving model on ``x``. Thread-safe; never blocks on a swap.

        Failures do not raise: a non-finite output or a runtime exception is
        returned with ``ok=False`` and counted by kind, because the error rate
        is what the rollout gates (and probation) judge a model by.

        Every answer carries a new UUIDv7 ``inference_id``: a label posted for it
        later (:meth:`label`) is joined to this prediction, and a captured sample
        (the directive's ``capture`` policy) is stored under it.
        """
        models = self._models
        s = models.serving  # read the reference once: a swap cannot change it under us
        if s is None:
            raise NoModelError(f"{self.device_id}: no model installed")
        id128 = self._new_id()
        t0 = time.perf_counter()
        error: str | None = None
        classes: list[int] = []
        top: float | None = None
        try:
            outputs = s.model.run(x)
            bad, classes, top = scan(outputs)
            if bad:
                error = "non_finite"
        except Exception as exc:
            log.debug("%s: inference failed: %s", self.device_id, exc)
            outputs, error = [], "runtime_error"
        latency_us = (time.perf_counter() - t0) * 1e6
        self.telemetry.record(s.sha256, latency_us, error, classes, x, outputs, s.check)
        width = outputs[0].shape[-1] if outputs and outputs[0].ndim else 1
        self._predictions.add((id128, s.sha256, classes, top, width))
        if error is not None:
            self._metrics.count(f"inference_{error}")
        elif models.awaiting_proof is not None:
            self._check_proof(s.sha256)
        shadow = models.shadow
        if shadow is not None and error is None and not shadow.offer(x, classes):
            self._metrics.count("shadow_skipped")
        capture = self.capture
        if (
            capture.rate
            and random.random() < capture.rate
            and not capture.offer(id128, s.sha256, s.input_name, x, outputs)
        ):
            self._metrics.count("capture_skipped")
        return InferenceResult(outputs, s.sha256, s.version, error is None, error, id128)

    # -- ground truth (any thread) -------------------------------------------------

    def label(self, inference_id: Any, label: Any, label_time: Any = None) -> LabelResult:
        """Join a label to the prediction ``inference_id`` named; never raises on bad input.

        ``label``: the true class index (classifiers; a list with one per row for a batch), or the
        true value (regressors). ``label_time``: when the truth was known (an aware datetime or
        ISO 8601; default now, by the device clock), which dates the label delay. The answer's
        ``status`` is ``matched``, ``unknown``, ``expired``, ``duplicate`` or ``invalid``
        (:mod:`device_agent.labels`); a match counts in the model's telemetry, anything else in
        the batch's ``labels_unmatched``.
        """
        verdict = self._judge_label(inference_id, label, label_time)
        if isinstance(verdict, Matched):
            self.telemetry.record_label(
                verdict.sha256,
                rows=verdict.rows,
                correct=verdict.correct,
                confusion=verdict.confusion,
                delay_s=verdict.delay_s,
                abs_error=verdict.abs_error,
            )
            self._metrics.count("labels_matched")
            return LabelResult(LabelStatus.MATCHED, "")
        self.telemetry.record_unmatched(verdict.status.value)
        self._metrics.count(f"labels_{verdict.status.value}")
        return LabelResult(verdict.status, verdict.detail)

    def outcome(self, inference_id: Any, metric: Any, value: Any) -> OutcomeResult:
        """Join an app's outcome value to the prediction ``inference_id`` named and count it in that
        model's telemetry (:mod:`device_agent.outcomes`); once per (inference, metric); never
        raises on bad input."""
        why = check_outcome(metric, value)
        id128 = parse_id(inference_id)
        if id128 is None:
            why = why or "inference_id is not a UUIDv7"
        if why is not None or id128 is None:
            self._metrics.count("outcomes_invalid")
            return OutcomeResult(OutcomeStatus.INVALID, why or "")
        prediction, _ = self._predictions.find(id128)
        if prediction is None:
            self._metrics.count("outcomes_unknown")
            return OutcomeResult(OutcomeStatus.UNKNOWN, "no prediction with this id is held on this device")
        if not self._outcomes.mark(id128, metric):
            self._metrics.count("outcomes_duplicate")
            return OutcomeResult(
                OutcomeStatus.DUPLICATE, "this outcome of this inference was counted already"
            )
        if not self.telemetry.record_outcome(prediction.sha256, metric, float(value), MAX_OUTCOME_METRICS):
            return OutcomeResult(
                OutcomeStatus.INVALID, f"at most {MAX_OUTCOME_METRICS} outcome metrics per model"
            )
        self._metrics.count("outcomes_matched")
        return OutcomeResult(OutcomeStatus.MATCHED)

    def _judge_label(self, inference_id: Any, label: Any, label_time: Any) -> Matched | Unmatched:
        id128 = parse_id(inference_id)
        if id128 is None:
            return Unmatched(LabelStatus.INVALID, "inference_id is not a UUIDv7")
        now = self.now()
        when = _label_time(label_time, now)
        if when is None:
            return Unmatched(LabelStatus.INVALID, "label_time is not an ISO 8601 date and time")
        ring = self._predictions
        prediction, labelled = ring.find(id128)
        verdict = judge_label(
            prediction,
            labelled,
            id128,
            label,
            label_ms=int(when.timestamp() * 1000),
            now_ms=int(now.timestamp() * 1000),
            max_age_ms=int(self.config.label_max_age_s * 1000),
            oldest=ring.oldest(),
        )
        if isinstance(verdict, Matched) and not ring.mark(id128):
            return Unmatched(LabelStatus.DUPLICATE, "this prediction was labelled already")
        return verdict

    # -- capture (loop thread) -----------------------------------------------------

    def _start_uploader(self) -> None:
        """Run the upload task once there is anywhere to upload to (a policy, now or from before)."""
        if self._loop is None or self._upload_task is not None or self.capture.upload_url is None:
            return
        self._upload_task = self._loop.create_task(self._uploader.run(), name=f"{self.device_id}-capture")

    def _wake_uploader(self) -> None:
        self._uploader.wake.set()

    def _check_proof(self, sha256: str) -> None:
        models = self._models
        with self._proof_lock:
            if models.awaiting_proof != sha256:
                return
            models.awaiting_proof = None
        # The server counts a device done only on "new hash running AND >= 1 ok inference".
        self._call_on_loop(lambda: self._spawn(self._publish_reported()))

    def _call_on_loop(self, fn: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        with contextlib.suppress(RuntimeError):  # loop closing
            loop.call_soon_threadsafe(fn)

    # -- deferral and the link -----------------------------------------------------

    def defer(self, seconds: float, reason: str, timeout: float = 10.0) -> dict[str, Any]:
        """An app asks to hold activation ``seconds`` (0: withdraw); from any thread but the loop's.

        Runs on the agent's loop (the reconciler's state lives there); the answer says until when
        activation is held (capped by the directive's ``max_deferral_seconds``)."""
        loop = self._loop
        if loop is None or loop.is_closed():
            raise RuntimeError(f"{self.device_id}: the agent is not running")
        future = asyncio.run_coroutine_threadsafe(self._reconciler.defer(seconds, reason), loop)
        return future.result(timeout)

    def set_link_class(self, link_class: str) -> None:
        """The device's link changed (metered or unmetered); call on the agent's loop."""
        self._reconciler.set_link_class(link_class)
        self._spawn(self._publish_reported())

    # -- views -------------------------------------------------------------------

    @property
    def metrics(self) -> dict[str, int]:
        m = self._metrics.snapshot()
        m["telemetry_dropped_batches"] = self.telemetry.dropped_batches
        return m

    @property
    def served_ok(self) -> dict[str, int]:
        return self.telemetry.served_ok()

    @property
    def deployment(self) -> Deployment:
        """Where the device stands (seq, state, error, serving model), as the state machine left it."""
        return self._reconciler.deployment

    @property
    def deployment_state(self) -> protocol.DeploymentState:
        return self._reconciler.deployment.state

    @property
    def deployment_error(self) -> str | None:
        return self._reconciler.deployment.error

    def reported(self) -> protocol.Reported:
        s, dep = self._models.serving, self._reconciler.deployment
        with contextlib.suppress(OSError):
            self._caps["disk_free"] = shutil.disk_usage(self.config.data_dir).free
        return protocol.Reported(
            device_id=self.device_id,
            agent_version=__version__,
            hardware_id=self.config.hardware_id,
            running=protocol.RunningModel(name=s.name, version=s.version, sha256=s.sha256) if s else None,
            slots=self.slots.slot_hashes(),
            active_slot=self.slots.state.active,
            deployment_seq=dep.seq,
            deployment_state=dep.state,
            deployment_error=dep.error,
            served_ok=self.served_ok,
            served_errors=self.telemetry.served_errors(),
            shadow_sha256=self.shadow_sha256,
            last_rejection=self._reconciler.last_rejection,
            capabilities=self._caps,
            acceptance=dict(self._reconciler.acceptance),
            timezone=self.config.timezone,
            link=self._reconciler.link(),
            waiting=self._reconciler.waiting,
            ts=self.now(),
        )

    # -- inbound (loop thread) ---------------------------------------------------

    def _on_connected(self) -> None:
        self._spawn(self._resume())
        self._spawn(self._uplink.send())

    async def _resume(self) -> None:
        """After a (re)connect: what happened while away, then the state it led to (one task, so
        the report cannot overtake events still waiting for the publish window)."""
        await self._send_events()
        await self._publish_reported()

    def _on_message(self, topic: str, payload: bytes, retained: bool) -> None:
        if topic != self._desired_topic:
            return
        if not payload:
            # An empty retained message clears the topic: nothing to do, but worth seeing.
            self._metrics.count("malformed_messages")
            log.info("%s: empty desired payload (retained clear) ignored", self.device_id)
            return
        self._metrics.count("directives_received")
        self._judge(payload, RootWalk(possible=self.trust_store is not None))

    def _judge(self, payload: bytes, root: RootWalk) -> None:
        try:
            verdict = judge(
                payload,
                keys=self.fleet_keys(),
                device_id=self.device_id,
                mark=self._mark,
                now=self.now(),
                root=root,
            )
        except Exception as exc:  # a defect must still answer the fleet, never silence the handler
            log.exception("%s: judging a directive failed", self.device_id)
            verdict = Reject(0, ReasonCode.INTERNAL_ERROR, repr(exc))
        if isinstance(verdict, Accept):
            self._accept(verdict)
        elif isinstance(verdict, Duplicate):
            self._metrics.count("duplicate_directives")  # the same retained directive (reconnect, restart)
        elif isinstance(verdict, RefreshRoot):
            self._spawn(self._refresh_root_and_judge(payload))
        else:
            if verdict.malformed:
                self._metrics.count("malformed_messages")
            self._reject(verdict)

    def _accept(self, verdict: Accept) -> None:
        directive = verdict.directive
        self._mark = verdict.mark
        try:
            self.capture.apply(directive.capture)
        except OSError as exc:  # the policy could not be stored: sampling follows it all the same
            self._metrics.count("state_write_failures")
            log.warning("%s: capture policy of seq %d not persisted: %s", self.device_id, directive.seq, exc)
        self._start_uploader()
        if self.trust_store is not None:
            try:
                self.trust_store.advance(seq=directive.seq)
            except OSError as exc:  # disk full: held in memory; a restart runs this directive again
                self._metrics.count("state_write_failures")
                log.warning("%s: could not persist accepted seq %d: %s", self.device_id, directive.seq, exc)
        self._metrics.count("directives_accepted")
        self._reconciler.submit(directive)

    async def _refresh_root_and_judge(self, payload: bytes) -> None:
        """Walk the repository's root chain, then judge the directive again with the newest keys."""
        store = self.trust_store
        assert store is not None
        before = store.state.root_version
        bases = self.config.mirrors or [
            repository_url(self.config.tuf_url, None) or store.state.repository_url
        ]
        failures: list[DeliveryError] = []
        for base in bases:  # in order, until one repository's chain verifies to its end
            failed = await asyncio.to_thread(self.fetcher.root, store, base, self.now())
            if failed is None:
                failures = []
                break
            failures.append(failed)
        # what a mirror that answered refused says more than one that was away
        refused = [f for f in failures if not isinstance(f, Unavailable)]
        failure = (refused or failures)[0] if failures else None
        if store.state.root_version > before:
            log.info("%s: followed the root chain to v%d", self.device_id, store.state.root_version)
        self._judge(payload, RootWalk(possible=False, failure=failure))

    def _reject(self, verdict: Reject) -> None:
        seq, reason, detail = verdict.seq, verdict.reason, verdict.detail
        log.warning(
            "%s: directive seq %d rejected: %s (%s)",
            self.device_id,
            seq,
            reason,
            detail,
            extra={"device_id": self.device_id, "seq": seq, "reason": reason},
        )
        self._metrics.count("rejected_directives")
        self._metrics.count(f"rejected_{reason}")
        self._reconciler.last_rejection = protocol.Rejection(
            seq=seq, reason=reason, detail=detail[:DETAIL_MAX]
        )
        event = protocol.Event(
            device_id=self.device_id,
            seq=seq,
            state=protocol.DeploymentState.REJECTED,
            reason=reason,
            detail=detail,
            ts=self.now(),
        )
        self._spawn(self._publish_event(event))
        self._spawn(self._publish_reported())

    # -- outbound (loop thread) --------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        if self._stopping or self._loop is None or self._loop.is_closed():
            coro.close()
            return
        task = self._loop.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _publish_event(self, event: protocol.Event) -> None:
        """Queue ``event`` (with its id) and send what the queue holds, oldest first. While a
        sender is at work (a reconnect's backlog) it takes this one too: the caller, the
        reconciler, does not wait behind the backlog."""
        dropped = self._events.dropped
        self._events.add(event)
        if self._events.dropped > dropped:
            self._metrics.count("events_dropped", self._events.dropped - dropped)
        if self._events_sending.locked():
            return
        await self._send_events()

    async def _send_events(self) -> None:
        """Hand the queued events to the link in order, until it refuses one. Refused while
        disconnected: the next connection sends the rest; refused while connected (the publish
        window stayed full): tried again shortly."""
        if self.link is None:
            return
        topic = protocol.topic(self.device_id, protocol.Channel.EVENTS)
        async with self._events_sending:
            while (event := self._events.head()) is not None:
                if not await self.link.publish(topic, protocol.encode(event), qos=1):
                    self._metrics.count("event_sends_refused")
                    if self.link.connected and self._loop is not None:
                        self._loop.call_later(EVENT_RETRY_S, lambda: self._spawn(self._send_events()))
                    return
                self._events.sent(event)

    async def _publish_reported(self) -> None:
        if self.link is not None:
            topic = protocol.topic(self.device_id, protocol.Channel.REPORTED)
            await self.link.publish(topic, protocol.encode(self.reported()), qos=1, retain=True)

    async def _drain(self) -> None:
        if self.link is not None:
            await self.link.drain(timeout=2.0)


__all__ = ["Agent", "InferenceResult", "InstallError", "LabelResult", "NoModelError", "capabilities"]
