"""Ingest pipelines and the ingest worker process: MQTT in, stored, acknowledged after commit.

``Pipeline``: paho's ``on_message`` only appends the raw message to a queue
(a few microseconds, so the network thread always gets back to keepalives);
one store thread takes everything queued (up to ``max_batch``), decodes and
stores it in one transaction (``ingest.ingest_batch``), and only after the
commit sends the PUBACKs (paho ``manual_ack``). A database error that is
transient (down, locked) retries the same flush with a backoff and
acknowledges nothing meanwhile.

``IngestWorker``: the streams are taken by separate processes, each with its
own MQTT client in the replica's ``$share`` group, so decoding, aggregating and
storing thousands of batches per second never competes for the GIL with the
API, the engine ticker or the main MQTT client (which keeps the retained
snapshots and publishes directives): ``settings.ingest_workers`` telemetry
workers (``TELEMETRY_ONLY``, default 2; sums, stored in any order) and one
events worker (``EVENTS_ONLY``). Workers are forked from a ``forkserver`` that
has this module imported already (~tens of ms per worker after the first).
The parent reads each worker's counters and state over a pipe; a worker exits
when the pipe closes (its server died) and the server restarts a worker that
died.

Why events have a worker (a client, a session, a store thread) of their own:
Mosquitto queues a client's deliveries in one FIFO whatever the subscription,
so events taken by a client that also takes telemetry wait behind every
telemetry batch queued for it. Under load that queue was minutes long (a
10,000-device run: ingest up to 267 s behind), and the engine, which moves
devices on from their events (install progress, success, failure), saw them
that late and timed out devices that were working. With a client of its own,
a telemetry backlog delays only telemetry: events are few (a handful per
device per rollout) and their queue stays short. One events consumer per
broker shard and replica also keeps one device's events in order within a
replica (the engine reads them in arrival order). Each worker has its own lag
probe (``fleet_server.ingest_lag``), so the server reports the events' lag and
the telemetry's separately.

Delivery guarantee (QoS 1): a message is acknowledged to the broker only
after the transaction holding it committed (or after it was judged malformed,
unregistered or refused by the database for its data, which are counted and
logged). If the server dies between delivery and commit, the broker still
holds the message as unacknowledged: with a stable ``mqtt_client_id`` (a
persistent session) it is delivered again when the replica reconnects, and
telemetry is deduped on (device_id, batch_id), so it counts exactly once,
and events on (device_id, event_id), so each is stored once (events of agents
that send no id may be stored twice: they are idempotent for the engine). With
a random client id (clean session, the default) the broker discards the
session and its unacknowledged messages when the connection drops: run
replicas with a stable id when telemetry must not be lost.

Leaving (the server stops, or dies: the worker sees its pipe close): a worker
with a clean session first unsubscribes from its ``$share`` filters and waits
for the UNSUBACK, so the broker hands the group's next messages to the other
members (the other replicas, or the restarted server); everything delivered
before the UNSUBACK has been queued by then (paho reads in order). The worker
stores and acknowledges it, and whatever still trickles in until the stream
goes quiet, and only then disconnects. Stopping the store thread while still
subscribed lost every message the broker delivered in between (never stored,
unacknowledged when the clean session ended: gone), which a replica killed
mid-rollout hit under load. A persistent session stays subscribed instead: the
broker keeps its messages until it is back.

Flow control: the workers ask for MQTT 5 Receive Maximum
(``mqtt_receive_maximum``) and ``on_message`` holds paho's thread while that
many messages wait (Mosquitto 2.0 sends past Receive Maximum once PUBACKs
flow), so a slow database pushes back to the broker's queue instead of growing
the server's memory; see ``acks_are_activity`` for the keepalive.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import Engine

from device_agent import protocol
from fleet_server import reconcile
from fleet_server.counters import Counters
from fleet_server.ingest import TRANSIENT_ERRORS, Inbound, ingest_batch
from fleet_server.ingest_lag import LagProbe, probe_topic
from fleet_server.mqtt_client import Endpoint, connect, new_client, shard_endpoints
from fleet_server.settings import ServerSettings

log = logging.getLogger(__name__)

STREAM_CHANNELS = (protocol.Channel.EVENTS, protocol.Channel.TELEMETRY)
REPORT_INTERVAL = 0.05  # seconds between a worker's state reports to its server
UNSUBSCRIBE_TIMEOUT = 5.0  # seconds to wait for the UNSUBACK when leaving the $share group
# After the UNSUBACK: messages the broker had queued for this client past its Receive Maximum still
# come, as acknowledgements free slots; leaving waits until none came for QUIET (bounded by DRAIN).
LEAVE_QUIET = 0.2
LEAVE_DRAIN_TIMEOUT = 5.0


class Pipeline:
    """Raw messages in (any thread), stored in flushes by one thread, then acknowledged."""

    def __init__(
        self,
        engine: Engine,
        counters: Counters,
        ack: Callable[[int, int], Any] | None,
        max_batch: int = 1000,
        name: str = "ef-ingest",
        max_backlog: int = 4000,
        max_wait: float = 5.0,
    ) -> None:
        self.engine, self.counters, self.ack, self.max_batch = engine, counters, ack, max_batch
        self.max_backlog, self.max_wait = max(max_backlog, 2 * max_batch), max_wait
        self.on_acked: Callable[[], None] | None = None
        # lag probes (``fleet_server.ingest_lag``): taken out of the flush they arrive in, and
        # reported with their payload once that flush is committed
        self.probe_topic: str | None = None
        self.on_probe: Callable[[str], None] | None = None
        # live reported snapshots, after they are committed and acknowledged (the reconciler)
        self.on_reported: Callable[[list[reconcile.Observation]], None] | None = None
        self._queue: queue.SimpleQueue[Inbound | None] = queue.SimpleQueue()
        self._busy = 0  # messages taken from the queue but not stored yet
        self._storing_since = 0.0  # arrival of the oldest message being stored (epoch s), 0: idle
        self._progress = time.monotonic()  # when the store thread last finished a flush (or idled)
        self._received = time.monotonic()  # when the last message was put
        self._stopping = threading.Event()
        self._discard = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def put(self, msg: Inbound) -> None:
        """From paho's ``on_message``: O(1), never blocks."""
        self._received = time.monotonic()
        self._queue.put(msg)

    def on_message(self, _c: mqtt.Client, _ud: Any, m: mqtt.MQTTMessage) -> None:
        """paho's callback: enqueue, O(1).

        Backpressure: while ``max_backlog`` messages wait and the store thread is making progress,
        hold the network thread (a few ms at a time), so the excess stays at the broker instead of
        this process's memory (needed because Mosquitto 2.0 sends past the client's Receive
        Maximum once acknowledgements flow). Never while the store thread is stalled for more than
        ``max_wait`` (a slow or unavailable database): then paho must keep reading, or a PINGRESP
        queued behind the deliveries would not be read within the keepalive."""
        while (
            self._queue.qsize() >= self.max_backlog
            and time.monotonic() - self._progress < self.max_wait
            and not self._stopping.is_set()
        ):
            time.sleep(0.002)
        self.put(Inbound(m.topic, bytes(m.payload), time.time(), bool(m.retain), m.mid, m.qos))

    @property
    def backlog(self) -> int:
        """Messages received but not stored (and not acknowledged) yet."""
        return self._queue.qsize() + self._busy

    @property
    def lag(self) -> float:
        """Seconds the oldest message being stored has waited since it arrived (0 when idle): the
        queued ones arrived later, so this is the ingest lag."""
        since = self._storing_since
        return max(time.time() - since, 0.0) if since else 0.0

    def drain(self, quiet: float = LEAVE_QUIET, timeout: float = LEAVE_DRAIN_TIMEOUT) -> bool:
        """Wait until everything received is stored and acknowledged and nothing came for ``quiet``
        seconds (after unsubscribing: the broker's last queued deliveries); False on ``timeout``."""
        deadline = time.monotonic() + timeout
        while self.backlog or time.monotonic() - self._received < quiet:
            if time.monotonic() > deadline or not self._thread.is_alive():
                return False
            time.sleep(0.01)
        return True

    def stop(self, discard_backlog: bool = False, timeout: float = 15.0) -> None:
        """Store (and acknowledge) what was received, unless ``discard_backlog``; then end the thread.

        Anything delivered after this is neither stored nor acknowledged: leave the subscriptions
        first (``unsubscribe_and_wait``) when the messages must go to another consumer."""
        self._discard = discard_backlog
        self._stopping.set()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._progress = time.monotonic()
            item = self._queue.get()
            if item is None:
                return
            self._progress = time.monotonic()
            batch = [item]
            stop = False
            while len(batch) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            if self._discard:
                return
            self._busy = len(batch)
            self._storing_since = min((m.received_at for m in batch if m.received_at), default=0.0)
            self._store(batch)
            self._busy = 0
            self._storing_since = 0.0
            if stop:
                return

    def _store(self, batch: list[Inbound]) -> None:
        delay = 0.1
        observed: list[reconcile.Observation] = []
        probes = [m for m in batch if m.topic == self.probe_topic] if self.probe_topic else []
        messages = [m for m in batch if m.topic != self.probe_topic] if probes else batch
        while True:
            try:
                observed = ingest_batch(self.engine, messages, self.counters)
                break
            except TRANSIENT_ERRORS:
                if self._stopping.is_set():
                    log.error(
                        "database unavailable while stopping: %d messages left unacknowledged", len(batch)
                    )
                    return  # not acknowledged: the broker keeps them (persistent session)
                log.exception(
                    "database unavailable; retrying a flush of %d messages in %.1fs", len(batch), delay
                )
                time.sleep(delay)
                delay = min(delay * 2, 5.0)
            except Exception:  # never let one bad flush kill ingest
                log.exception("ingest of %d messages failed", len(batch))
                break
        if self.ack is not None:
            acked = False
            for m in batch:
                if m.qos:
                    self.ack(m.mid, m.qos)
                    acked = True
            if acked and self.on_acked is not None:
                self.on_acked()
        if probes and self.on_probe is not None:
            for m in probes:
                self.on_probe(m.payload.decode("ascii", "replace"))
        if observed and self.on_reported is not None:
            try:
                self.on_reported(observed)
            except Exception:  # judging drift must never stop ingest
                log.exception("reconciling %d reported snapshots failed", len(observed))


