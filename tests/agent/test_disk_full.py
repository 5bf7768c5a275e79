"""A REAL full filesystem under the agent: a small tmpfs mounted on its data dir (root only).

The free-space check passes, then something else fills the disk mid-download
(ENOSPC on the next write). The install must fail ``disk_full`` with its partial
file removed, the old model must keep serving, ``state.json`` must stay valid,
the failure must be reported; telemetry on the full disk is dropped and counted,
never a crash; and once space is back, updates and telemetry resume.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from device_agent import protocol
from device_agent.agent import Agent
from device_agent.telemetry_store import BatchStore
from edgefleet.broker import BrokerInfo
from signing.keyring import KeyDir

from .harness import (
    ArtifactServer,
    LoopThread,
    Observer,
    X,
    agent_config,
    make_bundle,
    sign_directive,
    start_agent,
    unique_id,
    wait_for,
)

DS = protocol.DeploymentState


@contextlib.contextmanager
def small_fs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` on ``path``; skip (with the reason) when that is not possible."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs (a real full filesystem)")
    if shutil.which("mount") is None:
        pytest.skip("no mount(8) on this machine")
    path.mkdir(parents=True, exist_ok=True)
    res = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip() or res.returncode}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(directory: Path) -> Path:
    """Write a ballast file until the filesystem refuses (ENOSPC); return it."""
    ballast = directory / f"ballast-{uuid.uuid4().hex[:6]}"
    block = b"\xa5" * (64 << 10)
    with open(ballast, "wb", buffering=0) as fh:
        with contextlib.suppress(OSError):
            while True:
                fh.write(block)
        with contextlib.suppress(OSError):
            while True:  # the last few pages
                fh.write(block[:4096])
    assert shutil.disk_usage(directory).free < 64 << 10
    return ballast


def test_telemetry_store_on_a_full_disk_drops_and_counts(tmp_path: Path) -> None:
    with small_fs(tmp_path / "fs", "1m") as fs:
        store = BatchStore(fs / "telemetry.db")
        store.put("first", lambda dropped: b"x" * 100)
        ballast = fill(fs)
        dropped = 0
        for i in range(20):  # incompressible, page-sized payloads: SQLite must grow its files
            dropped += store.put(f"full-{i}", lambda d: os.urandom(8192))
        assert dropped >= 1 and store.dropped_total == dropped  # counted, no exception
        assert len(store) + dropped == 21
        ballast.unlink()
        store.put("after", lambda d: json.dumps({"dropped": d}).encode())
        rows = store.oldest(100)
        assert rows[-1][1] == "after" and json.loads(rows[-1][2])["dropped"] == dropped
        assert store.dropped_total == dropped and store.pending_dropped == 0
        store.close()


def test_disk_fills_mid_download_fails_cleanly_and_recovers(
    broker_info: BrokerInfo,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    loop_thread: LoopThread,
) -> None:
    fleet, release = keydir.key("fleet"), keydir.key("release")
    small = make_bundle(tmp_path / "b", release, seed=1)
    big = make_bundle(tmp_path / "b", release, seed=2, version="2", width=2048)  # ~512 KB
    artifacts.add(small)
    artifacts.add(big)
    dev = unique_id("full")
    with small_fs(tmp_path / "data", "4m") as data:
        cfg = agent_config(
            broker_info,
            data,
            keydir.trust_path,
            dev,
            min_free_disk_bytes=0,  # let the download start; the disk fills while it runs
            download_max_bytes_per_s=big.length // 2,  # ~2 s, flushed chunk by chunk
            telemetry_interval=0.3,
        )
        agent = start_agent(loop_thread, Agent(cfg, keydir.trust_root()))
        try:
            observer.publish(dev, sign_directive(fleet, dev, 1, artifacts.model_ref(small)))
            observer.wait_event(dev, DS.SERVING, seq=1)
            observer.publish(dev, sign_directive(fleet, dev, 2, artifacts.model_ref(big)))
            part = data / "slots" / "b" / f"{big.sha256}.part"
            wait_for(lambda: part.exists() and part.stat().st_size > 0, what="download under way")
            ballast = fill(data)
            failed = observer.wait_event(dev, DS.FAILED, seq=2, timeout=20)
            assert failed.reason == "disk_full", (failed.reason, failed.detail)
            assert not part.exists() and not list((data / "slots" / "b").iterdir())  # partial removed
            # still serving the old model; the state file is whole and says so
            for _ in range(50):
                assert agent.infer(X).model_sha256 == small.sha256
            state = json.loads((data / "state.json").read_text())
            assert state["slots"][state["active"]]["sha256"] == small.sha256
            assert state["slots"]["b"] is None and state["deployment"]["error"] == "disk_full"
            rep = wait_for(
                lambda: [r for r in observer.reported(dev) if r.last_rejection and r.last_rejection.seq == 2],
                what="Reported with the failure",
            )[-1]
            assert rep.last_rejection is not None and rep.last_rejection.reason == "disk_full"
            assert rep.running is not None and rep.running.sha256 == small.sha256
            # the space the partial download had is free again: take it, so the disk stays full
            fill(data)
            for _ in range(3):  # telemetry windows close on the full disk: no crash
                for _ in range(20):
                    agent.infer(X)
                wait_for(lambda: agent.telemetry.window_inferences == 0, what="window cut")
            assert all(not t.done() for t in agent._tasks), "a background loop died on the full disk"
            # A directive for the model it already serves (a rollback) needs no space: it is done and
            # reported serving, though its outcome cannot be written to the full disk.
            writes_failed = agent.metrics.get("state_write_failures", 0)
            observer.publish(dev, sign_directive(fleet, dev, 3, artifacts.model_ref(small)))
            observer.wait_event(dev, DS.SERVING, seq=3, timeout=20)
            assert agent.metrics["state_write_failures"] == writes_failed + 1
            assert agent.infer(X).model_sha256 == small.sha256
            # space comes back: the update goes through, and telemetry (with its loss count) arrives
            for f in data.glob("ballast-*"):
                f.unlink()
            del ballast
            observer.publish(dev, sign_directive(fleet, dev, 4, artifacts.model_ref(big)))
            observer.wait_event(dev, DS.SERVING, seq=4, timeout=20)
            assert agent.infer(X).model_sha256 == big.sha256
            dropped = agent.metrics["telemetry_dropped_batches"]
            assert dropped >= 1  # the windows closed on the full disk were dropped and counted
            wait_for(
                lambda: (
                    sum(b.dropped_batches for b in observer.telemetry(dev)) == dropped
                    and any(big.sha256 in b.models for b in observer.telemetry(dev))
                ),
                what="telemetry after the disk emptied, carrying the drop count",
            )
        finally:
            loop_thread.run(agent.stop())
