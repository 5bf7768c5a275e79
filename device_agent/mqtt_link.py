"""One device's MQTT connection, driven by an asyncio loop (no paho thread).

paho's documented asyncio pattern: the loop watches the socket and calls
``loop_read``/``loop_write``; a periodic timer calls ``loop_misc`` for
keepalive pings and timeouts. ``loop_start()`` per device is never used: paho's
thread uses select() and breaks near ~340 clients, while this lets hundreds of
devices share one loop (the simulator). Every paho callback therefore runs on
the loop thread, so the link and the agent need no locks for MQTT state. The one
blocking call, ``connect`` (TCP connect and TLS handshake), runs in a thread;
the socket callbacks paho makes from inside it are handed to the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import threading
from collections.abc import Callable
from datetime import datetime
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from device_agent import wire as protocol
from device_agent.mqtt_security import MqttSecurity
from device_agent.ports import ConnectHandler, MessageHandler

log = logging.getLogger(__name__)

# s between loop_misc calls: a tenth of the keepalive, within these bounds. paho sends PINGREQ once
# nothing went out or came in for ``keepalive`` s, so the ping leaves at most a tenth late, while the
# broker waits 1.5 x keepalive before it drops a silent client; checking every second whatever the
# keepalive was the largest per-device timer of a simulated fleet (30 s keepalive: 30 checks per ping).
MISC_INTERVAL_MIN, MISC_INTERVAL_MAX = 0.1, 3.0


def misc_interval(keepalive: float) -> float:
    """How often the link lets paho check its keepalive (see ``MISC_INTERVAL_MIN``)."""
    return min(MISC_INTERVAL_MAX, max(MISC_INTERVAL_MIN, keepalive / 10))


BACKOFF_BASE = 0.5
BACKOFF_CAP = 30.0


def backoff_delay(attempt: int, base: float = BACKOFF_BASE, cap: float = BACKOFF_CAP) -> float:
    """Exponential backoff with full jitter: uniform(0, min(cap, base * 2**attempt)).

    Full jitter spreads a fleet that lost its broker at the same instant, so the
    broker is not hit by every device again at the same instant.
    """
    return random.uniform(0.0, min(cap, base * (2 ** min(attempt, 20))))


class MqttLink:
    """A paho client bound to an asyncio loop: connect, subscribe to ``desired``, publish with a window.

    The agent's default :class:`device_agent.ports.Link`. Publishes happen only
    while connected; callers keep what must survive a disconnect (the agent
    re-publishes Reported on every connect, telemetry queues its batches).
    """

    def __init__(
        self,
        device_id: str,
        host: str,
        port: int,
        *,
        mqtt_version: int = 5,
        keepalive: int = 30,
        session_expiry: int = 3600,
        max_inflight: int = 20,
        security: MqttSecurity | None = None,
        now: Callable[[], datetime] = protocol.utcnow,
    ) -> None:
        self.device_id = device_id
        self.now = now  # the device's wall clock (skewable): dates the Status messages
        self.host = host
        self.port = port
        self.mqtt_version = mqtt_version
        self.keepalive = keepalive
        self._misc_interval = misc_interval(keepalive)
        self.session_expiry = session_expiry
        self.max_inflight = max_inflight
        self._on_message_cb: MessageHandler | None = None
        self._on_connected_cb: ConnectHandler | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._misc_timer: asyncio.TimerHandle | None = None
        self._reconnect_task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._window = asyncio.Event()
        self._window.set()
        self._inflight: set[int] = set()
        self._acks: dict[int, asyncio.Future[bool]] = {}
        self._stopping = False
        self._sock: Any = None
        self._writer: Any = None  # the socket the loop watches for writability (it was full)
        self._flush_for: Any = None  # the socket a write is scheduled for on the loop's next pass
        self._flushing: Any = None  # the socket being written now (paho's callbacks come from inside)
        self._loop_thread = 0  # the loop's thread: paho's socket callbacks may come from a connect thread
        # Sessions the broker granted after the first: counted in the CONNACK handler, so a
        # caller that sees ``connected`` again also sees the count that says it reconnected.
        self.reconnects = 0
        self._sessions = 0
        self.publish_failures = 0
        # Attempts that ended without a session: no TCP/TLS connection, a CONNACK refusing us, or
        # the broker closing the connection before its CONNACK (a TLS listener fed plaintext).
        self.connect_failures = 0
        self.last_connect_failure: str | None = None
        # Set once the broker has answered: a session, or an attempt that failed (it stays set
        # through the reconnects after a failure); cleared by start() and by a session's end.
        self._answered = asyncio.Event()
        self._attempting = False  # an attempt is under way and not yet judged

        proto = MQTTProtocolVersion.MQTTv5 if mqtt_version == 5 else MQTTProtocolVersion.MQTTv311
        kwargs: dict[str, Any] = {}
        if mqtt_version != 5:
            kwargs["clean_session"] = False  # keep our subscription and queued QoS 1 while away
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=device_id, protocol=proto, **kwargs)
        (security or MqttSecurity()).apply(self.client)
        # paho's own queue must not be the bound: we bound in-flight ourselves.
        self.client.max_inflight_messages_set(max(max_inflight, 1))
        offline = protocol.Status(device_id=device_id, state="offline", ts=now())
        self.client.will_set(
            protocol.topic(device_id, protocol.Channel.STATUS), protocol.encode(offline), qos=1, retain=True
        )
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_socket_open = self._on_socket_open
        self.client.on_socket_close = self._on_socket_close
        self.client.on_socket_register_write = self._on_register_write
        self.client.on_socket_unregister_write = self._on_unregister_write

    # -- public API -------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    async def start(self, on_message: MessageHandler, on_connected: ConnectHandler | None = None) -> None:
        """Open the connection (retrying with backoff in the background if the broker is away)."""
        self._on_message_cb, self._on_connected_cb = on_message, on_connected
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._stopping = False
        self._attempting = False
        self._sessions = 0
        self._answered.clear()  # a failure before an earlier stop is not this start's answer
        try:
            await self._connect_off_loop()
        except OSError as exc:
            log.warning(
                "%s: connect to %s:%s failed (%s); retrying", self.device_id, self.host, self.port, exc
            )
            self._schedule_reconnect()

    async def wait_connected(self, timeout: float | None = None, *, until_refused: bool = False) -> bool:
        """True once connected within ``timeout``. ``until_refused``: False as soon as an attempt
        fails instead (no connection, a refusing CONNACK, the broker hanging up first), so a
        caller that only asks "does this identity get in?" learns "no" from the broker, not
        from a timeout."""
        # One awaitable, no helper tasks: a waiter abandoned when its loop closes (a process
        # stopping) must have nothing left to cancel on that loop.
        event = self._answered if until_refused else self._connected
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return self.connected

    async def stop(self) -> None:
        """Publish ``offline`` (a clean disconnect suppresses the will) and disconnect."""
        self._stopping = True
        self._stop_misc()
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        if self.connected:
            offline = protocol.Status(device_id=self.device_id, state="offline", ts=self.now())
            await self.publish(
                protocol.topic(self.device_id, protocol.Channel.STATUS),
                protocol.encode(offline),
                qos=1,
                retain=True,
                timeout=2.0,
            )
            await self.drain(timeout=2.0)
        with contextlib.suppress(Exception):
            self.client.disconnect()
        # disconnect() writes DISCONNECT and closes the socket synchronously; make sure the
        # reader/writer are gone even if paho did not call on_socket_close.
        self._drop_socket()
        self._connected.clear()

    def abort(self) -> None:
        """Drop the connection the way a power cut does: no ``offline``, no DISCONNECT, no drain.

        The TCP socket is closed under paho's feet, so the broker sees a dead
        connection and publishes the last will (``offline``, retained); unacked
        QoS 1 publishes are forgotten (their waiters get False). Synchronous, on
        the loop thread; the link is unusable afterwards.
        """
        self._stopping = True
        self._stop_misc()
        if self._reconnect_task is not None:
            self._reconnect_task.cancel()
        self._reconnect_task = None
        sock = self._sock
        with contextlib.suppress(Exception):
            sock = self.client.socket() or sock
        self._drop_socket()
        if sock is not None:
            with contextlib.suppress(Exception):
                sock.close()
        self._connected.clear()
        self._release_waiters()

    def _release_waiters(self) -> None:
        """The connection is gone: empty the publish window and answer every pending ack False.

        Unacked messages stay in paho's session and are resent on reconnect; our window
        restarts empty so a lost session can never wedge publishers.
        """
        self._inflight.clear()
        self._window.set()
        acks, self._acks = self._acks, {}
        for fut in acks.values():
            if not fut.done():
                fut.set_result(False)

    async def publish(
        self, topic: str, payload: bytes, qos: int = 1, retain: bool = False, timeout: float = 10.0
    ) -> bool:
        """Publish if connected, waiting while ``max_inflight`` QoS 1 messages are unacknowledged.

        Returns False (and counts it) when not connected or the window does not open in time.
        """
        loop_deadline = asyncio.get_running_loop().time() + timeout
        while qos > 0 and len(self._inflight) >= self.max_inflight:
            self._window.clear()
            remaining = loop_deadline - asyncio.get_running_loop().time()
            if remaining <= 0 or not self.connected:
                self.publish_failures += 1
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._window.wait(), remaining)
        if not self.connected:
            self.publish_failures += 1
            return False
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.publish_failures += 1
            return False
        if qos > 0 and not info.is_published():
            self._inflight.add(info.mid)
        return True

    async def publish_confirmed(self, topic: str, payload: bytes, timeout: float = 10.0) -> bool:
        """Publish QoS 1 and wait for the broker's PUBACK; False if it did not come (keep the data).

        Store-and-forward deletes a telemetry batch only after this returned True.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(self._inflight) >= self.max_inflight:
            self._window.clear()
            remaining = deadline - loop.time()
            if remaining <= 0 or not self.connected:
                self.publish_failures += 1
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._window.wait(), remaining)
        if not self.connected:
            self.publish_failures += 1
            return False
        fut: asyncio.Future[bool] = loop.create_future()
        info = self.client.publish(topic, payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            self.publish_failures += 1
            return False
        if info.is_published():
            return True
        self._inflight.add(info.mid)
        self._acks[info.mid] = fut
        try:
            return await asyncio.wait_for(fut, max(0.0, deadline - loop.time()))
        except TimeoutError:
            self.publish_failures += 1
            return False
        finally:
            self._acks.pop(info.mid, None)

    async def drain(self, timeout: float = 5.0) -> bool:
        """Wait until every QoS 1 publish is acknowledged (or the timeout passes)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while self._inflight and self.connected:
            if asyncio.get_running_loop().time() > deadline:
                return False
            self._window.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._window.wait(), 0.05)
        return not self._inflight

    # -- connection management ---------------------------------------------

    async def _connect_off_loop(self) -> None:
        """paho's ``connect`` opens the TCP connection and runs the TLS handshake blocking (up to
        its socket timeout when the broker is out of reach): in a thread, so the agent's loop
        (local API, inferences, telemetry) never waits for a broker. paho's socket callbacks
        reach the loop through :meth:`_on_loop`."""
        self._attempting = True
        try:
            await asyncio.to_thread(self._connect_once)
        except OSError as exc:
            self._attempt_failed(str(exc) or type(exc).__name__)
            raise

    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn`` on the agent's loop: now when called there, else as soon as the loop can.

        Once the loop is closed there is nothing left to register a socket with: paho's client,
        collected after the agent's loop ended (a process stopping on a signal), unregisters its
        sockets from whatever thread the collector runs in, and that is dropped."""
        assert self._loop is not None
        if threading.get_ident() == self._loop_thread:
            fn(*args)
        elif not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed between the check and the call
                self._loop.call_soon_threadsafe(fn, *args)

    def _connect_once(self) -> None:
        if self.mqtt_version == 5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.session_expiry
            self.client.connect(self.host, self.port, self.keepalive, clean_start=False, properties=props)
        else:
            self.client.connect(self.host, self.port, self.keepalive)

    def _schedule_reconnect(self) -> None:
        if self._stopping or self._loop is None:
            return
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = self._loop.create_task(self._reconnect_loop())

    async def _reconnect_loop(self) -> None:
        attempt = 0
        while not self._stopping and not self.connected:
            await asyncio.sleep(backoff_delay(attempt))
            if self._stopping:
                return
            attempt += 1
            try:
                self._drop_socket()
                await self._connect_off_loop()
            except OSError as exc:
                log.info("%s: reconnect attempt %d failed: %s", self.device_id, attempt, exc)
                continue
            # CONNACK arrives through the reader; give it time before trying again.
            deadline = asyncio.get_running_loop().time() + max(5.0, self.keepalive)
            while (
                not self.connected and asyncio.get_running_loop().time() < deadline and self._sock is not None
            ):
                await asyncio.sleep(0.05)
            if not self.connected:
                self._attempt_failed("no CONNACK in time")

    # -- paho callbacks (all on the loop thread) ---------------------------

    def _attempt_failed(self, why: str) -> None:
        """Count an attempt that got no session, once (a refusing CONNACK is followed by the
        broker's hang-up, which is the same attempt)."""
        if not self._attempting:
            return
        self._attempting = False
        self.connect_failures += 1
        self.last_connect_failure = why
        self._answered.set()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.warning("%s: broker refused connection: %s", self.device_id, reason)
            self._attempt_failed(f"refused: {reason}")
            return
        self._attempting = False
        self._answered.set()
        if self._sessions:
            self.reconnects += 1
        self._sessions += 1
        client.subscribe(protocol.topic(self.device_id, protocol.Channel.DESIRED), qos=1)
        online = protocol.Status(device_id=self.device_id, state="online", ts=self.now())
        client.publish(
            protocol.topic(self.device_id, protocol.Channel.STATUS),
            protocol.encode(online),
            qos=1,
            retain=True,
        )
        self._connected.set()
        if self._on_connected_cb is not None:
            try:
                self._on_connected_cb()
            except Exception:
                log.exception("%s: on_connected handler failed", self.device_id)

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not self._connected.is_set():
            self._attempt_failed(f"closed before CONNACK: {reason}")
        else:
            self._answered.clear()  # the next attempt answers anew
        self._connected.clear()
        self._release_waiters()
        if not self._stopping:
            log.info("%s: disconnected (%s); reconnecting", self.device_id, reason)
            self._schedule_reconnect()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._on_message_cb is None:
            return
        try:
            self._on_message_cb(msg.topic, bytes(msg.payload), bool(msg.retain))
        except Exception:
            log.exception("%s: message handler failed on %s", self.device_id, msg.topic)

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        self._inflight.discard(mid)
        fut = self._acks.pop(mid, None)
        if fut is not None and not fut.done():
            fut.set_result(not getattr(reason, "is_failure", False))
        if len(self._inflight) < self.max_inflight:
            self._window.set()

    def _on_socket_open(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._socket_opened, client, sock)

    def _socket_opened(self, client: mqtt.Client, sock: Any) -> None:
        assert self._loop is not None
        self._sock = sock
        self._loop.add_reader(sock, client.loop_read)
        if self._misc_timer is None and not self._stopping:
            self._misc_timer = self._loop.call_later(self._misc_interval, self._misc)

    def _on_socket_close(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None:
            self._on_loop(self._socket_closed, sock)

    def _socket_closed(self, sock: Any) -> None:
        if self._loop is not None and sock is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(sock)
                self._loop.remove_writer(sock)
        if sock is self._writer:
            self._writer = None
        if sock is self._sock:
            self._sock = None

    def _on_register_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        self._on_loop(self._want_write, client, sock)

    def _want_write(self, client: mqtt.Client, sock: Any) -> None:
        """paho queued bytes for ``sock``: write them on the loop's next pass, and watch the socket
        for writability only when it did not take them all.

        Registering a writer for every publish cost two ``epoll_ctl`` calls and a trip through
        the selector per message, the largest part of a simulated fleet's per-message CPU; a
        socket with room (nearly always) takes the bytes at once, and the publishes of one
        pass of the loop go out in one write."""
        assert self._loop is not None
        if self._writer is sock or self._flush_for is sock:
            return
        if self._flushing is sock:  # the socket is full: go on when it has room
            self._loop.add_writer(sock, client.loop_write)
            self._writer = sock
            return
        self._flush_for = sock
        self._loop.call_soon(self._flush, client, sock)

    def _flush(self, client: mqtt.Client, sock: Any) -> None:
        if self._flush_for is sock:
            self._flush_for = None
        if sock is not self._sock or self._writer is sock:
            return  # closed meanwhile, or already waiting for room
        self._flushing = sock
        try:
            client.loop_write()  # calls back _want_write (room needed) or _no_write (all sent)
        finally:
            self._flushing = None

    def _on_unregister_write(self, client: mqtt.Client, userdata: Any, sock: Any) -> None:
        if self._loop is not None:
            self._on_loop(self._no_write, sock)

    def _no_write(self, sock: Any) -> None:
        if self._loop is not None and self._writer is sock:
            self._writer = None
            with contextlib.suppress(Exception):
                self._loop.remove_writer(sock)

    def _drop_socket(self) -> None:
        if self._sock is not None and self._loop is not None:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._sock)
                self._loop.remove_writer(self._sock)
        self._sock = self._writer = None

    def _stop_misc(self) -> None:
        if self._misc_timer is not None:
            self._misc_timer.cancel()
            self._misc_timer = None

    def _misc(self) -> None:
        """Keepalive pings and timeouts, every ``misc_interval(keepalive)``; notices a dead
        connection paho found in loop_misc. A plain timer callback, not a task sleeping in a
        loop: the same schedule for about half the loop's work per tick (no future, no task
        step; 5 us instead of 9.5 us measured), which thousands of simulated devices on one
        loop pay every tick."""
        self._misc_timer = None
        if self._stopping or self._loop is None:
            return
        try:
            if self._sock is not None:
                rc = self.client.loop_misc()
                if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not self._stopping:
                    self._drop_socket()
                    self._connected.clear()
                    acks, self._acks = self._acks, {}
                    for fut in acks.values():
                        if not fut.done():
                            fut.set_result(False)
                    self._schedule_reconnect()
        finally:
            if not self._stopping and self._misc_timer is None and not self._loop.is_closed():
                self._misc_timer = self._loop.call_later(self._misc_interval, self._misc)