def pipeline_for(
    settings: ServerSettings, engine: Engine, counters: Counters, client: mqtt.Client
) -> Pipeline:
    pipeline = Pipeline(
        engine,
        counters,
        client.ack,
        settings.ingest_max_batch,
        max_backlog=settings.mqtt_receive_maximum,
        max_wait=settings.mqtt_keepalive / 3,
    )
    pipeline.on_acked = lambda: acks_are_activity(client)
    return pipeline


def acks_are_activity(client: mqtt.Client) -> None:
    """Tell paho that PUBACKs went out, so it pings only after ``keepalive`` without any packet sent.

    paho 2.2 never counts ordinary writes as activity (eclipse-paho/paho.mqtt.python#813): it sends
    a PINGREQ every keepalive however busy the connection, and expects the PINGRESP within the next
    keepalive. Mosquitto 2.0 queues that PINGRESP behind every delivery it has already packetised
    for us, and it packetises past our Receive Maximum once acknowledgements flow: a consumer a few
    seconds behind the publishers then misses the PINGRESP and paho drops the connection ("keep
    alive timeout") although the link is busy and healthy. PUBACKs are control packets: by MQTT
    they satisfy the keepalive (the broker's 1.5x timer counts them too).
    """
    mutex = getattr(client, "_msgtime_mutex", None)
    if mutex is not None and hasattr(client, "_last_msg_out"):
        with mutex:
            client._last_msg_out = mqtt.time_func()


