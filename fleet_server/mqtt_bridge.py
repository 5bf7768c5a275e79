"""The server's MQTT side: ingest from devices, publish signed directives to them.

Threads: paho's network thread (``loop_start``) only enqueues raw messages; one
ingest worker drains the queue and stores batches with its own sessions. So no
SQLAlchemy session is ever shared with request handlers or the ticker, and a
slow database never stalls keepalives. paho reconnects by itself and the
subscriptions are renewed in ``on_connect``.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from sqlalchemy import Engine

from device_agent import protocol
from fleet_server.counters import Counters
from fleet_server.ingest import Inbound, ingest_batch
from fleet_server.settings import ServerSettings

log = logging.getLogger(__name__)

# Retained snapshots: every replica subscribes with a plain wildcard, because MQTT 5
# shared subscriptions never deliver retained messages, and a restarted server must
# learn each device's last reported state and status at once. Storing a snapshot is
# an idempotent upsert, so several replicas receiving it is harmless.
SNAPSHOT_CHANNELS = (protocol.Channel.REPORTED, protocol.Channel.STATUS)
# Streams: split across replicas with $share when the broker supports it.
STREAM_CHANNELS = (protocol.Channel.EVENTS, protocol.Channel.TELEMETRY)
INBOUND_CHANNELS = SNAPSHOT_CHANNELS + STREAM_CHANNELS
MAX_BATCH = 500


class MqttBridge:
    def __init__(self, settings: ServerSettings, engine: Engine, counters: Counters) -> None:
        self.settings = settings
        self.engine = engine
        self.counters = counters
        self.subscribed = threading.Event()  # set once every channel's SUBACK arrived
        self._queue: queue.Queue[Inbound | None] = queue.Queue()
        self._pending_subs: set[int] = set()
        self._worker: threading.Thread | None = None
        self._idle = threading.Event()
        self._idle.set()
        v5 = settings.mqtt_version == 5
        self.persistent = settings.mqtt_client_id is not None
        self.client_id = settings.mqtt_client_id or f"ef-server-{uuid.uuid4().hex[:12]}"
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
            clean_session=None if v5 else not self.persistent,
        )
        self.client.reconnect_delay_set(min_delay=1, max_delay=10)
        self.client.max_queued_messages_set(0)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.client.on_disconnect = self._on_disconnect

    def start(self) -> None:
        self._worker = threading.Thread(target=self._ingest_loop, name="ef-ingest", daemon=True)
        self._worker.start()
        props: Properties | None = None
        if self.settings.mqtt_version == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.settings.mqtt_session_expiry if self.persistent else 0
        self.client.connect_async(
            self.settings.mqtt_host,
            self.settings.mqtt_port,
            keepalive=30,
            clean_start=not self.persistent
            if self.settings.mqtt_version == 5
            else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
            properties=props,
        )
        self.client.loop_start()

    def stop(self, discard_backlog: bool = False) -> None:
        """Disconnect; the worker stores what was received unless ``discard_backlog`` (benchmarks)."""
        self.client.disconnect()
        self.client.loop_stop()
        if discard_backlog:
            with self._queue.mutex:
                self._queue.queue.clear()
        self._queue.put(None)
        if self._worker is not None:
            self._worker.join(10)

    @property
    def backlog(self) -> int:
        """Messages received but not stored yet."""
        return self._queue.qsize()

    @property
    def connected(self) -> bool:
        return self.client.is_connected()

    def publish_desired(self, device_id: str, payload: bytes) -> None:
        """Publish a signed directive, retained QoS 1 (paho queues it while disconnected)."""
        info = self.client.publish(
            protocol.topic(device_id, protocol.Channel.DESIRED), payload, qos=1, retain=True
        )
        if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
            log.error("publishing the directive for %s failed: rc=%s", device_id, info.rc)
        self.counters.add("directives_published")

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """For tests: wait until every message received so far has been stored."""
        return self._idle.wait(timeout) and self._queue.empty()

    # paho callbacks (network thread): keep them short.
    def _on_connect(
        self, client: mqtt.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Properties | None
    ) -> None:
        if rc.is_failure:
            log.error("MQTT connect refused: %s", rc)
            return
        filters = [protocol.wildcard(ch) for ch in SNAPSHOT_CHANNELS] + [
            protocol.shared_subscription(ch) if self.settings.shared_subscriptions else protocol.wildcard(ch)
            for ch in STREAM_CHANNELS
        ]
        result, mid = client.subscribe([(f, 1) for f in filters])
        if result == mqtt.MQTT_ERR_SUCCESS and mid is not None:
            self._pending_subs.add(mid)
        log.info(
            "MQTT connected to %s:%s, subscribing %s",
            self.settings.mqtt_host,
            self.settings.mqtt_port,
            filters,
        )

    def _on_subscribe(
        self, _c: mqtt.Client, _ud: Any, mid: int, rcs: list[ReasonCode], _props: Properties | None
    ) -> None:
        bad = [rc for rc in rcs if rc.is_failure]
        if bad:
            log.error("subscription refused: %s", bad)
            return
        self._pending_subs.discard(mid)
        if not self._pending_subs:
            self.subscribed.set()

    def _on_disconnect(
        self, _c: mqtt.Client, _ud: Any, _flags: Any, rc: ReasonCode, _props: Properties | None
    ) -> None:
        self.subscribed.clear()
        if rc.is_failure:
            log.warning("MQTT disconnected (%s); paho reconnects", rc)

    def _on_message(self, _c: mqtt.Client, _ud: Any, msg: mqtt.MQTTMessage) -> None:
        self._idle.clear()
        self._queue.put(Inbound(msg.topic, bytes(msg.payload)))

    # ingest worker
    def _ingest_loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            stop = False
            while len(batch) < MAX_BATCH:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    stop = True
                    break
                batch.append(nxt)
            try:
                ingest_batch(self.engine, batch, self.counters)
            except Exception:  # never let one bad batch kill ingest
                log.exception("ingest of %d messages failed", len(batch))
            if self._queue.empty():
                self._idle.set()
            if stop:
                return
