"""The broker launcher: `edgefleet broker run` (the production configuration by default, stopped with
it on SIGTERM/SIGINT), and the open development brokers (Mosquitto, the embedded fallback)."""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from edgefleet.broker import SnapshotTable, mosquitto_binary, start_embedded, start_mosquitto
from tests.support.waiting import wait_for

EXE = str(Path(sys.executable).parent / "edgefleet")


def _retained(host: str, port: int, version: int, topic: str) -> list[bytes]:
    got: list[bytes] = []
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311)
    c.on_message = lambda _c, _u, m: got.append(bytes(m.payload))
    c.connect(host, port)
    c.loop_start()
    c.subscribe(topic, 1)
    deadline = time.monotonic() + 5
    while not got and time.monotonic() < deadline:
        time.sleep(0.02)
    c.disconnect()
    c.loop_stop()
    return got


def _publish_retained(host: str, port: int, version: int, topic: str, payload: bytes) -> None:
    c = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311)
    c.connect(host, port)
    c.loop_start()
    c.publish(topic, payload, qos=1, retain=True).wait_for_publish(5)
    c.disconnect()
    c.loop_stop()


def test_persistent_mosquitto_keeps_retained_messages_across_a_restart(tmp_path: Path) -> None:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    broker = start_mosquitto(workdir=tmp_path / "b", persistence=True)
    host, port = broker.info.host, broker.info.port
    _publish_retained(host, port, 5, "ef/v1/x/desired", b"kept")
    saved = tmp_path / "b" / "mosquitto.db"  # autosave_interval 1: written by the broker, not its stop
    wait_for(lambda: saved.is_file() and b"kept" in saved.read_bytes(), 15, "the autosaved retained message")
    broker.stop()
    again = start_mosquitto(port=port, workdir=tmp_path / "b", persistence=True)
    try:
        assert _retained(host, port, 5, "ef/v1/x/desired") == [b"kept"]
    finally:
        again.stop()


def test_embedded_broker_speaks_mqtt_3_1_1() -> None:
    broker = start_embedded()
    try:
        assert (broker.info.mqtt_version, broker.info.shared_subscriptions) == (4, False)
        _publish_retained(broker.info.host, broker.info.port, 4, "a/b", b"hi")
        assert _retained(broker.info.host, broker.info.port, 4, "a/b") == [b"hi"]
    finally:
        broker.stop()


def test_the_embedded_brokers_subscription_walks_survive_a_session_changing_the_table() -> None:
    """amqtt walks its subscription table across awaits while other sessions subscribe and
    leave; the embedded broker hands it a table whose walks see a snapshot."""
    from amqtt.broker import Broker as AmqttBroker

    walks: list[Callable[[SnapshotTable], Iterable[Any]]] = [
        iter,
        SnapshotTable.keys,
        SnapshotTable.values,
        SnapshotTable.items,
    ]
    for walk in walks:
        table = SnapshotTable({"a/+": [], "b/#": []})
        seen = 0
        for _ in walk(table):  # a plain dict raises here: its size changed during iteration
            table[f"c/{seen}"] = []  # another session subscribes meanwhile
            table.pop("b/#", None)  # and another one leaves
            seen += 1
        assert seen == 2 and set(table) == {"a/+", "c/0", "c/1"}
    broker = start_embedded()
    try:
        [amqtt] = [o for o in gc.get_objects() if isinstance(o, AmqttBroker) and o._loop.is_running()]
        assert isinstance(amqtt._subscriptions, SnapshotTable)
        _publish_retained(broker.info.host, broker.info.port, 4, "a/b", b"hi")
        assert _retained(broker.info.host, broker.info.port, 4, "a/b") == [b"hi"]
    finally:
        broker.stop()


