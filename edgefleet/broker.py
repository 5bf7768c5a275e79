"""Start an MQTT broker for the demo, the scenarios, the tests and local trials.

The default is the production configuration itself (:func:`start_secure_broker`):
Mosquitto from the files ``edgefleet broker config`` writes
(``edgefleet.broker_config``: TLS only, per-device identity, the ACL, a server
listener for the fleet server's certificate), on free loopback ports, with a
persistence directory of its own. Its :class:`SecureBrokerInfo` says how to get
in: :func:`device_mqtt_keys` issues a device's credentials (a client
certificate with CN = its id from the fleet CA in ``mtls`` mode: no broker
reload per device; a password added to the password file and the broker
reloaded with SIGHUP in ``password`` mode), :func:`server_mqtt_settings` gives
the fleet server's connection settings.

The open broker is a development mode only, and says so wherever it runs:
:func:`start_mosquitto` (no TLS, anonymous, no ACL) and the embedded amqtt
fallback :func:`start_embedded` (MQTT 3.1.1, no shared subscriptions) for
machines without Mosquitto. Any client may publish anything there, as any
device.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from device_agent.config import BrokerInfo
from device_agent.mqtt_security import MqttSecurity

__all__ = [
    "INSECURE_LABEL",
    "Broker",
    "BrokerInfo",
    "SecureBrokerInfo",
    "device_mqtt_keys",
    "device_security",
    "fleet_mqtt_keys",
    "provision_devices",
    "security_label",
    "server_mqtt_settings",
    "server_security",
    "start_broker",
    "start_embedded",
    "start_mosquitto",
    "start_secure_broker",
    "start_secure_shards",
]

INSECURE_LABEL = "INSECURE development broker: no TLS, anonymous, no ACL (any client may speak as any device)"


@dataclass(frozen=True)
class SecureBrokerInfo(BrokerInfo):
    """A broker running the production configuration, and how clients get in (plain data: picklable).

    ``port`` is the device listener, ``server_port`` the fleet server's; ``files_dir`` holds
    what ``write_broker_config`` wrote (``ca.crt``, ``fleet-server.json``, ``passwd``) and the
    credentials issued to devices (``devices/<id>/``); ``keys_dir`` holds the fleet CA;
    ``pid`` is the process reloaded (SIGHUP) when the password file changes."""

    server_port: int = 0
    auth: str = "mtls"
    files_dir: Path = Path()
    keys_dir: Path = Path()
    pid: int = 0

    @property
    def url(self) -> str:
        return f"mqtts://{self.host}:{self.port}"

    @property
    def ca_file(self) -> Path:
        return self.files_dir / "ca.crt"

    @property
    def server_credentials(self) -> Path:
        return self.files_dir / "fleet-server.json"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(
    host: str, port: int, timeout: float = 10.0, alive: subprocess.Popen[bytes] | None = None
) -> None:
    """Wait until ``host:port`` accepts connections; give up early once ``alive`` has exited."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.2):
                return
        except OSError:
            if time.monotonic() > deadline or (alive is not None and alive.poll() is not None):
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout}s") from None
            time.sleep(0.01)


def mosquitto_binary() -> str | None:
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    return None


class PortTaken(RuntimeError):
    """Another process bound a port chosen for the broker between choosing it and binding it."""


def _launch(
    binary: str, conf: Path, log_path: Path, ports: tuple[int, ...]
) -> tuple[subprocess.Popen[bytes], Any]:
    """Run Mosquitto on ``conf`` until every port in ``ports`` listens, and make sure it is OURS.

    A port chosen by :func:`free_port` can be taken by another process (another test worker
    starting its own broker) before Mosquitto binds it. Mosquitto then exits at once while the
    other process answers on the port, so "something listens" is not proof: the broker must
    still be running after its listeners answered. ``PortTaken`` lets the caller pick new ports.
    """
    log = open(log_path, "ab")  # noqa: SIM115 - lives as long as the broker
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    try:
        for port in ports:
            wait_for_port("127.0.0.1", port, alive=proc)
        time.sleep(0.05)  # a listener that failed to bind makes Mosquitto exit within milliseconds
        if proc.poll() is not None:
            raise TimeoutError
    except TimeoutError:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        log.close()
        tail = log_path.read_text(errors="replace")[-2000:]
        if "Address already in use" in tail:
            raise PortTaken(tail) from None
        raise RuntimeError(f"mosquitto did not start: {tail}") from None
    return proc, log