def unsubscribe_and_wait(
    client: mqtt.Client, filters: list[str], timeout: float = UNSUBSCRIBE_TIMEOUT
) -> bool:
    """Unsubscribe ``filters`` and wait for the UNSUBACK: from then on the broker gives a ``$share``
    group's messages to its other members, and every message it sent this client before has been
    passed to ``on_message`` already (paho reads packets in order). False when not connected or
    no UNSUBACK came within ``timeout``."""
    if not filters or not client.is_connected():
        return False
    done = threading.Condition()
    acked: set[int] = set()

    def on_unsubscribe(_c: mqtt.Client, _u: Any, mid: int, _rcs: Any, _p: Properties | None) -> None:
        with done:
            acked.add(mid)
            done.notify_all()

    client.on_unsubscribe = on_unsubscribe
    result, mid = client.unsubscribe(filters)
    if result != mqtt.MQTT_ERR_SUCCESS or mid is None:
        return False
    with done:
        return done.wait_for(lambda: mid in acked, timeout)


def leave(client: mqtt.Client, pipeline: Pipeline, filters: list[str], discard_backlog: bool) -> None:
    """Stop consuming without dropping what the broker already sent: unsubscribe, store and
    acknowledge every delivery, then stop the store thread (the caller disconnects afterwards)."""
    if not discard_backlog and unsubscribe_and_wait(client, filters):
        pipeline.drain()
    pipeline.stop(discard_backlog=discard_backlog)


