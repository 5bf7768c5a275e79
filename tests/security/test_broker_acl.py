"""A REAL mosquitto started from the config `edgefleet broker config` writes, attacked by real MQTT 5 clients.

Devices A and B are provisioned with `provision_device`; the broker runs with
TLS, the generated password file or mutual TLS, and the generated ACL; the
fleet server's account comes in on the server listener with the server CA's
client certificate. (The same attacks with our own server and agent are in
``test_transport_attacks.py``.)
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.reasoncodes import ReasonCode

from edgefleet.broker import mosquitto_binary
from edgefleet.broker_config import write_broker_config
from edgefleet.ports import free_port, launch, start_on_free_port
from edgefleet.provision import FleetCA, Provisioned, issue_cert, provision_device, write_cert_and_key
from signing.keyring import KeyDir, init_keys
from tests.support.waiting import wait_for

NOT_AUTHORIZED = 0x87
TIMEOUT = 10.0


@dataclass
class Broker:
    port: int
    dir: Path
    ca: Path
    keydir: KeyDir
    devices: dict[str, Provisioned]
    server_port: int
    auth: str


def _start(auth: str) -> Iterator[Broker]:
    if mosquitto_binary() is None or shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto / mosquitto_passwd not installed")
    # /tmp/pytest-of-* is 0700: the broker drops to the mosquitto user and must reach its files
    root = Path(tempfile.mkdtemp(prefix=f"ef-broker-{auth}-"))
    root.chmod(0o711)
    try:
        init_keys(root / "keys")
        kd = KeyDir(root / "keys")

        def attempt() -> tuple[subprocess.Popen[bytes], Any, int, int, Any, dict[str, Any]]:
            # ports picked now can be taken before Mosquitto binds them: then new ones
            port, server_port = free_port(), free_port()
            while server_port == port:
                server_port = free_port()
            files = write_broker_config(
                kd, root / "broker", hostnames=["127.0.0.1"], port=port, bind="127.0.0.1", auth=auth,
                server_port=server_port,
            )  # fmt: skip
            devices = {
                d: provision_device(
                    kd,
                    d,
                    "rpi4",
                    root / d,
                    broker_host="127.0.0.1",
                    broker_port=port,
                    password_file=files.password_file,
                    force=True,  # a new attempt re-issues them for its port
                )
                for d in ("devA", "devB")
            }
            proc, log = launch(
                [str(mosquitto_binary()), "-c", str(files.conf)], root / "mosquitto.log", [port, server_port]
            )
            return proc, log, port, server_port, files, devices

        proc, log, port, server_port, files, devices = start_on_free_port(attempt)
        yield Broker(port, root / "broker", files.ca, kd, devices, server_port, auth)
        proc.terminate()
        proc.wait(10)
        log.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def pw_broker() -> Iterator[Broker]:
    yield from _start("password")


@pytest.fixture(scope="module")
def mtls_broker() -> Iterator[Broker]:
    yield from _start("mtls")


@dataclass
class Client:
    """A paho MQTT 5 client with waitable results (reason codes of CONNACK, SUBACK, PUBACK)."""

    client: mqtt.Client
    connack: list[ReasonCode] = field(default_factory=list)
    subacks: dict[int, list[ReasonCode]] = field(default_factory=dict)
    pubacks: dict[int, ReasonCode] = field(default_factory=dict)
    messages: list[tuple[str, bytes]] = field(default_factory=list)
    disconnected: threading.Event = field(default_factory=threading.Event)

    def wait(self, check: Any, what: str) -> Any:
        return wait_for(check, TIMEOUT, what, interval=0.005)

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> int:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        return int(self.wait(lambda: self.pubacks.get(info.mid), f"PUBACK for {topic}").value)

    def subscribe(self, topic: str) -> int:
        _, mid = self.client.subscribe(topic, qos=1)
        return int(self.wait(lambda: self.subacks.get(mid), f"SUBACK for {topic}")[0].value)

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def connect(
    broker: Broker,
    client_id: str,
    *,
    username: str | None = None,
    password: str | None = None,
    cert: tuple[Path, Path] | None = None,
    tls: bool = True,
    port: int | None = None,
) -> Client:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    wrapped = Client(c)
    if tls:
        c.tls_set(
            ca_certs=str(broker.ca),
            certfile=str(cert[0]) if cert else None,
            keyfile=str(cert[1]) if cert else None,
        )
    if username is not None:
        c.username_pw_set(username, password)
    c.on_connect = lambda cl, ud, flags, rc, props: wrapped.connack.append(rc)
    c.on_subscribe = lambda cl, ud, mid, rcs, props: wrapped.subacks.__setitem__(mid, rcs)
    c.on_publish = lambda cl, ud, mid, rc, props: wrapped.pubacks.__setitem__(mid, rc)
    c.on_message = lambda cl, ud, msg: wrapped.messages.append((msg.topic, msg.payload))
    c.on_disconnect = lambda cl, ud, flags, rc, props: wrapped.disconnected.set()
    c.connect("127.0.0.1", port or broker.port, keepalive=30)
    c.loop_start()
    wrapped.wait(lambda: wrapped.connack or wrapped.disconnected.is_set(), f"CONNACK for {client_id}")
    return wrapped


def device(broker: Broker, device_id: str, client_id: str | None = None) -> Client:
    p = broker.devices[device_id]
    if broker.auth == "mtls":
        c = connect(broker, client_id or device_id, cert=(p.cert, p.key))
    else:
        c = connect(broker, client_id or device_id, username=p.username, password=p.password)
    assert not c.connack[0].is_failure, c.connack
    return c


def server(broker: Broker, client_id: str = "fleet-server") -> Client:
    """The fleet server's account: the server CA's certificate, on the server listener (both modes)."""
    d = broker.dir
    c = connect(
        broker, client_id, cert=(d / "fleet-server.crt", d / "fleet-server.key"), port=broker.server_port
    )
    assert c.connack and not c.connack[0].is_failure, c.connack
    return c


@contextlib.contextmanager
def clients(*cs: Client) -> Iterator[None]:
    try:
        yield
    finally:
        for c in cs:
            c.stop()


@pytest.fixture(params=["password", "mtls"])
def broker(request: pytest.FixtureRequest) -> Broker:
    b: Broker = request.getfixturevalue("pw_broker" if request.param == "password" else "mtls_broker")
    return b


def test_device_cannot_publish_under_another_devices_topics(broker: Broker) -> None:
    srv, a = server(broker), device(broker, "devA")
    with clients(srv, a):
        assert srv.subscribe("$share/fleet/ef/v1/+/events") == 1
        assert srv.subscribe("ef/v1/+/reported") == 1
        assert a.publish("ef/v1/devB/events", b"forged") == NOT_AUTHORIZED
        assert a.publish("ef/v1/devB/reported", b"forged", retain=True) == NOT_AUTHORIZED
        assert (
            a.publish("ef/v1/devA/desired", b"self-directed") == NOT_AUTHORIZED
        )  # only the server writes desired
        assert a.publish("ef/v1/devA/events", b"mine") == 0
        srv.wait(lambda: ("ef/v1/devA/events", b"mine") in srv.messages, "server gets A's own event")
        assert not [m for m in srv.messages if m[0].startswith("ef/v1/devB/") or m[1] == b"self-directed"]


def test_device_cannot_receive_another_devices_retained_desired(broker: Broker) -> None:
    srv = server(broker)
    with clients(srv):
        assert srv.publish("ef/v1/devB/desired", b"B's directive", retain=True) < 0x80
        assert srv.publish("ef/v1/devA/desired", b"A's directive", retain=True) < 0x80
    a, b = device(broker, "devA"), device(broker, "devB")
    with clients(a, b):
        # mosquitto grants the SUBACK but checks the read ACL on every delivery: B's directive
        # (retained, and a live one) never reaches A. A's own messages, sent after, are the barrier.
        a.subscribe("ef/v1/devB/desired")
        a.subscribe("ef/v1/+/desired")
        assert a.subscribe("ef/v1/devA/desired") < 0x80
        assert b.subscribe("ef/v1/devB/desired") < 0x80
        b.wait(
            lambda: ("ef/v1/devB/desired", b"B's directive") in b.messages,
            "B gets its own retained directive",
        )
        a.wait(
            lambda: ("ef/v1/devA/desired", b"A's directive") in a.messages,
            "A gets its own retained directive",
        )
        srv = server(broker)
        with clients(srv):
            srv.publish("ef/v1/devB/desired", b"B live")
            srv.publish("ef/v1/devA/desired", b"A live")
        a.wait(lambda: ("ef/v1/devA/desired", b"A live") in a.messages, "A gets its own live directive")
        b.wait(lambda: ("ef/v1/devB/desired", b"B live") in b.messages, "B gets its own live directive")
        assert all(topic == "ef/v1/devA/desired" for topic, _ in a.messages), a.messages


def test_credentials_of_a_cannot_take_bs_client_id(broker: Broker) -> None:
    b = device(broker, "devB")
    with clients(b):
        impostor = device(broker, "devA", client_id="devB")  # A's credentials, B's client id
        with clients(impostor):
            # the broker replaced the client id by A's identity: B's session is untouched ...
            time.sleep(0.2)  # give a (wrong) session takeover the chance to happen before we look
            assert not b.disconnected.is_set()
            assert b.publish("ef/v1/devB/events", b"still here") < 0x80
            # ... and the impostor still has only A's rights
            assert impostor.publish("ef/v1/devB/events", b"forged") == NOT_AUTHORIZED


def test_no_anonymous_or_wrong_password(pw_broker: Broker) -> None:
    anon = connect(pw_broker, "devA")
    wrong = connect(pw_broker, "devA", username="devA", password="guess")
    other = connect(pw_broker, "devA", username="devA", password=pw_broker.devices["devB"].password)
    with clients(anon, wrong, other):
        for c in (anon, wrong, other):
            assert c.connack[0].is_failure and c.connack[0].value in (0x86, 0x87), c.connack


def test_plaintext_is_refused(pw_broker: Broker) -> None:
    p = pw_broker.devices["devA"]
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="devA", protocol=mqtt.MQTTv5)
    c.username_pw_set(p.username, p.password)
    c.connect("127.0.0.1", pw_broker.port, keepalive=5)
    rc = c.loop(timeout=2.0)
    deadline = time.monotonic() + TIMEOUT
    while rc == mqtt.MQTT_ERR_SUCCESS and not c.is_connected() and time.monotonic() < deadline:
        rc = c.loop(timeout=0.2)
    assert not c.is_connected()
    c.disconnect()


def _tls_session(broker: Broker, cert: tuple[Path, Path] | None, port: int | None = None) -> str:
    """Open a TLS session to the broker and see whether it keeps it: "kept" or the way it ended."""
    ctx = ssl.create_default_context(cafile=str(broker.ca))
    if cert is not None:
        ctx.load_cert_chain(str(cert[0]), str(cert[1]))
    with socket.create_connection(("127.0.0.1", port or broker.port), timeout=5) as raw:
        try:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                tls.settimeout(1.0)
                data = tls.recv(1)  # TLS 1.3: the server's verdict on our certificate arrives here
                return "closed" if not data else "kept"
        except TimeoutError:
            return "kept"  # the broker waits for our MQTT CONNECT: the certificate was accepted
        except (ssl.SSLError, ConnectionError) as exc:
            return f"refused: {exc}"


def test_mtls_refuses_foreign_and_missing_certificates(mtls_broker: Broker, tmp_path: Path) -> None:
    from edgefleet.provision import fleet_ca

    # a certificate for "devA" from a CA that is not the fleet CA
    init_keys(tmp_path / "other-keys")
    rogue: FleetCA = fleet_ca(KeyDir(tmp_path / "other-keys"))
    cert_pem, key = issue_cert(rogue, "devA")
    write_cert_and_key(cert_pem, key, tmp_path / "rogue.crt", tmp_path / "rogue.key")
    p = mtls_broker.devices["devA"]
    assert _tls_session(mtls_broker, (p.cert, p.key)) == "kept"
    rogue_outcome = _tls_session(mtls_broker, (tmp_path / "rogue.crt", tmp_path / "rogue.key"))
    assert rogue_outcome != "kept", rogue_outcome
    assert _tls_session(mtls_broker, None) != "kept"


def test_provisioned_bootstrap_holds_the_anchors(pw_broker: Broker) -> None:
    import base64

    from edgefleet.provision import load_bootstrap
    from signing.trust import TrustRoot

    p = pw_broker.devices["devA"]
    boot = load_bootstrap(p.bootstrap)
    assert (boot["device_id"], boot["hardware_id"], boot["broker"]["port"]) == (
        "devA",
        "rpi4",
        pw_broker.port,
    )
    assert base64.b64decode(boot["tuf_root"]) == pw_broker.keydir.tuf_root()
    assert TrustRoot.load(boot["trust_root"]).version == 1
    assert p.bootstrap.stat().st_mode & 0o777 == 0o600
    assert p.password not in (pw_broker.dir / "passwd").read_text()  # stored hashed only


# ---------------------------------------------------------------- the fleet server's account


def _rogue_cert(tmp_path: Path, common_name: str) -> tuple[Path, Path]:
    """A certificate for ``common_name`` from a CA that is neither the fleet CA nor the server CA."""
    from edgefleet.provision import fleet_ca

    init_keys(tmp_path / f"rogue-{common_name}")
    rogue: FleetCA = fleet_ca(KeyDir(tmp_path / f"rogue-{common_name}"))
    cert_pem, key = issue_cert(rogue, common_name)
    paths = (tmp_path / f"{common_name}.crt", tmp_path / f"{common_name}.key")
    write_cert_and_key(cert_pem, key, *paths)
    return paths


def test_only_the_server_ca_gets_onto_the_server_listener(broker: Broker, tmp_path: Path) -> None:
    d = broker.dir
    server_cert = (d / "fleet-server.crt", d / "fleet-server.key")
    p = broker.devices["devA"]
    assert _tls_session(broker, server_cert, broker.server_port) == "kept"
    # a device certificate (fleet CA), none at all, or a "fleet-server" one from another CA: no TLS
    for cert in ((p.cert, p.key), None, _rogue_cert(tmp_path, "fleet-server")):
        outcome = _tls_session(broker, cert, broker.server_port)
        assert outcome != "kept", (cert, outcome)
    # the server's certificate on the device listener is no way in either (no password, wrong CA)
    on_device_port = connect(broker, "fleet-server-x", cert=server_cert)
    with clients(on_device_port):
        assert not on_device_port.connack or on_device_port.connack[0].is_failure
    if broker.auth == "password":
        guess = connect(broker, "fleet-server", username="fleet-server", password="")
        with clients(guess):
            assert guess.connack and guess.connack[0].is_failure


def test_server_connections_keep_their_own_client_ids(broker: Broker) -> None:
    """Bridge, ingest workers and replicas share one account: each keeps its own client id."""
    ids = ["fleet-server-r1", "fleet-server-r1-ingest0", "fleet-server-r1-ingest1", "fleet-server-r2"]
    conns = [server(broker, i) for i in ids]
    a = device(broker, "devA")
    with clients(*conns, a):
        for c in conns:
            assert c.subscribe("ef/v1/+/events") < 0x80
        assert a.publish("ef/v1/devA/events", b"seen by all") == 0
        for c in conns:
            c.wait(
                lambda c=c: ("ef/v1/devA/events", b"seen by all") in c.messages, "every connection gets it"
            )
        time.sleep(0.2)
        assert not any(c.disconnected.is_set() for c in conns)


def test_the_server_account_cannot_speak_as_a_device(broker: Broker) -> None:
    srv = server(broker)
    with clients(srv):
        for channel in ("reported", "status", "events", "telemetry"):
            assert (
                srv.publish(f"ef/v1/devA/{channel}", b"forged", retain=channel == "reported")
                == NOT_AUTHORIZED
            )
        assert srv.publish("ef/v1/devA/desired", b"directed", retain=True) < 0x80
        assert srv.publish("ef/v1/devA/desired", b"", retain=True) < 0x80  # and clears it again


def test_a_device_cannot_take_a_server_client_id(broker: Broker) -> None:
    """Client ids are global to the broker, but a device's is its id, and no device id may start with
    the server's prefix: a device asking for a server connection's id does not disconnect it."""
    from edgefleet.provision import ProvisionError, check_device_id

    with pytest.raises(ProvisionError):
        check_device_id("fleet-server-r1")
    srv = server(broker, "fleet-server-r1")
    with clients(srv):
        impostor = device(broker, "devA", client_id="fleet-server-r1")
        with clients(impostor):
            time.sleep(0.2)
            assert not srv.disconnected.is_set()
            assert srv.subscribe("ef/v1/+/events") < 0x80


def test_password_hashes_are_mosquitto_passwd_lines(tmp_path: Path) -> None:
    """provision.hash_password_line writes what `mosquitto_passwd` writes, for the same salt."""
    import base64

    from edgefleet.provision import hash_password_line

    if shutil.which("mosquitto_passwd") is None:
        pytest.skip("mosquitto_passwd not installed")
    plain = tmp_path / "pw"
    plain.write_text("devA:s3cret-pass word\n")
    subprocess.run(["mosquitto_passwd", "-U", str(plain)], check=True, capture_output=True, timeout=30)
    theirs = plain.read_text().strip()
    salt = base64.b64decode(theirs.split("$")[3])
    assert hash_password_line("devA", "s3cret-pass word", salt=salt) == theirs