def _with_free_ports(start: Callable[[], Broker], chosen: bool, attempts: int = 5) -> Broker:
    """``start()``; when its ports were picked here and another process took one, pick again."""
    for attempt in range(attempts):
        try:
            return start()
        except PortTaken:
            if not chosen or attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")


MOSQUITTO_CONF = """\
# Generated by edgefleet for a local, throwaway DEVELOPMENT broker: no TLS, anonymous, no ACL.
listener {port} 127.0.0.1
allow_anonymous true
persistence false
# Never drop QoS 1 silently to a slow subscriber (the default is 1000 messages).
max_queued_messages 1000000
max_inflight_messages 0
max_keepalive 120
log_dest stderr
log_type error
log_type warning
{extra}
"""


class Broker(contextlib.AbstractContextManager["Broker"]):
    """A running broker; ``stop()`` (or leaving the ``with`` block) ends it."""

    def __init__(self, info: BrokerInfo, stop: Callable[[], None]) -> None:
        self.info = info
        self._stop = stop

    def stop(self) -> None:
        self._stop()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_mosquitto(
    port: int | None = None, workdir: Path | None = None, extra_conf: str = "", persistence: bool = False
) -> Broker:
    """Start an OPEN development Mosquitto (no TLS, anonymous, no ACL) on a free loopback port; with
    ``persistence`` sessions and retained messages survive a restart on the same ``workdir`` and
    port. For trials of the MQTT logic only: :func:`start_secure_broker` is what the product runs."""
    binary = mosquitto_binary()
    if binary is None:
        raise FileNotFoundError("mosquitto is not installed (Debian: apt-get install mosquitto)")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ef-mosquitto-"))
    workdir.mkdir(parents=True, exist_ok=True)
    os.chmod(workdir, 0o755)  # mosquitto drops to its own user and must read the config
    if persistence:
        extra_conf += f"\npersistence true\npersistence_location {workdir}/\nautosave_interval 1\n"
        if os.geteuid() == 0:
            # Dropping to the mosquitto user would leave it unable to reach a private temp dir.
            extra_conf += "user root\n"

    def start() -> Broker:
        chosen = port or free_port()
        conf = workdir / "mosquitto.conf"
        conf.write_text(MOSQUITTO_CONF.format(port=chosen, extra=extra_conf))
        os.chmod(conf, 0o644)
        proc, log = _launch(binary, conf, workdir / "mosquitto.log", (chosen,))
        broker = Broker(BrokerInfo("127.0.0.1", chosen, 5, True, "mosquitto"), _stopper(proc, log))
        broker.process = proc  # type: ignore[attr-defined]
        broker.workdir = workdir  # type: ignore[attr-defined]
        return broker

    return _with_free_ports(start, chosen=port is None)