def stream_filters(
    settings: ServerSettings, channels: tuple[protocol.Channel, ...] = STREAM_CHANNELS
) -> list[str]:
    return [
        protocol.shared_subscription(ch) if settings.shared_subscriptions else protocol.wildcard(ch)
        for ch in channels
    ]


EVENTS_ONLY = (protocol.Channel.EVENTS,)
TELEMETRY_ONLY = (protocol.Channel.TELEMETRY,)


def stale_filters(settings: ServerSettings, channels: tuple[protocol.Channel, ...]) -> list[str]:
    """The stream filters a persistent session of a client taking ``channels`` may still hold from a
    version where it took more (the first telemetry worker took the events too): unsubscribed on
    connect, or the broker would go on sharing those streams with it."""
    return stream_filters(settings, tuple(ch for ch in STREAM_CHANNELS if ch not in channels))


# --- the worker process --------------------------------------------------------------------------


def worker_main(
    settings: ServerSettings, client_id: str, channels: tuple[protocol.Channel, ...], conn: Connection
) -> None:
    """Entry point of an ingest worker process: until told to stop, or until its server is gone."""
    logging.basicConfig(level=logging.WARNING, format=f"%(asctime)s ingest[{os.getpid()}] %(message)s")
    from fleet_server.store import make_engine

    engine = make_engine(settings, migrate=False)
    # Thousands of short-lived objects per flush (decoded batches, rows): with the default
    # thresholds the collector rescans every module-level object over and over (~25% of the
    # store thread's CPU, measured). Everything alive now lives as long as the process.
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)
    counters = Counters()
    persistent = settings.mqtt_client_id is not None
    filters = stream_filters(settings, channels)
    stale = stale_filters(settings, channels) if persistent else []
    leaving = threading.Event()  # set once stopping: a reconnect must not subscribe again
    # one consumer per broker shard, all in the replica's $share group there
    consumers = [
        _Consumer(settings, client_id, persistent, name, where, engine, counters, filters, stale, leaving)
        for name, where in shard_endpoints(settings).items()
    ]
    for consumer in consumers:
        consumer.start()
    done = threading.Event()

    def report() -> None:
        last: dict[str, Any] = {}
        while True:
            state = {
                "counters": counters.snapshot(),
                "subscribed": all(c.subscribed.is_set() for c in consumers),
                "connected": all(c.client.is_connected() for c in consumers),
                "backlog": sum(c.pipeline.backlog for c in consumers),
                # whole seconds: a report a second at most while storing
                "lag": int(max(c.pipeline.lag for c in consumers)),
                "probes": {c.shard: c.probe for c in consumers},  # the server measures the lag with them
            }
            if state != last:
                try:
                    conn.send(state)
                except OSError:
                    return
                last = state
            if done.wait(REPORT_INTERVAL):
                with contextlib.suppress(OSError):
                    backlog = sum(c.pipeline.backlog for c in consumers)
                    conn.send({**state, "counters": counters.snapshot(), "backlog": backlog})
                return

    reporter = threading.Thread(target=report, name="ef-ingest-report", daemon=True)
    reporter.start()
    discard = False
    try:
        msg = conn.recv()  # blocks until the server says stop, or EOF: the server is gone
        discard = bool(msg.get("discard_backlog")) if isinstance(msg, dict) else False
    except (EOFError, OSError):
        discard = False  # the server is gone (killed): hand the stream over to the other members
    leaving.set()
    # Store and acknowledge what was received. A clean session leaves its $share group first: its
    # unacknowledged messages end with it. A persistent session stays subscribed: the broker keeps
    # what it did not acknowledge and queues the rest for it until the worker is back.
    for consumer in consumers:
        consumer.subscribed.clear()
        leave(consumer.client, consumer.pipeline, [] if persistent else consumer.filters, discard)
        consumer.client.disconnect()  # after the PUBACKs: paho sends queued packets in order
        consumer.client.loop_stop()
    done.set()
    reporter.join(2)
    engine.dispose()


