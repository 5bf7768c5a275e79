"""Power loss: kill -9 the real agent process at each update state, many times, and restart it.

Every time, the restarted agent must serve a valid model at once (the old or the
new, never none), finish the update, and report what is really true (running
hash = active slot = what its local API answers with). ``EDGEFLEET_AGENT_STALL``
holds the agent in a state long enough to kill it there; downloads are killed
mid-stream (bandwidth cap) so the restart has a partial file to resume.
Repeats per state: ``EDGEFLEET_POWER_LOSS_REPEATS`` (default 3). The same runs in TUF
mode (release metadata checked against a served TUF repository, trust state on disk)
once per state (``EDGEFLEET_POWER_LOSS_TUF_REPEATS``, default 1).
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from device_agent import protocol
from device_agent.local_api import unix_request
from edgefleet.broker import BrokerInfo
from signing.keyring import KeyDir

from .harness import (
    ArtifactServer,
    Bundle,
    Observer,
    TufServer,
    make_bundle,
    mqtt_toml,
    sign_directive,
    unique_id,
    wait_for,
)

DS = protocol.DeploymentState
REPO = Path(__file__).resolve().parents[2]
REPEATS = int(os.environ.get("EDGEFLEET_POWER_LOSS_REPEATS", "3"))
TUF_REPEATS = int(os.environ.get("EDGEFLEET_POWER_LOSS_TUF_REPEATS", "1"))
STATES = ["downloading", "verifying", "installing", "warming", "swapping", "probation"]


def _write_conf(path: Path, dev: str, data: Path, trust: Path, broker: BrokerInfo, **extra: Any) -> Path:
    lines = [
        "[agent]",
        f'device_id = "{dev}"',
        'hardware_id = "rpi4"',
        f'data_dir = "{data}"',
        f'trust_path = "{trust}"',
        mqtt_toml(broker, dev).rstrip("\n"),
        f"mqtt_version = {broker.mqtt_version}",
        "telemetry_interval = 0.5",
        f'api_listen = "unix:{data / "api.sock"}"',
        'log_format = "text"',
    ]
    lines += [f"{k} = {json.dumps(v)}" for k, v in extra.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def _spawn(conf: Path, stall: str = "", hz: float = 0.0) -> subprocess.Popen[bytes]:
    env = dict(os.environ, EDGEFLEET_AGENT_STALL=stall)
    cmd = [sys.executable, "-m", "device_agent", "--config", str(conf), "--workload-hz", str(hz)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stderr=subprocess.DEVNULL)


def _api(data: Path, method: str, url: str) -> tuple[int, Any] | None:
    try:
        return unix_request(str(data / "api.sock"), method, url)
    except OSError:
        return None


def _has_bytes(path: Path) -> bool:
    return path.exists() and path.stat().st_size > 0


def _finished(observer: Observer, dev: str, seq: int) -> bool:
    return any(r.deployment_seq == seq and r.deployment_state == DS.SERVING for r in observer.reported(dev))


def _stop(proc: subprocess.Popen[bytes], kill: bool = False) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
    proc.wait(20)


def _kill_at_each_state(
    broker_info: BrokerInfo,
    keydir: KeyDir,
    tmp_path: Path,
    artifacts: ArtifactServer,
    observer: Observer,
    old: Bundle,
    new: Bundle,
    repeats: int,
    mode: dict[str, Any],
) -> None:
    """Install ``old`` cleanly once, then per state and repeat: start the update to ``new``,
    kill -9 the agent in that state, restart it, and check it serves and finishes the truth."""
    fleet = keydir.key("fleet")

    def ref(b: Bundle) -> protocol.ModelRef:
        return artifacts.model_ref(b, release=int(b.version))

    # one device installs the old model cleanly; every trial starts from a copy of its disk
    template = tmp_path / "template"
    dev0 = unique_id()
    proc = _spawn(_write_conf(tmp_path / "t.toml", dev0, template, keydir.trust_path, broker_info, **mode))
    try:
        observer.publish(dev0, sign_directive(fleet, dev0, 1, ref(old)))
        observer.wait_event(dev0, DS.SERVING, seq=1, timeout=30)
    finally:
        _stop(proc)
    (template / "api.sock").unlink(missing_ok=True)
    probation = protocol.Probation(seconds=0.2, min_inferences=5)
    outcomes: dict[str, list[str]] = {}
    for state in STATES:
        for trial in range(repeats):
            dev = unique_id(f"{state[:4]}{trial}")
            data = tmp_path / dev
            shutil.copytree(template, data)
            extra: dict[str, Any] = dict(mode)
            if state == "downloading":
                extra["download_max_bytes_per_s"] = max(256, new.length // 4)
            conf = _write_conf(tmp_path / f"{dev}.toml", dev, data, keydir.trust_path, broker_info, **extra)
            stall = "" if state in ("downloading", "probation") else f"{state}:60"
            proc = _spawn(conf, stall=stall)
            try:
                observer.publish(dev, sign_directive(fleet, dev, 2, ref(new), probation=probation))
                observer.wait_event(dev, DS(state), seq=2, timeout=30)
                if state == "downloading":
                    part = data / "slots" / "b" / f"{new.sha256}.part"
                    wait_for(functools.partial(_has_bytes, part), timeout=20, what="partial")
            finally:
                _stop(proc, kill=True)  # power loss
            state_json = json.loads((data / "state.json").read_text())  # never torn
            assert state_json["slots"][state_json["active"]] is not None
            if mode:  # TUF mode: the trust state is never torn either
                assert json.loads((data / "trust" / "state.json").read_text())["root_version"] >= 1
            proc = _spawn(_write_conf(conf, dev, data, keydir.trust_path, broker_info, **mode), hz=50)
            try:
                first = wait_for(functools.partial(_api, data, "GET", "/v1/model"), timeout=30, what="api up")
                assert first[0] == 200 and first[1]["model_sha256"] in (old.sha256, new.sha256), first
                outcomes.setdefault(state, []).append(first[1]["model_version"])
                wait_for(
                    functools.partial(_finished, observer, dev, 2),
                    timeout=30,
                    what=f"{dev} finishing the update after a kill in {state}",
                )
                status, doc = _api(data, "GET", "/v1/model") or (0, {})
                assert status == 200 and doc["model_sha256"] == new.sha256
                rep = [r for r in observer.reported(dev) if r.deployment_seq == 2][-1]
                assert rep.running is not None and rep.running.sha256 == new.sha256
                assert rep.slots[rep.active_slot or ""] == new.sha256
                final = json.loads((data / "state.json").read_text())
                assert final["slots"][final["active"]]["sha256"] == new.sha256
                assert final["probation"] is None and final["deployment"]["state"] == "serving"
                if mode:
                    assert json.loads((data / "trust" / "state.json").read_text())["last_seq"] == 2
            finally:
                _stop(proc)
    # after a kill mid-probation the new model was active and kept being watched
    assert set(outcomes["probation"]) == {"2"}
    assert set(outcomes["downloading"]) == {"1"}


@pytest.mark.slow
def test_kill_9_at_each_update_state_then_restart(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path, artifacts: ArtifactServer, observer: Observer
) -> None:
    release = keydir.key("release")
    old = make_bundle(tmp_path, release, seed=1)
    new = make_bundle(tmp_path, release, seed=2, version="2")
    artifacts.add(old)
    artifacts.add(new)
    _kill_at_each_state(broker_info, keydir, tmp_path, artifacts, observer, old, new, REPEATS, {})


@pytest.mark.slow
def test_kill_9_at_each_update_state_then_restart_tuf_mode(
    broker_info: BrokerInfo, keydir: KeyDir, tmp_path: Path, artifacts: ArtifactServer, observer: Observer
) -> None:
    release = keydir.key("release")
    old = make_bundle(tmp_path, release, seed=1)
    new = make_bundle(tmp_path, release, seed=2, version="2")
    tuf = TufServer(tmp_path / "www", keydir)
    try:
        for b in (old, new):
            artifacts.add(b)
            tuf.release(b)
        mode = {"tuf_root_path": str(keydir.tuf_root_path), "tuf_url": tuf.url}
        _kill_at_each_state(broker_info, keydir, tmp_path, artifacts, observer, old, new, TUF_REPEATS, mode)
    finally:
        tuf.close()
