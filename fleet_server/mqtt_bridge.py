"""The server's MQTT side: ingest from devices, publish signed directives to them.

Processes and threads (docs/rollouts.md, "Ingest"):

- the main client (paho's network thread, ``loop_start``) publishes directives
  and receives the retained snapshots (reported, status); its ``on_message``
  only enqueues, and a store thread (``ingest_worker.Pipeline``) stores them
  in flushes with its own sessions, acknowledging each message after commit;
  it also watches the retained directives (``desired``) for the reconciler
  (``fleet_server.reconciler``), which judges every live reported snapshot
  once stored and republishes the directive of a device that drifted;
- the streams (events, telemetry) go to ``settings.ingest_workers`` separate
  processes (``ingest_worker.IngestWorker``), each with its own client in the
  ``$share`` group, its own pipeline and engine; with ``ingest_workers=0``
  the main client takes them too.

So no SQLAlchemy session is ever shared with request handlers or the ticker,
and a slow database never stalls keepalives. paho reconnects by itself and the
subscriptions are renewed in ``on_connect``. Every connection has its own
client id under the reserved ``fleet-server`` prefix (``mqtt_identity``) and
reaches the broker as ``mqtt_client.endpoint`` says (TLS, the server's
certificate or password).
"""

from __future__ import annotations

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
from fleet_server.ingest_worker import (
    STREAM_CHANNELS,
    IngestWorker,
    leave,
    pipeline_for,
    stream_filters,
    worker_channels,
)
from fleet_server.mqtt_client import connect, endpoint, new_client, release
from fleet_server.mqtt_identity import server_client_id, worker_client_id
from fleet_server.reconciler import Reconciler
from fleet_server.settings import ServerSettings
from signing.keys import PublicKey

log = logging.getLogger(__name__)

