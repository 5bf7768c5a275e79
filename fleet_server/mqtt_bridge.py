"""The server's MQTT side: ingest from devices, publish signed directives to them.

Processes and threads (docs/rollouts.md, "Ingest"):

- the main client (paho's network thread, ``loop_start``) publishes directives
  and receives the retained snapshots (reported, status); its ``on_message``
  only enqueues, and a store thread (``ingest_worker.Pipeline``) stores them
  in flushes with its own sessions, acknowledging each message after commit;
  it also watches the retained directives (``desired``) for the reconciler
  (``fleet_server.reconciler``), which judges every live reported snapshot
  once stored and republishes the directive of a device that drifted;
- the streams go to separate processes (``ingest_worker.IngestWorker``), each
  with its own client in the ``$share`` group, its own pipeline and engine:
  telemetry to ``settings.ingest_workers`` of them, events to one more, so
  events never queue at the broker behind a telemetry backlog (the engine
  moves devices on from their events); with ``ingest_workers=0`` the main
  client takes both streams too (one queue: for tests and small setups).

- a thread publishes each worker's lag probes (``fleet_server.ingest_lag``): how
  far behind ingest is, the broker's queue for the workers included
  (``ingest_lag``, the ``edgefleet_ingest_lag_seconds`` metric, ``/readyz``;
  per stream ``stream_lag``, ``edgefleet_ingest_stream_lag_seconds``).

So no SQLAlchemy session is ever shared with request handlers or the ticker,
and a slow database never stalls keepalives. paho reconnects by itself and the
subscriptions are renewed in ``on_connect``. Every connection has its own
client id under the reserved ``fleet-server`` prefix (``mqtt_identity``) and
reaches the broker as ``mqtt_client.endpoint`` says (TLS, the server's
certificate or password).

Shards (``fleet_server.shards``): with several brokers, the main client, its
store thread and every ingest worker's client exist once per shard, each
connecting, subscribing and reconnecting on its own (a shard that is down holds
up nothing on the others), with the same client ids (ids are per broker). A
directive goes to the shard on its device's record; paho queues it while that
shard is away and sends it when it is back. A broker that lost retained
directives (killed before it saved them) is made whole by the reconciler: the
device reports a seq below the one published and gets its directive again;
and when a shard comes back, the retained directives it no longer holds are put
back at once (``ShardLink`` marks the end of the retained burst with a probe,
``Reconciler.restore_missing``), so a device offline meanwhile finds its
directive waiting.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import Engine

from device_agent import protocol
from fleet_server import reconcile
from fleet_server.counters import Counters
from fleet_server.ingest_lag import token
from fleet_server.ingest_worker import (
    EVENTS_ONLY,
    STREAM_CHANNELS,
    TELEMETRY_ONLY,
    IngestWorker,
    Pipeline,
    leave,
    pipeline_for,
    stream_filters,
)
from fleet_server.mqtt_client import Endpoint, connect, new_client, release, shard_endpoints
from fleet_server.mqtt_identity import (
    SERVER_ACCOUNT,
    events_client_id,
    is_reserved,
    server_client_id,
    worker_client_id,
)
from fleet_server.reconciler import Reconciler
from fleet_server.settings import ServerSettings
from fleet_server.shard_router import ShardRouter
from signing.keys import PublicKey

log = logging.getLogger(__name__)

# Retained snapshots: every replica subscribes with a plain wildcard, because MQTT 5
# shared subscriptions never deliver retained messages, and a restarted server must
# learn each device's last reported state and status at once. Storing a snapshot is
# an idempotent upsert, so several replicas receiving it is harmless.
SNAPSHOT_CHANNELS = (protocol.Channel.REPORTED, protocol.Channel.STATUS)
INBOUND_CHANNELS = SNAPSHOT_CHANNELS + STREAM_CHANNELS
DESIRED_SUFFIX = f"/{protocol.Channel.DESIRED.value}"
PROBE_TICK = 0.25  # seconds between checks for a lag probe due (ingest_lag.PROBE_INTERVAL paces them)


class ShardLink:
    """The main client on one shard: its connection, its store thread, its subscription state."""

    def __init__(
        self, bridge: MqttBridge, name: str, where: Endpoint, settings: ServerSettings, engine: Engine
    ) -> None:
        self.bridge, self.name, self.endpoint = bridge, name, where
        self.subscribed = False
        self.pending_subs: set[int] = set()
        self.connects = 0
        self.sweep_since: float | None = None  # a reconnect: directives seen again since then are there
        # Published (not retained) after the SUBACK: the broker delivers it after every retained
        # directive it still holds, so its arrival ends the burst. Under the server's reserved
        # prefix, so it is never a device's topic; each replica its own.
        tag = hashlib.blake2b(bridge.client_id.encode(), digest_size=8).hexdigest()
        self.probe_topic = protocol.topic(f"{SERVER_ACCOUNT}-sweep-{tag}", protocol.Channel.DESIRED)
        self.client = new_client(settings, bridge.client_id, bridge.persistent, where)
        self.pipeline: Pipeline = pipeline_for(settings, engine, bridge.counters, self.client)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    # paho callbacks (this shard's network thread): keep them short.
    def _on_message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        """Directives (ours, echoed, or deleted) to the reconciler; everything else to the pipeline."""
        if m.topic.endswith(DESIRED_SUFFIX):
            try:
                if m.topic == self.probe_topic:
                    self._swept()
                    return
                device_id, _ = protocol.parse_topic(m.topic)
                if is_reserved(device_id):  # another replica's probe
                    return
                self.bridge.reconciler.on_desired(device_id, bytes(m.payload))
            except protocol.ProtocolError:
                self.bridge.counters.add("malformed_messages")
            except Exception:  # paho's network thread must survive whatever is on the broker
                log.exception("handling a directive on %s failed", m.topic)
            finally:
                if m.qos:
                    client.ack(m.mid, m.qos)
            return
        self.pipeline.on_message(client, userdata, m)

    def _on_connect(
        self, client: mqtt.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Properties | None
    ) -> None:
        if rc.is_failure:
            log.error("MQTT connect to shard %s refused: %s", self.name, rc)
            return
        bridge = self.bridge
        if bridge._stopping:
            return
        self.connects += 1
        self.sweep_since = bridge.reconciler.clock() if self.connects > 1 else None
        filters = [protocol.wildcard(ch) for ch in (*SNAPSHOT_CHANNELS, protocol.Channel.DESIRED)]
        if not bridge.workers:
            filters += stream_filters(bridge.settings)
        elif bridge.persistent:
            # a session from a version where this client took the streams itself
            client.unsubscribe(stream_filters(bridge.settings))
        result, mid = client.subscribe([(f, 1) for f in filters])
        if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self.pending_subs.add(mid)
        log.info(
            "MQTT connected to %s (shard %s) as %s, subscribing %s",
            self.endpoint.url, self.name, bridge.client_id, filters,
        )  # fmt: skip

    def _on_subscribe(
        self, _c: mqtt.Client, _ud: Any, mid: int, rcs: list[ReasonCode], _props: Properties | None
    ) -> None:
        bad = [rc for rc in rcs if rc.is_failure]
        if bad:
            log.error("subscription on shard %s refused: %s", self.name, bad)
            return
        self.pending_subs.discard(mid)
        if not self.pending_subs:
            self.subscribed = True
            self.bridge._update_subscribed()
            if self.sweep_since is not None:
                self.client.publish(self.probe_topic, b"", qos=1, retain=False)

    def _swept(self) -> None:
        """The retained burst after a reconnect is over: restore what this shard no longer holds
        (off paho's thread: finding each device's shard may read the database)."""
        since, self.sweep_since = self.sweep_since, None
        if since is None:
            return

        def sweep() -> None:
            try:
                router = self.bridge.router
                missing = self.bridge.reconciler.restore_missing(
                    since, lambda d: router.shard_of(d) == self.name
                )
                if missing:
                    log.warning("shard %s came back without %d retained directives", self.name, len(missing))
            except Exception:  # a sweep that fails leaves the reconciler's drift checks to it
                log.exception("restoring the directives shard %s lost failed", self.name)

        threading.Thread(target=sweep, name=f"ef-sweep-{self.name}", daemon=True).start()

    def _on_disconnect(
        self, _c: mqtt.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Properties | None
    ) -> None:
        self.subscribed = False
        self.bridge._update_subscribed()
        if rc.is_failure:
            self.bridge.counters.add("mqtt_disconnects")
            log.warning("MQTT disconnected from shard %s (%s); paho reconnects", self.name, rc)


class MqttBridge:
    def __init__(
        self,
        settings: ServerSettings,
        engine: Engine,
        counters: Counters,
        fleet_keys: Mapping[str, PublicKey] | None = None,
    ) -> None:
        """``fleet_keys``: the keys a directive found on the broker must be signed by before the
        reconciler would ever restore it (None: believe the broker, e.g. benchmarks)."""
        self.settings = settings
        self.engine = engine
        self.counters = counters
        self.subscribed = threading.Event()  # set once every channel's SUBACK arrived (workers' too)
        self._stopping = False  # a reconnect while stopping must not subscribe again
        self.endpoints = shard_endpoints(settings)
        self.persistent = settings.mqtt_client_id is not None
        self.client_id = server_client_id(settings.mqtt_client_id)
        policy = reconcile.Policy(settings.reconcile_grace_seconds, settings.reconcile_interval_seconds)
        self.reconciler = Reconciler(self._publish, counters, policy, fleet_keys)
        self.links = {
            name: ShardLink(self, name, where, settings, engine) for name, where in self.endpoints.items()
        }
        for link in self.links.values():
            link.pipeline.on_reported = self.reconciler.observe
        self.router = ShardRouter(engine, list(self.links))
        first = next(iter(self.links.values()))
        # the first shard's, for callers that know of one broker only (tests, /api/v1/server)
        self.endpoint, self.client, self.pipeline = first.endpoint, first.client, first.pipeline
        # Without $share every telemetry worker would get every message: then one at most.
        n = settings.ingest_workers if settings.shared_subscriptions else min(settings.ingest_workers, 1)
        if n < settings.ingest_workers:
            log.info(
                "shared subscriptions off: %d telemetry worker of the %d configured (only a $share group "
                "splits the stream between several)", n, settings.ingest_workers,
            )  # fmt: skip
        shards, notify = tuple(self.links), self._update_subscribed
        self.telemetry_workers = [
            IngestWorker(
                settings, worker_client_id(self.client_id, i), counters, notify, TELEMETRY_ONLY, shards
            )
            for i in range(max(n, 0))
        ]
        # Events have a worker of their own (ingest_worker's docstring says why), one per replica:
        # a device's events stay in order within the replica.
        self.events_worker = (
            IngestWorker(settings, events_client_id(self.client_id), counters, notify, EVENTS_ONLY, shards)
            if self.telemetry_workers
            else None
        )
        self.workers = [*self.telemetry_workers, *([self.events_worker] if self.events_worker else [])]
        self._probing = threading.Event()  # set: stop probing
        self._prober = threading.Thread(target=self._probe_lag, name="ef-ingest-lag", daemon=True)

    def start(self, is_leader: Callable[[], bool] | None = None) -> None:
        """``is_leader``: whether this replica drives the engine (only the leader republishes)."""
        if is_leader is not None:
            self.reconciler.is_leader = is_leader
        for w in self.workers:
            w.start()
        for link in self.links.values():
            link.pipeline.start()
        self.reconciler.start()
        for link in self.links.values():
            connect(link.client, self.settings, self.persistent, link.endpoint)
        if self.workers:
            self._prober.start()

    def stop(self, discard_backlog: bool = False) -> None:
        """Stop the workers, store (and acknowledge) what was received unless ``discard_backlog``
        (benchmarks), then disconnect. Stream consumers leave their ``$share`` group before they stop
        storing (``ingest_worker.leave``), so what the broker sends meanwhile goes to other replicas."""
        self._stopping = True
        self._probing.set()
        if self._prober.is_alive():
            self._prober.join(5)
        self.reconciler.stop()
        for w in self.workers:
            w.stop(discard_backlog)
        # Snapshots are retained (the next subscriber gets them again), and a persistent session keeps
        # its subscriptions: the broker queues the streams for it until it is back (so it must not leave).
        streams = [] if self.workers or self.persistent else stream_filters(self.settings)
        for link in self.links.values():
            leave(link.client, link.pipeline, streams, discard_backlog)
            link.client.disconnect()
            link.client.loop_stop()
            release(link.client)

    @property
    def backlog(self) -> int:
        """Messages received but not stored yet (this process and its workers)."""
        return sum(link.pipeline.backlog for link in self.links.values()) + sum(
            w.backlog for w in self.workers
        )

    def _probe_lag(self) -> None:
        """Publish each worker's lag probes (``fleet_server.ingest_lag``): on every shard, one at a
        time, while the worker is subscribed and this shard's main client connected."""
        while not self._probing.wait(PROBE_TICK):
            for w in self.workers:
                if not w.subscribed:
                    continue
                for shard, probe in w.probes.items():
                    link = self.links.get(shard)
                    if link is None or not probe.due() or not link.client.is_connected():
                        continue
                    sent = token(time.time())
                    # On its way before it is published: on a busy machine the worker can store it
                    # and report it before this thread runs again, and a report of a probe not yet
                    # on its way would be ignored (the lag would then grow until a successor).
                    probe.sent(sent)
                    try:
                        info = link.client.publish(probe.topic, sent.encode(), qos=1, retain=False)
                    except Exception:  # a failed probe is retried on the next tick; the thread goes on
                        log.exception("publishing a lag probe on shard %s failed", shard)
                        probe.forget(sent)
                        continue
                    if info.rc != mqtt.MQTT_ERR_SUCCESS:
                        probe.forget(sent)

    @property
    def ingest_lag(self) -> float:
        """Seconds a message reaching the broker now waits before it is stored (this process and its
        workers; the workers' figure includes what waits in the broker's queue for them)."""
        return max([*(link.pipeline.lag for link in self.links.values()), *(w.lag for w in self.workers)])

    def stream_lag(self) -> dict[str, float]:
        """``ingest_lag`` per stream: the events worker's and the telemetry workers' (empty when the
        main client takes the streams itself, ``ingest_workers=0``)."""
        if self.events_worker is None:
            return {}
        return {
            protocol.Channel.EVENTS.value: self.events_worker.lag,
            protocol.Channel.TELEMETRY.value: max(w.lag for w in self.telemetry_workers),
        }

    @property
    def connected(self) -> bool:
        """Connected to every shard (and so is every worker)."""
        return all(link.client.is_connected() for link in self.links.values()) and all(
            w.connected for w in self.workers
        )

    def shard_connected(self) -> dict[str, bool]:
        """Per shard: is the main client connected to it."""
        return {name: link.client.is_connected() for name, link in self.links.items()}

    def publish_desired(self, device_id: str, payload: bytes) -> None:
        """Publish a signed directive, retained QoS 1 (paho queues it while disconnected)."""
        self.reconciler.published(device_id, payload)
        self._publish(device_id, payload)
        self.counters.add("directives_published")

    def _publish(self, device_id: str, payload: bytes) -> None:
        """On the device's shard: the one on its record, never another (its agent listens there only)."""
        shard = self.router.shard_of(device_id)
        link = self.links.get(shard) if shard is not None else None
        if link is None:
            self.counters.add("directives_unroutable")
            log.error(
                "no connection to shard %r of %s (not in the shards file): directive not published",
                shard, device_id,
            )  # fmt: skip
            return
        info = link.client.publish(
            protocol.topic(device_id, protocol.Channel.DESIRED), payload, qos=1, retain=True
        )
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("publishing the directive for %s on shard %s failed: rc=%s", device_id, shard, info.rc)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """For tests: wait until every message received so far has been stored."""
        deadline = time.monotonic() + timeout
        while self.backlog:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _update_subscribed(self) -> None:
        if all(link.subscribed for link in self.links.values()) and all(w.subscribed for w in self.workers):
            self.subscribed.set()
        else:
            self.subscribed.clear()
