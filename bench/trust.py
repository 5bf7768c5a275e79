"""Delivering a 100 MiB release through TUF vs raw ``hashlib.sha256`` over the same file (target <= 1.2x).

Rows:

- ``Updater.download_target``: python-tuf's own path (refresh, download into a
  temporary file, hash it, copy it to the slot). Three passes over the bytes
  plus HTTP; shown so the cost of that convenience is on the table.
- ``check_target`` + one streamed pass: TUF verifies the metadata (signatures,
  versions, expiry, length, hash to expect), then the bytes are streamed from
  HTTP into the slot file while being hashed and length-capped, read once. This
  is the path the agent should take (its downloader already streams and resumes).
- the agent's install path: ``device_agent.delivery.verify_release`` (a fresh
  Updater, agreement of directive and release metadata, revocation floor, trust
  state written atomically) + ``device_agent.downloader.download_model`` (httpx,
  resumable, hashed and length-capped while streaming into the slot).

Both fetch from a real HTTP server (``python -m http.server``, another process) on loopback.
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import urllib3

from edgefleet.ports import free_port, launch, start_on_free_port
from signing.errors import DigestMismatch, EndlessData, LengthMismatch
from signing.keyring import KeyDir, init_keys
from signing.targets import TargetCustom, VerifiedTarget
from signing.tuf_client import check_target, fetch_target
from signing.tuf_release import target_name
from signing.tuf_repo import TufRepository

SIZE = 100 * 1024 * 1024
CHUNK = 1 << 20
NAME = "big/model.onnx"
AGENT_NAME = target_name("big", "1")


def _raw_sha(path: Path) -> None:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    h.hexdigest()


def _stream(pool: urllib3.PoolManager, url: str, dest: Path, target: VerifiedTarget) -> None:
    """One pass: HTTP -> hash + slot file, never more than the signed length."""
    h = hashlib.sha256()
    n = 0
    resp = pool.request("GET", url, preload_content=False)
    try:
        with open(dest, "wb") as out:
            for chunk in resp.stream(CHUNK):
                n += len(chunk)
                if n > target.length:
                    raise EndlessData(f"more than the signed {target.length} bytes")
                h.update(chunk)
                out.write(chunk)
    finally:
        resp.release_conn()
    if n != target.length:
        raise LengthMismatch(f"{n} bytes, signed {target.length}")
    if h.hexdigest() != target.sha256:
        raise DigestMismatch("sha256 differs from the signed target")


def _agent_install(url: str, served: Path, slot: Path, trust_dir: Path, pinned: bytes) -> None:
    """What the agent does for one directive, minus MQTT: TUF check + checks, then one streamed pass."""
    import asyncio

    import httpx

    from device_agent import wire
    from device_agent.delivery import verify_release
    from device_agent.downloader import download_model
    from device_agent.trust_state import TrustStore

    store = TrustStore(trust_dir, pinned)
    h = hashlib.sha256()  # the directive's hash/length come from the server; here: the signed ones
    with open(served, "rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    ref = wire.ModelRef(
        name="big", version="1", release=1, target="arm64-cpu", sha256=h.hexdigest(),
        length=served.stat().st_size, model_url=url, envelope_url=url,
    )  # fmt: skip
    t0 = time.perf_counter()
    verify_release(store, url.rsplit("/targets/", 1)[0], ref, "x")

    async def fetch() -> None:
        async with httpx.AsyncClient(timeout=30) as client:
            await download_model(client, url, slot, length=ref.length, sha256=ref.sha256, device_id="bench")

    asyncio.run(fetch())
    _AGENT_TIMES.append(time.perf_counter() - t0)


_AGENT_TIMES: list[float] = []


def run(repeats: int = 3) -> list[dict[str, object]]:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        init_keys(root / "keys")
        keys = KeyDir(root / "keys")
        src = root / "model.onnx"
        with open(src, "wb") as fh:
            for _ in range(SIZE // CHUNK):
                fh.write(os.urandom(CHUNK))
        repo = TufRepository.create(root / "www", keys.tuf_root(), keys.keys("release"), keys.key("fleet"))
        repo.add_target(NAME, src, TargetCustom("big", 1, ["x"]), keys.keys("release"))
        repo.add_target(AGENT_NAME, src, TargetCustom("big", 1, ["x"]), keys.keys("release"))
        repo.publish(keys.key("fleet"))
        served = repo.target_file(NAME)

        # the repository is served by another process, as on a real fleet (no GIL shared with the device)
        def serve() -> tuple[subprocess.Popen[bytes], int]:
            # http.server takes its port on the command line: a port taken first costs a new one
            port = free_port()
            cmd = [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"]
            proc, log = launch([*cmd, "--directory", str(root / "www")], root / "http.log", [port])
            log.close()  # the child holds its own copy
            return proc, port

        server, port = start_on_free_port(serve)
        url = f"http://127.0.0.1:{port}"
        pinned = keys.tuf_root()
        pool = urllib3.PoolManager()
        raw, tuf_dl, streamed = [], [], []
        try:
            for i in range(repeats):
                t = time.perf_counter()
                _raw_sha(served)
                raw.append(time.perf_counter() - t)
                t = time.perf_counter()
                fetch_target(NAME, root / "slot-a", trusted_root=pinned, cache_dir=root / f"cache-a{i}",
                             metadata_url=f"{url}/metadata/", targets_url=f"{url}/targets/")  # fmt: skip
                tuf_dl.append(time.perf_counter() - t)
                t = time.perf_counter()
                target = check_target(NAME, trusted_root=pinned, cache_dir=root / f"cache-b{i}",
                                      metadata_url=f"{url}/metadata/")  # fmt: skip
                rel = served.relative_to(root / "www").as_posix()
                _stream(pool, f"{url}/{rel}", root / "slot-b", target)
                streamed.append(time.perf_counter() - t)
                agent_rel = repo.target_file(AGENT_NAME).relative_to(root / "www").as_posix()
                slot = root / f"slot-c{i}.part"
                _agent_install(f"{url}/{agent_rel}", served, slot, root / f"trust-c{i}", pinned)
                slot.unlink()
        finally:
            server.terminate()
            server.wait(10)
    base = statistics.median(raw)
    rows = []
    for label, times in (
        ("TUF Updater.download_target 100 MiB over HTTP", tuf_dl),
        ("TUF check_target + 1-pass streamed download 100 MiB", streamed),
        ("agent install path: verify_release + downloader 100 MiB", _AGENT_TIMES),
    ):
        mine = statistics.median(times)
        rows.append(
            {
                "bench": label,
                "baseline": "hashlib.sha256",
                "baseline_ms": round(base * 1e3, 1),
                "edgefleet_ms": round(mine * 1e3, 1),
                "ratio": round(mine / base, 3),
                "target": "<= 1.2",
            }
        )
    return rows


if __name__ == "__main__":
    for row in run():
        print(row)