class _Consumer:
    """A worker's client on one broker shard, with its own store thread (acknowledgements go back
    on the connection the message came in on)."""

    def __init__(
        self,
        settings: ServerSettings,
        client_id: str,
        persistent: bool,
        shard: str,
        where: Endpoint,
        engine: Engine,
        counters: Counters,
        filters: list[str],
        stale: list[str],
        leaving: threading.Event,
    ) -> None:
        self.settings, self.persistent, self.shard, self.where = settings, persistent, shard, where
        self.stale = stale
        self.counters, self.leaving = counters, leaving
        probe = probe_topic(client_id)  # plain, not shared: this worker's own lag probes
        self.filters = [*filters, probe]
        self.client = new_client(settings, client_id, persistent, where)
        self.pipeline = pipeline_for(settings, engine, counters, self.client)
        self.probe = ""  # the last lag probe stored, reported to the server
        self.pipeline.probe_topic = probe
        self.pipeline.on_probe = self._probe_stored
        self.subscribed = threading.Event()
        self.pending: set[int] = set()
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self.pipeline.on_message

    def start(self) -> None:
        self.pipeline.start()
        connect(self.client, self.settings, self.persistent, self.where)

    def _probe_stored(self, token: str) -> None:
        self.probe = token

    def _on_connect(self, c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None) -> None:
        if rc.is_failure:
            log.error("MQTT connect to shard %s refused: %s", self.shard, rc)
            return
        if self.leaving.is_set():
            return
        if self.stale:
            c.unsubscribe(self.stale)
        result, mid = c.subscribe([(f, 1) for f in self.filters])
        if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self.pending.add(mid)

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, mid: int, rcs: list[ReasonCode], _p: Properties | None
    ) -> None:
        if any(rc.is_failure for rc in rcs):
            log.error("subscription on shard %s refused: %s", self.shard, rcs)
            return
        self.pending.discard(mid)
        if not self.pending:
            self.subscribed.set()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: Any, _f: Any, rc: ReasonCode, _p: Properties | None
    ) -> None:
        self.subscribed.clear()
        if rc.is_failure:
            self.counters.add("mqtt_disconnects")
            log.warning("MQTT disconnected from shard %s (%s); paho reconnects", self.shard, rc)


def _context() -> Any:
    if "forkserver" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("forkserver")
        # The forkserver imports this module (and with it sqlalchemy, pydantic, paho) once;
        # a no-op once the forkserver runs.
        ctx.set_forkserver_preload([__name__])
        return ctx
    return multiprocessing.get_context("spawn")