# Retained snapshots: every replica subscribes with a plain wildcard, because MQTT 5
# shared subscriptions never deliver retained messages, and a restarted server must
# learn each device's last reported state and status at once. Storing a snapshot is
# an idempotent upsert, so several replicas receiving it is harmless.
SNAPSHOT_CHANNELS = (protocol.Channel.REPORTED, protocol.Channel.STATUS)
INBOUND_CHANNELS = SNAPSHOT_CHANNELS + STREAM_CHANNELS
DESIRED_SUFFIX = f"/{protocol.Channel.DESIRED.value}"


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
        self._own_subscribed = False
        self._stopping = False  # a reconnect while stopping must not subscribe again
        self._pending_subs: set[int] = set()
        self.endpoint = endpoint(settings)
        self.persistent = settings.mqtt_client_id is not None
        self.client_id = server_client_id(settings.mqtt_client_id)
        self.client = new_client(settings, self.client_id, self.persistent, self.endpoint)
        # Without $share every worker would get every message: then one worker at most.
        n = settings.ingest_workers if settings.shared_subscriptions else min(settings.ingest_workers, 1)
        self.workers = [
            IngestWorker(
                settings,
                worker_client_id(self.client_id, i),
                counters,
                self._update_subscribed,
                worker_channels(i),
            )
            for i in range(max(n, 0))
        ]
        self.pipeline = pipeline_for(settings, engine, counters, self.client)
        policy = reconcile.Policy(settings.reconcile_grace_seconds, settings.reconcile_interval_seconds)
        self.reconciler = Reconciler(self._publish, counters, policy, fleet_keys)
        self.pipeline.on_reported = self.reconciler.observe
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def start(self, is_leader: Callable[[], bool] | None = None) -> None:
        """``is_leader``: whether this replica drives the engine (only the leader republishes)."""
        if is_leader is not None:
            self.reconciler.is_leader = is_leader
        for w in self.workers:
            w.start()
        self.pipeline.start()
        self.reconciler.start()
        connect(self.client, self.settings, self.persistent, self.endpoint)

    def stop(self, discard_backlog: bool = False) -> None:
        """Stop the workers, store (and acknowledge) what was received unless ``discard_backlog``
        (benchmarks), then disconnect. Stream consumers leave their ``$share`` group before they stop
        storing (``ingest_worker.leave``), so what the broker sends meanwhile goes to other replicas."""
        self._stopping = True
        self.reconciler.stop()
        for w in self.workers:
            w.stop(discard_backlog)
        # Snapshots are retained (the next subscriber gets them again), and a persistent session keeps
        # its subscriptions: the broker queues the streams for it until it is back (so it must not leave).
        streams = [] if self.workers or self.persistent else stream_filters(self.settings)
        leave(self.client, self.pipeline, streams, discard_backlog)
        self.client.disconnect()
        self.client.loop_stop()
        release(self.client)

    @property
    def backlog(self) -> int:
        """Messages received but not stored yet (this process and its workers)."""
        return self.pipeline.backlog + sum(w.backlog for w in self.workers)

    @property
    def ingest_lag(self) -> float:
        """Seconds the oldest message being stored has waited (this process and its workers)."""
        return max([self.pipeline.lag, *(w.lag for w in self.workers)])

    @property
    def connected(self) -> bool:
        return self.client.is_connected() and all(w.connected for w in self.workers)

    def publish_desired(self, device_id: str, payload: bytes) -> None:
        """Publish a signed directive, retained QoS 1 (paho queues it while disconnected)."""
        self.reconciler.published(device_id, payload)
        self._publish(device_id, payload)
        self.counters.add("directives_published")

    def _publish(self, device_id: str, payload: bytes) -> None:
        info = self.client.publish(
            protocol.topic(device_id, protocol.Channel.DESIRED), payload, qos=1, retain=True
        )
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("publishing the directive for %s failed: rc=%s", device_id, info.rc)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """For tests: wait until every message received so far has been stored."""
        deadline = time.monotonic() + timeout
        while self.backlog:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def _update_subscribed(self) -> None:
        if self._own_subscribed and all(w.subscribed for w in self.workers):
            self.subscribed.set()
        else:
            self.subscribed.clear()

    # paho callbacks (network thread): keep them short.
    def _on_message(self, client: mqtt.Client, userdata: Any, m: mqtt.MQTTMessage) -> None:
        """Directives (ours, echoed, or deleted) to the reconciler; everything else to the pipeline."""
        if m.topic.endswith(DESIRED_SUFFIX):
            try:
                device_id, _ = protocol.parse_topic(m.topic)
                self.reconciler.on_desired(device_id, bytes(m.payload))
            except protocol.ProtocolError:
                self.counters.add("malformed_messages")
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
            log.error("MQTT connect refused: %s", rc)
            return
        if self._stopping:
            return
        filters = [protocol.wildcard(ch) for ch in (*SNAPSHOT_CHANNELS, protocol.Channel.DESIRED)]
        if not self.workers:
            filters += stream_filters(self.settings)
        elif self.persistent:
            # a session from a version where this client took the streams itself
            client.unsubscribe(stream_filters(self.settings))
        result, mid = client.subscribe([(f, 1) for f in filters])
        if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._pending_subs.add(mid)
        log.info("MQTT connected to %s as %s, subscribing %s", self.endpoint.url, self.client_id, filters)

    def _on_subscribe(
        self, _c: mqtt.Client, _ud: Any, mid: int, rcs: list[ReasonCode], _props: Properties | None
    ) -> None:
        bad = [rc for rc in rcs if rc.is_failure]
        if bad:
            log.error("subscription refused: %s", bad)
            return
        self._pending_subs.discard(mid)
        if not self._pending_subs:
            self._own_subscribed = True
            self._update_subscribed()

    def _on_disconnect(
        self, _c: mqtt.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Properties | None
    ) -> None:
        self._own_subscribed = False
        self._update_subscribed()
        if rc.is_failure:
            self.counters.add("mqtt_disconnects")
            log.warning("MQTT disconnected (%s); paho reconnects", rc)
