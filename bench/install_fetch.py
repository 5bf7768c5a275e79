"""CPU per install on the device's side: the agent's install path against a real nginx mirror.

N devices (each its own :class:`HttpFetcher`, slots and TUF trust store, as N agents
have) each install two releases through the agent's real install path
(``device_agent.install.Installer``: python-tuf's release check in a worker thread,
envelope, resumable model download hashed as it streams, slot commit) from a
mirror tree the server's publisher wrote (``fleet_server.mirror``), served by
nginx. ``CONCURRENCY`` devices at a time on one event loop, as a simulated fleet
runs them. The figure is this process's CPU time (every thread, user + system)
per install: what a fleet worker pays for one install's downloads and checks,
without MQTT, model loading or telemetry. The model is random bytes (delivery
does not load it).

``python -m bench.install_fetch [N]``; ``--shared``: the devices' fetchers share one
``HttpClients`` (one pool for the whole process instead of one per device).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
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
from edgefleet.nginx import start_nginx
from fleet_server.mirror import BundleSource, DirectoryStorage, Publisher
from signing.keyring import KeyDir, init_keys
from signing.manifest import sign_bundle
from signing.targets import TargetCustom
from signing.tuf_release import target_name
from signing.tuf_repo import TufRepository

HW = "bench-hw"
TARGET = "arm64-cpu"
CONCURRENCY = 20
MODEL_KIB = 64
NOWHERE = "http://127.0.0.1:9"  # the directives' own URLs: every byte comes from the mirror


def _publish(tmp: Path) -> tuple[KeyDir, list[ModelRef], Path]:
    """Two releases of one model in a TUF repository, published as a mirror tree."""
    init_keys(tmp / "keys")
    keydir = KeyDir(tmp / "keys")
    repo = TufRepository.create(tmp / "tuf", keydir.tuf_root(), keydir.keys("release"), keydir.key("fleet"))
    refs, sources = [], []
    for release in (1, 2):
        bundle = tmp / f"bundle-{release}"
        bundle.mkdir()
        (bundle / "model.onnx").write_bytes(os.urandom(MODEL_KIB * 1024))
        fields = {
            "name": "bench",
            "version": str(release),
            "release": release,
            "target": TARGET,
            "hardware_ids": [HW],
        }
        manifest = sign_bundle(bundle, fields, ["model.onnx"], keydir.key("release"))
        f = manifest.model_file
        repo.add_target(
            target_name("bench", str(release)),
            bundle / "model.onnx",
            TargetCustom("bench", release, [HW]),
            keydir.keys("release"),
        )
        refs.append(
            ModelRef(
                name="bench",
                version=str(release),
                release=release,
                target=TARGET,
                sha256=f.sha256,
                length=f.length,
                model_url=f"{NOWHERE}/m",
                envelope_url=f"{NOWHERE}/e",
            )
        )
        sources.append(BundleSource(f.sha256, bundle, "model.onnx"))
    repo.publish(keydir.key("fleet"))
    Publisher(DirectoryStorage(tmp / "mirror"), repo.path, lambda: sources).publish()
    return keydir, refs, tmp / "mirror"


async def _no_move(trigger: Trigger, detail: str | None) -> None:
    return None


async def _fleet(n: int, work: Path, keydir: KeyDir, refs: list[ModelRef], mirror: str, shared: bool) -> None:
    clients: Any = None
    if shared:
        from device_agent.http_clients import HttpClients

        clients = HttpClients()
    gate = asyncio.Semaphore(CONCURRENCY)
    trust = keydir.trust_root()
    fetchers: list[HttpFetcher] = []

    async def one(i: int) -> None:
        device = f"dev-{i}"
        config = AgentConfig(
            device_id=device,
            hardware_id=HW,
            data_dir=work / device,
            trust_path=keydir.trust_path,
            tuf_root_path=keydir.tuf_root_path,
            targets=[TARGET],
            mirrors=[mirror],
            delivery_retry_s=30.0,
        )
        fetcher = HttpFetcher(device, clients=clients) if shared else HttpFetcher(device)
        fetchers.append(fetcher)
        slots = SlotStore(config.data_dir)
        installer = Installer(
            config,
            slots,
            fetcher,
            release_keys=lambda: trust.release_keys,
            fit=lambda: DeviceFit(HW, (TARGET,), frozenset({TARGET})),
            trust_store=TrustStore(slots.data_dir / "trust", keydir.tuf_root()),
            now=lambda: datetime.now(UTC),
            clock=time.time,
        )
        async with gate:
            for ref in refs:
                await installer.install(ref, _no_move)

    await asyncio.gather(*(one(i) for i in range(n)))
    for f in fetchers:  # the agent closes its fetcher when it stops (a fetcher before that had none)
        close = getattr(f, "aclose", None)
        if close is not None:
            await close()
    if clients is not None:
        await clients.aclose()


def measure(n: int, shared: bool = False) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        keydir, refs, tree = _publish(tmp)
        with start_nginx(tree, workers=1) as nginx:
            asyncio.run(_fleet(2, tmp / "warm", keydir, refs, nginx.url, shared))  # imports, first use
            time.sleep(1.2)  # nginx flushes its access log every second
            before = len(nginx.requests())
            cpu0, wall0 = time.process_time(), time.monotonic()
            asyncio.run(_fleet(n, tmp, keydir, refs, nginx.url, shared))
            cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
            time.sleep(1.2)
            requests = len(nginx.requests()) - before
    installs = n * len(refs)
    return {
        "devices": n,
        "installs": installs,
        "shared_pool": shared,
        "cpu_ms_per_install": round(1000 * cpu / installs, 2),
        "wall_s": round(wall, 1),
        "requests_per_install": round(requests / installs, 1),
        "load": [round(x, 1) for x in os.getloadavg()],
    }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.install_fetch", description=__doc__.split("\n")[0])
    parser.add_argument("devices", type=int, nargs="?", default=200)
    parser.add_argument("--shared", action="store_true", help="one HttpClients for every device's fetcher")
    args = parser.parse_args()
    print(json.dumps(measure(args.devices, args.shared)))


if __name__ == "__main__":
    main()