class IngestWorker:
    """The server's handle on one ingest worker process (started, watched, restarted, stopped)."""

    def __init__(
        self,
        settings: ServerSettings,
        client_id: str,
        counters: Counters,
        on_change: Callable[[], None],
        channels: tuple[protocol.Channel, ...] = STREAM_CHANNELS,
        shards: tuple[str, ...] = (),
    ) -> None:
        """``shards``: the broker shards the server probes this worker's lag on
        (``fleet_server.ingest_lag``; the server publishes the probes, see ``MqttBridge``)."""
        self.settings, self.client_id, self.counters, self.channels = settings, client_id, counters, channels
        self._on_change = on_change
        self.subscribed = False
        self.connected = False
        self.backlog = 0
        self.pipeline_lag = 0.0  # as the worker reports it (Pipeline.lag: since paho read the message)
        self.probes = {name: LagProbe(probe_topic(client_id)) for name in shards}
        self._stopping = False
        self._proc: Any = None
        self._pid: int | None = None  # kept: a closed process handle no longer tells it
        self._conn: Connection | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._pid

    @property
    def lag(self) -> float:
        """Seconds a message reaching the broker now waits before this worker has stored it: the
        probes' figure (the broker's queue included), or the pipeline's own if that is longer."""
        return max([self.pipeline_lag, *(p.lag for p in self.probes.values())])

    def start(self) -> None:
        ctx = _context()
        parent, child = ctx.Pipe()
        proc = ctx.Process(
            target=worker_main,
            args=(self.settings, self.client_id, self.channels, child),
            name="ef-ingest-worker",
            daemon=True,
        )
        proc.start()
        child.close()
        self._proc, self._conn, self._pid = proc, parent, proc.pid
        self._reader = threading.Thread(
            target=self._read, args=(parent,), name="ef-ingest-watch", daemon=True
        )
        self._reader.start()

    def stop(self, discard_backlog: bool = False, timeout: float = 15.0) -> None:
        self._stopping = True
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.send({"stop": True, "discard_backlog": discard_backlog})
        if self._proc is not None and not _closed(self._proc):
            self._proc.join(timeout)
            if self._proc.is_alive():
                log.error("ingest worker %s did not stop; terminating it", self._pid)
                self._proc.terminate()
                self._proc.join(5)
        if self._reader is not None:
            self._reader.join(5)
        _release(self._proc)

    def _read(self, conn: Connection) -> None:
        seen: dict[str, int] = {}
        while True:
            try:
                state = conn.recv()
            except (EOFError, OSError):
                break
            for name, value in state["counters"].items():
                delta = value - seen.get(name, 0)
                if delta:
                    self.counters.add(name, delta)
                seen[name] = value
            self.subscribed, self.connected, self.backlog = (
                state["subscribed"],
                state["connected"],
                state["backlog"],
            )
            self.pipeline_lag = float(state.get("lag", 0.0))
            for shard, token in (state.get("probes") or {}).items():
                if token and shard in self.probes:
                    self.probes[shard].stored(token)
            if not self.subscribed:  # (re)connecting: a probe queued for a clean session is gone
                for probe in self.probes.values():
                    probe.reset()
            self._on_change()
        conn.close()
        self.subscribed = self.connected = False
        self.backlog = 0
        for probe in self.probes.values():
            probe.reset()
        self._on_change()
        if not self._stopping:
            if self._proc is not None:
                self._proc.join(2)
            code = self._proc.exitcode if self._proc is not None else None
            log.error("ingest worker %s died (exit code %s); restarting it", self.pid, code)
            _release(self._proc)
            time.sleep(1.0)
            if not self._stopping:
                self.start()


def _closed(proc: Any) -> bool:
    """The handle was released already: the worker ended (killed with its process group, say) and
    the watcher closed it, or stop() runs a second time."""
    try:
        proc.is_alive()
    except ValueError:
        return True
    return False


def _release(proc: Any) -> None:
    """Close an ended worker's process handle: its pipes to the forkserver stay open until then, and
    nothing else may release them (the server's app, and with it this handle, can outlive its stop)."""
    if proc is not None and not _closed(proc) and proc.exitcode is not None:
        proc.close()
