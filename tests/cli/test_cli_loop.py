"""The loop by hand, as a user types it: every step is an `edgefleet` process.

`edgefleet server` and `edgefleet agent` run as real processes against a real
Mosquitto; the admin commands talk to the server over HTTP; output is parsed
from `--json`.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from compiler.examples import make_nan_model, train_digits
from edgefleet.broker import Broker, server_mqtt_settings
from tests.agent.harness import mqtt_toml
from tests.support.waiting import wait_for

EXE = str(Path(sys.executable).parent / "edgefleet")


def ef(*args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([EXE, *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"edgefleet {' '.join(args)} -> {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def ef_json(*args: str) -> Any:
    return json.loads(ef(*args, "--json").stdout)


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[bytes]]]:
    procs: list[subprocess.Popen[bytes]] = []
    yield procs
    for p in procs:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 90) -> None:
    """Until ``url`` answers 200; fail at once, with the process's log, if ``proc`` exited first. The
    deadline is generous because it is only reached on a hang: a server process imports for seconds
    on a machine busy with the other test workers."""
    with httpx.Client(timeout=1) as probe:  # one TLS context for the wait, not one per poll
        wait_for(
            lambda: probe.get(url).status_code == 200,
            timeout,
            f"{url} to answer",
            interval=0.1,
            proc=proc,
            ignore=(httpx.HTTPError,),
            output=lambda: log.read_text()[-3000:],
        )


@pytest.mark.slow
def test_compile_push_rollout_with_real_processes(
    tmp_path: Path, mosquitto: Broker, processes: list[subprocess.Popen[bytes]]
) -> None:
    keys = tmp_path / "keys"
    ef("keys", "init", "--insecure-no-passphrase", "--dir", str(keys))
    ex = train_digits(tmp_path / "digits")

    # compile: a good model gives a bundle; a NaN model fails the gate, exit 1, no bundle
    out = ef_json(
        "compile", str(ex.model_path), "--calib", str(ex.calib_path), "--eval", str(ex.eval_path),
        "--name", "digits", "--version", "1", "--hw", "rpi4", "--keys", str(keys),
        "--out", str(tmp_path / "digits-1"),
    )  # fmt: skip
    assert out["ok"] and out["manifest"]["quantization"]["gate"]["verdict"] == "passed"
    make_nan_model(ex.model_path, tmp_path / "nan.onnx")
    bad = ef(
        "compile", str(tmp_path / "nan.onnx"), "--calib", str(ex.calib_path), "--name", "digits",
        "--version", "2", "--keys", str(keys), "--out", str(tmp_path / "digits-2"), check=False,
    )  # fmt: skip
    assert bad.returncode == 1 and "quality gate failed" in bad.stderr
    assert not (tmp_path / "digits-2").exists()

    # the server serves on a socket bound here and handed over (--fd): nothing can take the port
    # while the server process imports
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{held.getsockname()[1]}"
    env = {
        **os.environ,
        "EDGEFLEET_SERVER": url,
        "EDGEFLEET_TICK_INTERVAL": "0.2",
        "EDGEFLEET_AUTH_REQUIRED": "1",
    }
    # the production broker: the server comes in on its listener with fleet-server.json
    mqtt = server_mqtt_settings(mosquitto.info)
    with open(tmp_path / "server.log", "wb") as server_log:  # the child keeps its own copy
        server = subprocess.Popen(
            [EXE, "server", "--fd", str(held.fileno()), "--keys", str(keys),
             "--data-dir", str(tmp_path / "srv"),
             "--mqtt", f"{mqtt['mqtt_host']}:{mqtt['mqtt_port']}",
             *(["--mqtt-credentials", str(mqtt["mqtt_credentials"])] if "mqtt_credentials" in mqtt else []),
             "--public-url", url],
            env=env, stdout=server_log, stderr=subprocess.STDOUT, pass_fds=(held.fileno(),),
        )  # fmt: skip
    held.close()  # the server holds its own copy
    processes.append(server)
    wait_http(f"{url}/healthz", server, tmp_path / "server.log")
    os.environ["EDGEFLEET_SERVER"] = url
    try:
        # auth is on: without a token the CLI is refused; the bootstrap admin token was generated 0600
        denied = ef("devices", "list", check=False)
        assert denied.returncode == 1 and "unauthenticated" in denied.stderr
        os.environ["EDGEFLEET_TOKEN"] = (tmp_path / "srv" / "admin.token").read_text().strip()
        operator = ef_json("tokens", "create", "--name", "ci", "--role", "operator", "--json")
        os.environ["EDGEFLEET_TOKEN"] = operator["token"]
        ef("devices", "register", "cli-dev-1", "--hw", "rpi4", "--tag", "site=lab")
        (tmp_path / "agent.toml").write_text(
            "[agent]\n"
            'device_id = "cli-dev-1"\nhardware_id = "rpi4"\n'
            f'data_dir = "dev1"\ntrust_path = "{keys / "trust.json"}"\n'
            f'tuf_root_path = "{keys / "root.json"}"\n'
            + mqtt_toml(mosquitto.info, "cli-dev-1")
            + "telemetry_interval = 1.0\n"
        )
        with open(tmp_path / "agent.log", "wb") as agent_log:  # the child keeps its own copy
            agent = subprocess.Popen(
                [EXE, "agent", "--config", str(tmp_path / "agent.toml"), "--synthetic-load", "20"],
                stdout=agent_log,
                stderr=subprocess.STDOUT,
            )
        processes.append(agent)

        pushed = ef_json("models", "push", str(tmp_path / "digits-1"), "--keys", str(keys))
        assert pushed["name"] == "digits" and pushed["sha256"] == out["manifest"]["files"][0]["sha256"]
        assert [m["version"] for m in ef_json("models", "list")] == ["1"]
        # pushing a tampered bundle is refused with the reason, exit 1
        tampered = tmp_path / "tampered"
        tampered.mkdir()
        for f in (tmp_path / "digits-1").iterdir():
            data = f.read_bytes()
            (tampered / f.name).write_bytes(data[:-1] + b"\0" if f.suffix == ".onnx" else data)
        refused = ef("models", "push", str(tampered), "--keys", str(keys), check=False)
        assert refused.returncode == 1 and "digest_mismatch" in refused.stderr

        rollout = ef_json(
            "rollouts", "create", "--model", "digits:1", "--selector", "hw=rpi4,site=lab",
            "--stages", "100", "--soak", "0", "--min-inferences", "5",
        )  # fmt: skip
        status = json.loads(
            ef("rollouts", "status", str(rollout["id"]), "--watch", "--json", timeout=60).stdout
        )
        assert status["state"] == "completed", status
        assert status["devices"] == {"cli-dev-1": "done"}
        devices = ef_json("devices", "list")
        assert devices[0]["running_model"]["sha256"] == pushed["sha256"]
        assert devices[0]["tags"] == {"site": "lab"}
        # steering a finished rollout is refused, exit 1
        assert ef("rollouts", "pause", str(rollout["id"]), check=False).returncode == 1
        assert any(r["id"] == rollout["id"] for r in ef_json("rollouts", "list"))
        audit = ef_json("audit", "list", "--json")
        assert any(e["path"] == "/api/v1/models" and e["result"] == "digest_mismatch" for e in audit)
        assert {e["actor"] for e in audit} >= {"bootstrap-admin", f"{operator['id']}:ci"}
    finally:
        os.environ.pop("EDGEFLEET_SERVER", None)
        os.environ.pop("EDGEFLEET_TOKEN", None)
    agent.send_signal(signal.SIGTERM)
    assert agent.wait(15) == 0