def start_embedded(port: int | None = None) -> Broker:
    """Run amqtt in a thread: MQTT 3.1.1, no shared subscriptions, and OPEN (no TLS, no ACL; it also
    delivered another device's retained message past an ACL): a development fallback for machines
    without Mosquitto, small demos only."""
    from amqtt.broker import Broker as AmqttBroker

    port = port or free_port()
    config = {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {"amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True}},
    }
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder: dict[str, object] = {}

    def run() -> None:
        asyncio.set_event_loop(loop)
        broker = AmqttBroker(config, loop=loop)
        holder["broker"] = broker
        loop.run_until_complete(broker.start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("embedded broker did not start")
    wait_for_port("127.0.0.1", port)

    def stop() -> None:
        broker = holder.get("broker")
        if broker is not None and loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(broker.shutdown(), loop)  # type: ignore[attr-defined]
            with contextlib.suppress(Exception):
                fut.result(5)
            loop.call_soon_threadsafe(loop.stop)
            thread.join(5)

    return Broker(BrokerInfo("127.0.0.1", port, 4, False, "amqtt"), stop)


def start_broker(
    prefer: str = "auto", workdir: Path | None = None, auth: str = "mtls", keys_dir: Path | None = None
) -> Broker:
    """The demo's and local trials' broker. ``prefer``: ``auto`` (the production configuration on
    Mosquitto when it is installed, else the embedded development broker), ``secure``,
    ``mosquitto`` (open development Mosquitto) or ``embedded``; ``EDGEFLEET_BROKER`` overrides it.
    Check :func:`security_label` to say which one runs."""
    prefer = os.environ.get("EDGEFLEET_BROKER", prefer)
    if prefer not in ("auto", "secure", "mosquitto", "embedded"):
        raise ValueError(f"unknown broker kind {prefer!r}: auto, secure, mosquitto or embedded")
    if prefer == "embedded" or (prefer == "auto" and mosquitto_binary() is None):
        return start_embedded()
    if prefer == "mosquitto":
        return start_mosquitto(workdir=workdir)
    return start_secure_broker(workdir, auth=auth, keys_dir=keys_dir)


def security_label(info: BrokerInfo) -> str:
    """One line on what protects this broker (the demo and ``broker run`` print it)."""
    if isinstance(info, SecureBrokerInfo):
        how = "client certificates" if info.auth == "mtls" else "passwords"
        return f"production configuration: TLS, per-device {how}, ACL"
    return INSECURE_LABEL


# ---------------------------------------------------------------- the production configuration


def start_secure_broker(
    workdir: Path | None = None,
    *,
    auth: str = "mtls",
    keys_dir: Path | None = None,
    port: int | None = None,
    server_port: int | None = None,
    passphrase: bytes | None = None,
) -> Broker:
    """Mosquitto from ``write_broker_config``'s production files, on free loopback ports.

    The same TLS, ACL and identity rules as a deployment; what differs is local: loopback
    addresses, a persistence directory under ``workdir``, and (as root) Mosquitto staying root,
    because a private temporary directory is not reachable by the ``mosquitto`` user.
    ``keys_dir``: where the fleet CA lives (default ``workdir/keys``, created; ``passphrase``
    unlocks an encrypted one, and then only ``edgefleet devices provision`` issues device
    credentials). Started again on the same ``workdir`` and ports it keeps its retained messages,
    sessions and issued credentials.
    """
    from edgefleet.broker_config import write_broker_config
    from signing.keyring import KeyDir

    binary = mosquitto_binary()
    if binary is None:
        raise FileNotFoundError("mosquitto is not installed (Debian: apt-get install mosquitto)")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ef-broker-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    keys_dir = Path(keys_dir or workdir / "keys").resolve()
    keys_dir.mkdir(parents=True, exist_ok=True)

    def start() -> Broker:
        device_port = port or free_port()
        listener = server_port or free_port()
        while listener == device_port:
            listener = free_port()
        files = write_broker_config(
            KeyDir(keys_dir), workdir / "broker", hostnames=["127.0.0.1", "localhost"], port=device_port,
            bind="127.0.0.1", auth=auth, persistence_dir=workdir / "broker" / "data", server_port=listener,
            run_as="root" if os.geteuid() == 0 else None, passphrase=passphrase,
        )  # fmt: skip
        proc, log = _launch(binary, files.conf, workdir / "mosquitto.log", (device_port, listener))
        info = SecureBrokerInfo(
            "127.0.0.1", device_port, 5, True, "mosquitto",
            server_port=listener, auth=auth, files_dir=files.conf.parent, keys_dir=keys_dir, pid=proc.pid,
        )  # fmt: skip
        broker = Broker(info, _stopper(proc, log))
        broker.process = proc  # type: ignore[attr-defined]
        broker.workdir = workdir  # type: ignore[attr-defined]
        return broker

    return _with_free_ports(start, chosen=port is None or server_port is None)


class ShardedBrokers(contextlib.AbstractContextManager["ShardedBrokers"]):
    """Several production brokers (shards) from one key directory, and the shards file naming them.

    ``brokers[name]`` is each running shard; :meth:`kill` and :meth:`restart` take one away and
    bring it back on the same ports, directory and configuration (retained messages, sessions
    and issued credentials as its persistence kept them)."""

    def __init__(
        self, workdir: Path, shards_file: Path, brokers: dict[str, Broker], start: Callable[..., Broker]
    ):
        self.workdir, self.shards_file, self.brokers, self._start = workdir, shards_file, brokers, start

    @property
    def infos(self) -> dict[str, SecureBrokerInfo]:
        return {name: b.info for name, b in self.brokers.items()}  # type: ignore[misc]

    def kill(self, name: str) -> None:
        """SIGKILL one shard: no goodbye, no save of its persistence (what a crash does)."""
        proc: subprocess.Popen[bytes] = self.brokers[name].process  # type: ignore[attr-defined]
        proc.kill()
        proc.wait()
        self.brokers[name].stop()  # closes its log

    def restart(self, name: str) -> Broker:
        old: SecureBrokerInfo = self.brokers[name].info  # type: ignore[assignment]
        self.brokers[name].stop()
        self.brokers[name] = self._start(name, old.port, old.server_port)
        return self.brokers[name]

    def stop(self) -> None:
        for b in self.brokers.values():
            b.stop()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_secure_shards(
    shards: int,
    workdir: Path | None = None,
    *,
    auth: str = "mtls",
    keys_dir: Path | None = None,
    passphrase: bytes | None = None,
) -> ShardedBrokers:
    """``shards`` brokers in the production configuration (:func:`start_secure_broker` each, in
    ``workdir/shard-<i>``), all from one fleet CA in ``keys_dir``, on free loopback ports, and
    ``workdir/shards.json`` naming them (``ServerSettings.mqtt_shards``)."""
    from edgefleet.broker_config import shard_name
    from fleet_server.shards import SHARDS_FILE, Shard, write_shards

    if shards < 1:
        raise ValueError(f"the number of shards must be at least 1, got {shards}")
    workdir = Path(workdir or tempfile.mkdtemp(prefix="ef-shards-")).resolve()
    keys_dir = Path(keys_dir or workdir / "keys").resolve()

    def start(name: str, port: int | None = None, server_port: int | None = None) -> Broker:
        return start_secure_broker(
            workdir / name,
            auth=auth,
            keys_dir=keys_dir,
            passphrase=passphrase,
            port=port,
            server_port=server_port,
        )

    brokers: dict[str, Broker] = {}
    try:
        for i in range(shards):
            brokers[shard_name(i)] = start(shard_name(i))
    except BaseException:
        for b in brokers.values():
            b.stop()
        raise
    rows = []
    for name, b in brokers.items():
        info: SecureBrokerInfo = b.info  # type: ignore[assignment]
        pw = info.files_dir / "passwd" if auth == "password" else None
        rows.append(Shard(name, info.host, info.port, info.server_credentials, pw))
    path = workdir / SHARDS_FILE
    write_shards(path, rows)
    return ShardedBrokers(workdir, path, brokers, start)


def _stopper(proc: subprocess.Popen[bytes], log: Any) -> Callable[[], None]:
    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()  # Mosquitto saves its persistence database on SIGTERM
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()

    return stop


def server_mqtt_settings(info: BrokerInfo) -> dict[str, Any]:
    """``ServerSettings`` fields that connect a fleet server to this broker (the server listener
    and ``fleet-server.json`` for a production broker, the plain address for an open one)."""
    common = {"mqtt_version": info.mqtt_version, "shared_subscriptions": info.shared_subscriptions}
    if isinstance(info, SecureBrokerInfo):
        return {"mqtt_host": info.host, "mqtt_port": info.server_port,
                "mqtt_credentials": info.server_credentials, **common}  # fmt: skip
    return {"mqtt_host": info.host, "mqtt_port": info.port, **common}


def server_security(info: BrokerInfo) -> MqttSecurity:
    """How a raw paho client connects as the fleet server (to ``info.server_port``)."""
    if not isinstance(info, SecureBrokerInfo):
        return MqttSecurity()
    d = info.files_dir
    return MqttSecurity(
        tls=True, ca_file=info.ca_file, cert_file=d / "fleet-server.crt", key_file=d / "fleet-server.key"
    )


def device_mqtt_keys(info: BrokerInfo, device_id: str) -> dict[str, Any]:
    """The agent configuration's ``mqtt_*`` keys for ``device_id`` on this broker, issuing its
    credentials on first use; ``{}`` on an open broker."""
    return fleet_mqtt_keys(info, [device_id]).get(device_id, {})


def fleet_mqtt_keys(info: BrokerInfo, device_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """:func:`device_mqtt_keys` for a whole fleet at once (one password-file rewrite and reload);
    empty on an open broker."""
    if not isinstance(info, SecureBrokerInfo):
        return {}
    return provision_devices(info, device_ids)


def device_security(info: BrokerInfo, device_id: str) -> MqttSecurity:
    """How a raw paho client connects as ``device_id`` (client id = the device id)."""
    from device_agent.mqtt_security import read_secret

    keys = device_mqtt_keys(info, device_id)
    if not keys:
        return MqttSecurity()
    pw = keys.get("mqtt_password_file")
    return MqttSecurity(
        tls=True,
        ca_file=Path(keys["mqtt_ca_file"]),
        cert_file=Path(keys["mqtt_cert_file"]) if "mqtt_cert_file" in keys else None,
        key_file=Path(keys["mqtt_key_file"]) if "mqtt_key_file" in keys else None,
        username=keys.get("mqtt_username"),
        password=read_secret(Path(pw)) if pw else None,
    )


_issue_lock = threading.Lock()


def provision_devices(
    info: SecureBrokerInfo, device_ids: Iterable[str], passphrase: bytes | None = None
) -> dict[str, dict[str, Any]]:
    """Issue (once, kept under ``files_dir/devices/``) the broker credentials of many devices and
    return each one's agent ``mqtt_*`` keys. In password mode the new ones go into the password
    file in one rewrite and the broker is reloaded once (SIGHUP), and this returns when it
    accepts them. ``passphrase`` unlocks an encrypted fleet CA."""
    from edgefleet.provision import agent_mqtt_keys, set_passwords, write_device_identity

    out: dict[str, dict[str, Any]] = {}
    new_passwords: dict[str, str] = {}
    with _issue_lock:
        for device_id in dict.fromkeys(device_ids):
            d = info.files_dir / "devices" / device_id
            if not (d / "device.key").exists():
                ca = _ca(info.keys_dir, passphrase)
                # issued again if lost: no fsync per secret (a thousand devices in ~2 s instead of ~8)
                new_passwords[device_id] = write_device_identity(ca, device_id, d, durable=False)
            out[device_id] = agent_mqtt_keys(
                info.auth, ca_file=info.ca_file, cert_file=d / "device.crt", key_file=d / "device.key",
                username=device_id, password_file=d / "mqtt.password",
            )  # fmt: skip
        if info.auth == "password" and new_passwords:
            set_passwords(info.files_dir / "passwd", new_passwords)
            _reload(info, next(reversed(new_passwords)), next(reversed(new_passwords.values())))
    return out


@functools.cache
def _ca(keys_dir: Path, passphrase: bytes | None) -> Any:
    from edgefleet.provision import fleet_ca
    from signing.keyring import KeyDir

    return fleet_ca(KeyDir(keys_dir), passphrase)


def _reload(info: SecureBrokerInfo, device_id: str, password: str, timeout: float = 10.0) -> None:
    """SIGHUP the broker (it rereads the password file) and wait until it lets ``device_id`` in."""

    os.kill(info.pid, signal.SIGHUP)
    security = MqttSecurity(tls=True, ca_file=info.ca_file, username=device_id, password=password)
    deadline = time.monotonic() + timeout
    while not _lets_in(info, security, device_id):
        if time.monotonic() > deadline:
            raise TimeoutError(f"the broker did not accept {device_id}'s new password after a reload")
        time.sleep(0.05)


def _lets_in(info: SecureBrokerInfo, security: MqttSecurity, client_id: str) -> bool:
    """One MQTT 5 connect with ``security``: did the broker accept it?"""
    import paho.mqtt.client as mqtt
    from paho.mqtt.enums import CallbackAPIVersion

    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    security.apply(client)
    result: list[bool] = []
    client.on_connect = lambda _c, _u, _f, rc, _p: result.append(not rc.is_failure)
    with contextlib.suppress(OSError):
        client.connect(info.host, info.port, keepalive=5)
        end = time.monotonic() + 2.0
        while not result and time.monotonic() < end and client.loop(0.05) == mqtt.MQTT_ERR_SUCCESS:
            pass
    with contextlib.suppress(Exception):
        client.disconnect()
        client.loop(0.05)
    return bool(result and result[0])
