"""Static delivery: HTTP requests and fleet-server CPU-seconds per 1,000 installs, server path vs mirror.

Both rows run the agent's real install path (``device_agent.install.Installer``: TUF
release check through python-tuf, envelope, resumable model download, hashing, slot
commit) for ``installs`` fresh devices in TUF mode, ``concurrency`` at a time, against a
real fleet server in its own process (production broker, TUF release pushed through its
API). The same nginx counts the requests in both rows (its access log), so the method is
the same before and after:

- baseline: devices download from the fleet server (the directive's URLs), through an
  nginx that proxies every request to it, as a deployment fronts the server;
- edgefleet: devices list one mirror, an nginx serving the tree the server published
  (``fleet_server.mirror``); the server is not asked for anything.

Server CPU is the server process's user + system time (``/proc/<pid>/stat``) over the
install phase only; nginx's CPU is shown beside it. The model is ``model_kib`` of random
bytes: delivery does not load it.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from device_agent.config import AgentConfig
from device_agent.deployment import Trigger
from device_agent.http_fetcher import HttpFetcher
from device_agent.install import Installer
from device_agent.judgement import DeviceFit
from device_agent.slots import SlotStore
from device_agent.trust_state import TrustStore
from device_agent.wire import ModelRef
from edgefleet.broker import server_mqtt_settings, start_secure_broker
from edgefleet.client import ApiClient
from edgefleet.nginx import Nginx, start_nginx
from edgefleet.sim_harness import ServerPort, ServerProcess
from fleet_server.settings import ServerSettings
from signing.keyring import KeyDir, init_keys
from signing.manifest import sign_bundle

HW = "bench-hw"
TARGET = "arm64-cpu"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _nginx_cpu(server: Nginx) -> float:
    """The master and its workers (children of the master)."""
    pids = [server.proc.pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(stat[1]) == server.proc.pid:
                pids.append(int(entry.name))
    return sum(_cpu_seconds(p) for p in pids)


async def _no_move(trigger: Trigger, detail: str | None) -> None:
    return None


async def _install_all(
    work: Path, keydir: KeyDir, ref: ModelRef, mirrors: list[str], installs: int, concurrency: int
) -> None:
    gate = asyncio.Semaphore(concurrency)
    trust = keydir.trust_root()

    async def one(i: int) -> None:
        async with gate:
            device = f"bench-{'m' if mirrors else 's'}-{i}"
            config = AgentConfig(
                device_id=device,
                hardware_id=HW,
                data_dir=work / device,
                trust_path=keydir.trust_path,
                tuf_root_path=keydir.tuf_root_path,
                targets=[TARGET],
                mirrors=mirrors,
                delivery_retry_s=30.0,
            )
            slots = SlotStore(config.data_dir)
            store = TrustStore(slots.data_dir / "trust", keydir.tuf_root())
            installer = Installer(
                config,
                slots,
                HttpFetcher(device),
                release_keys=lambda: trust.release_keys,
                fit=lambda: DeviceFit(HW, (TARGET,), frozenset({TARGET})),
                trust_store=store,
                now=lambda: datetime.now(UTC),
                clock=time.time,
            )
            await installer.install(ref, _no_move)

    await asyncio.gather(*(one(i) for i in range(installs)))


def _measure(
    label: str,
    server: ServerProcess,
    front: Nginx,
    work: Path,
    keydir: KeyDir,
    ref: ModelRef,
    mirrors: list[str],
    installs: int,
    concurrency: int,
) -> dict[str, float]:
    pid = server._proc.pid if server._proc is not None else 0
    before_lines = len(front.requests())
    cpu0, ng0, t0 = _cpu_seconds(pid), _nginx_cpu(front), time.monotonic()
    asyncio.run(_install_all(work / label, keydir, ref, mirrors, installs, concurrency))
    wall = time.monotonic() - t0
    cpu, ng = _cpu_seconds(pid) - cpu0, _nginx_cpu(front) - ng0
    lines = front.requests()[before_lines:]
    errors = [line for line in lines if not (" 200 " in line or " 206 " in line or " 404 " in line)]
    return {
        "requests_per_install": len(lines) / installs,
        "server_cpu_s_per_1000": cpu / installs * 1000,
        "nginx_cpu_s_per_1000": ng / installs * 1000,
        "wall_s": wall,
        "errors": len(errors),
    }


def run(installs: int = 300, concurrency: int = 16, model_kib: int = 512) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory(prefix="ef-bench-delivery-") as tmp:
        root = Path(tmp)
        root.chmod(0o711)
        init_keys(root / "keys")
        keydir = KeyDir(root / "keys")
        broker = start_secure_broker(root / "broker", auth="mtls")
        port = ServerPort()
        token = "ef_" + secrets.token_urlsafe(24)
        settings = ServerSettings(
            data_dir=root / "server",
            keys_dir=root / "keys",
            admin_token=token,
            **server_mqtt_settings(broker.info),
        )
        server = ServerProcess(settings, port, root / "server.log").start()
        try:
            bundle = root / "bundle"
            bundle.mkdir()
            (bundle / "model.onnx").write_bytes(os.urandom(model_kib * 1024))
            fields = {"name": "bench", "version": "1", "release": 1, "target": TARGET, "hardware_ids": [HW]}
            manifest = sign_bundle(bundle, fields, ["model.onnx"], keydir.key("release"))
            with ApiClient(server.url, token=token) as api:
                api.push_bundle(bundle, release_keys=[keydir.key("release")])
            with (
                start_nginx(None, proxy_to=server.url) as proxy,
                start_nginx(settings.mirror_dir) as mirror,
            ):
                base = f"{proxy.url}/api/v1/artifacts/{manifest.model_file.sha256}"
                ref = ModelRef(
                    name="bench",
                    version="1",
                    release=1,
                    target=TARGET,
                    sha256=manifest.model_file.sha256,
                    length=manifest.model_file.length,
                    model_url=base,
                    envelope_url=f"{base}/envelope",
                )
                common = (root, keydir, ref)
                direct = _measure("server", server, proxy, *common, [], installs, concurrency)
                mirrored = _measure("mirror", server, mirror, *common, [mirror.url], installs, concurrency)
        finally:
            server.stop()
            port.close()
            broker.stop()
    load = os.getloadavg()[0]
    rows = []
    for what, base_v, mine_v, unit in (
        ("requests per install", direct["requests_per_install"], mirrored["requests_per_install"], "req"),
        (
            "fleet-server CPU s per 1,000 installs",
            direct["server_cpu_s_per_1000"],
            mirrored["server_cpu_s_per_1000"],
            "s",
        ),
    ):
        rows.append(
            {
                "bench": f"static delivery: {what}",
                "baseline": "fleet server (behind an nginx proxy)",
                f"baseline_{unit}": round(base_v, 2),
                f"edgefleet_{unit}": round(mine_v, 2),
                "ratio": round(mine_v / base_v, 3) if base_v else None,
                "target": "server out of the download path",
                "installs": installs,
                "concurrency": concurrency,
                "model_kib": model_kib,
                "nginx_cpu_s_per_1000": f"{direct['nginx_cpu_s_per_1000']:.2f} -> "
                f"{mirrored['nginx_cpu_s_per_1000']:.2f}",
                "wall_s": f"{direct['wall_s']:.1f} -> {mirrored['wall_s']:.1f}",
                "errors": f"{direct['errors']} / {mirrored['errors']}",
                "load_1m": round(load, 2),
            }
        )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
