"""The fault proxies against real servers: a TCP echo server, Mosquitto, and a real HTTP artifact server."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from agent.harness import ArtifactServer, Bundle, make_bundle, wait_for

from edgefleet.broker import BrokerInfo
from signing.keyring import KeyDir
from simulator.netem import HttpFaultProxy, LinkState, NetProfile, NetworkThread, TcpFaultProxy
from tests.mqtt_clients import device_client


@pytest.fixture
def net() -> Iterator[NetworkThread]:
    n = NetworkThread()
    yield n
    n.close()


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()
    writer.close()


def _echo_server(net: NetworkThread) -> int:
    async def start() -> int:
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        return int(server.sockets[0].getsockname()[1])

    return net.run(start())


def _roundtrip(port: int, payload: bytes) -> tuple[bytes, float]:
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(payload)
        got = b""
        while len(got) < len(payload):
            chunk = s.recv(65536)
            if not chunk:
                break
            got += chunk
    return got, time.perf_counter() - t


def test_profile_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="loss"):
        NetProfile(loss=1.0)
    with pytest.raises(ValueError, match=">= 0"):
        NetProfile(latency_ms=-1)


@pytest.mark.serial  # times a plain loopback round trip against 0.2 s: a busy CPU alone can miss it
def test_tcp_proxy_adds_latency_and_limits_bandwidth(net: NetworkThread) -> None:
    upstream = _echo_server(net)
    plain = TcpFaultProxy("127.0.0.1", upstream, LinkState())
    net.run(plain.start())
    got, fast = _roundtrip(plain.port, b"x" * 100)
    assert got == b"x" * 100
    slow_link = LinkState(profile=NetProfile(latency_ms=100))
    slow = TcpFaultProxy("127.0.0.1", upstream, slow_link)
    net.run(slow.start())
    got, delayed = _roundtrip(slow.port, b"y" * 100)
    assert got == b"y" * 100
    assert delayed >= 0.2 > fast  # 100 ms each way
    thin = TcpFaultProxy("127.0.0.1", upstream, LinkState(profile=NetProfile(bandwidth_kbps=800)))
    net.run(thin.start())
    got, paced = _roundtrip(thin.port, b"z" * 20_000)  # 20 kB at 100 kB/s, each way
    assert got == b"z" * 20_000
    assert paced >= 0.3


def test_partition_resets_connections_until_healed(net: NetworkThread, broker_info: BrokerInfo) -> None:
    link = LinkState()
    proxy = TcpFaultProxy(broker_info.host, broker_info.port, link)
    net.run(proxy.start())
    client = device_client(broker_info, "netem-partition")  # TLS end to end, through the proxy
    client.reconnect_delay_set(1, 1)
    client.connect("127.0.0.1", proxy.port)
    client.loop_start()
    try:
        wait_for(client.is_connected, what="connected through the proxy")
        net.call(link.partition)
        wait_for(lambda: not client.is_connected(), what="partition noticed")
        # reconnects are refused while partitioned: one reaches the proxy and gets nowhere
        tried = proxy.connections
        wait_for(lambda: proxy.connections > tried, what="a reconnect while partitioned")
        assert not client.is_connected()
        net.call(link.heal)
        wait_for(client.is_connected, timeout=15, what="reconnected after heal")
    finally:
        client.loop_stop()
        client.disconnect()


Served = tuple[HttpFaultProxy, Bundle, ArtifactServer]


@pytest.fixture
def served(
    artifacts: ArtifactServer, keydir: KeyDir, tmp_path: Path, net: NetworkThread
) -> tuple[HttpFaultProxy, Bundle, ArtifactServer]:
    bundle = make_bundle(tmp_path / "b", keydir.key("release"))
    artifacts.add(bundle)
    port = int(artifacts.base.rsplit(":", 1)[1])
    proxy = HttpFaultProxy("127.0.0.1", port)
    net.run(proxy.start())
    return proxy, bundle, artifacts


def test_http_proxy_passes_through_and_faults_only_the_named_device(served: Served) -> None:
    proxy, bundle, _ = served
    body = bundle.model_path.read_bytes()
    url = f"{proxy.url}/m/{bundle.sha256}"
    hdr = {"X-Edgefleet-Device": "dev-a"}
    assert httpx.get(url, headers=hdr).content == body
    part = httpx.get(url, headers={**hdr, "Range": "bytes=10-"})
    assert part.status_code == 206 and part.content == body[10:]
    proxy.links["dev-b"] = LinkState(corrupt_downloads=1)
    bad = httpx.get(url, headers={"X-Edgefleet-Device": "dev-b"}).content
    assert len(bad) == len(body) and bad != body
    assert sum(a != b for a, b in zip(bad, body, strict=True)) == 1
    assert httpx.get(url, headers={"X-Edgefleet-Device": "dev-b"}).content == body  # once only
    assert httpx.get(url, headers=hdr).content == body  # others never affected


def test_http_proxy_cuts_a_download_and_partitions(served: Served) -> None:
    proxy, bundle, _ = served
    url = f"{proxy.url}/m/{bundle.sha256}"
    proxy.links["dev-cut"] = LinkState(cut_downloads_after=100)
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, headers={"X-Edgefleet-Device": "dev-cut"})
    assert proxy.links["dev-cut"].cuts == 1
    assert httpx.get(url, headers={"X-Edgefleet-Device": "dev-cut"}).content == bundle.model_path.read_bytes()
    proxy.links["dev-off"] = LinkState(partitioned=True)
    with pytest.raises(httpx.HTTPError):
        httpx.get(url, headers={"X-Edgefleet-Device": "dev-off"})


def test_http_proxy_survives_garbage_and_a_dead_upstream(net: NetworkThread) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proxy = HttpFaultProxy("127.0.0.1", dead)
    net.run(proxy.start())
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as s:
        s.sendall(b"\x00garbage without a blank line")
        s.shutdown(socket.SHUT_WR)
        assert s.recv(100) == b""
    with pytest.raises(httpx.HTTPError):
        httpx.get(f"{proxy.url}/m/x", headers={"X-Edgefleet-Device": "d"})
    assert proxy.bad_requests == 1