def _broker_run(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[str], dict[str, Any]]:
    """`edgefleet broker run --json` as a real process, once it printed where its broker listens."""
    proc = subprocess.Popen(
        [EXE, "broker", "run", "--dir", str(tmp_path / "broker"), "--json", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("}"):
            break
    try:
        return proc, json.loads("".join(lines))
    except ValueError:
        proc.kill()
        raise AssertionError(
            f"no JSON from broker run: {''.join(lines)} {proc.stderr.read() if proc.stderr else ''}"
        ) from None


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_broker_run_stops_its_broker_on_a_signal(tmp_path: Path, sig: signal.Signals) -> None:
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    proc, info = _broker_run(tmp_path)
    try:
        port = int(info["url"].rsplit(":", 1)[1])
        assert info["security"].startswith("production configuration: TLS")
        assert _listening(port) and _listening(info["server_port"])
        assert os.path.exists(f"/proc/{info['pid']}")
        proc.send_signal(sig)
        assert proc.wait(15) == 0
        # the broker is gone with it: its process and both listeners
        deadline = time.monotonic() + 5
        while os.path.exists(f"/proc/{info['pid']}") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not os.path.exists(f"/proc/{info['pid']}"), "mosquitto outlived `broker run`"
        assert not _listening(port) and not _listening(info["server_port"])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_broker_run_is_the_production_configuration(tmp_path: Path) -> None:
    """By default: TLS only (a plaintext CONNECT gets nowhere) and the server credentials written."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    proc, info = _broker_run(tmp_path)
    try:
        port = int(info["url"].rsplit(":", 1)[1])
        assert info["url"].startswith("mqtts://") and Path(info["server_credentials"]).is_file()
        c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="plain", protocol=mqtt.MQTTv5)
        c.connect("127.0.0.1", port, keepalive=5)
        deadline = time.monotonic() + 3
        while c.loop(0.1) == mqtt.MQTT_ERR_SUCCESS and time.monotonic() < deadline:
            pass
        assert not c.is_connected()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


def test_broker_run_asks_for_the_open_broker_explicitly(tmp_path: Path) -> None:
    out = subprocess.run([EXE, "broker", "run", "--embedded"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--insecure-dev" in out.stderr


def test_the_embedded_broker_on_a_taken_port_starts_on_another(monkeypatch: pytest.MonkeyPatch) -> None:
    import edgefleet.broker as launcher

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    picks = iter([taken])
    real = launcher.free_port
    monkeypatch.setattr(launcher, "free_port", lambda: next(picks, None) or real())
    try:
        broker = start_embedded()
        try:
            assert broker.info.port != taken and _listening(broker.info.port)
        finally:
            broker.stop()
        with pytest.raises(launcher.PortTaken):
            start_embedded(port=taken)  # a port the caller fixed is not swapped for another
    finally:
        squatter.close()


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
@pytest.mark.parametrize("secure", [False, True], ids=["open", "production"])
def test_a_chosen_port_taken_by_another_process_is_chosen_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, secure: bool
) -> None:
    """Parallel test workers pick ports at the same time: when another process binds the port first,
    the launcher must not take that process for its broker; it picks new ports and starts."""
    import edgefleet.broker as launcher

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()  # answers connections, as another worker's broker would
    taken = squatter.getsockname()[1]
    picks = iter([taken])
    real = launcher.free_port
    monkeypatch.setattr(launcher, "free_port", lambda: next(picks, None) or real())
    try:
        start = launcher.start_secure_broker if secure else start_mosquitto
        broker = start(workdir=tmp_path / "b")
        try:
            assert broker.info.port != taken
            assert broker.process.poll() is None  # type: ignore[attr-defined]
            with socket.create_connection(("127.0.0.1", broker.info.port), timeout=2):
                pass
        finally:
            broker.stop()
    finally:
        squatter.close()


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_broker_run_on_chosen_ports(tmp_path: Path) -> None:
    """--port and --server-port: the listeners where a script (or the README) expects them."""
    from edgefleet.ports import PortTaken, free_port, start_on_free_port

    def run() -> tuple[subprocess.Popen[str], dict[str, Any], int, int]:
        # ports chosen here can be taken before the broker binds them: then it says so, and new ones
        port, server_port = free_port(), free_port()
        while server_port == port:
            server_port = free_port()
        try:
            proc, info = _broker_run(tmp_path, "--port", str(port), "--server-port", str(server_port))
        except AssertionError as failed:
            if "is taken by another process" in str(failed):
                raise PortTaken(str(failed)) from None
            raise
        return proc, info, port, server_port

    proc, info, port, server_port = start_on_free_port(run)
    try:
        assert info["url"] == f"mqtts://127.0.0.1:{port}" and info["server_port"] == server_port
        assert _listening(port) and _listening(server_port)
        assert json.loads(Path(info["server_credentials"]).read_text())["port"] == server_port
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0


@pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")
def test_broker_run_on_a_taken_port_says_so(tmp_path: Path) -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    try:
        for args in (["--port", str(taken)], ["--insecure-dev", "--port", str(taken)]):
            out = subprocess.run(
                [EXE, "broker", "run", "--dir", str(tmp_path / "b"), *args, "--json"],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert out.returncode == 1 and out.stdout == "", (args, out.stderr)
            error = json.loads(out.stderr)["error"]
            assert error["message"] == f"cannot start the broker: port {taken} is taken by another process"
    finally:
        squatter.close()


def test_broker_run_port_usage_errors(tmp_path: Path) -> None:
    for args in (["--port", "9000", "--server-port", "9000"], ["--insecure-dev", "--server-port", "9001"]):
        out = subprocess.run([EXE, "broker", "run", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode == 2 and out.stderr.startswith("error: "), (args, out.stderr)


def test_broker_run_shards_starts_them_all_and_stops_them_all(tmp_path: Path) -> None:
    from fleet_server.mqtt_client import shard_endpoints
    from fleet_server.settings import ServerSettings
    from fleet_server.shards import load_shards

    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    proc, info = _broker_run(tmp_path, "--shards", "3")
    try:
        shards = load_shards(Path(info["shards_file"]))
        assert [s.name for s in shards] == ["shard-0", "shard-1", "shard-2"]
        assert [s["name"] for s in info["shards"]] == [s.name for s in shards]
        servers = shard_endpoints(ServerSettings(mqtt_shards=Path(info["shards_file"])))
        assert [e.port for e in servers.values()] == [s["server_port"] for s in info["shards"]]
        assert all(e.security.tls and e.security.cert_file for e in servers.values())
        assert len({s.port for s in shards}) == 3 and all(_listening(s.port) for s in shards)
        pids = [s["pid"] for s in info["shards"]]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        deadline = time.monotonic() + 5
        while any(os.path.exists(f"/proc/{p}") for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(os.path.exists(f"/proc/{p}") for p in pids), "a shard outlived `broker run`"
        assert not any(_listening(s.port) for s in shards)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
