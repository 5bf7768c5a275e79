"""The CLI's nouns and verbs against a real server: devices get/describe/delete/tag, models
show/pull, telemetry, the shared --token, and progress bars only on a terminal."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from edgefleet.cli import app
from edgefleet.client import ApiClient, ApiError
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir, init_keys
from signing.manifest import ENVELOPE_NAME, verify_bundle

from .conftest import FakeDevice, make_bundle, register, upload, wait_for
from .test_cli_watch import ANSI, read_pty
from .test_rollout_flow import directives, serve, status
from .test_rollout_ops import create, fleet_on_old_model

EXE = str(Path(sys.executable).parent / "edgefleet")
runner = CliRunner()


def ef(server: ServerThread, *args: str, code: int = 0) -> Any:
    result = runner.invoke(app, [*args, "--server", server.url, "--json"])
    assert result.exit_code == code, result.output
    return json.loads(result.stdout if code == 0 else result.stderr)


def test_devices_get_describe_tag_delete(server: ServerThread, client: httpx.Client) -> None:
    register(client, "ops-1", site="lab", ring="1")
    register(client, "ops-2")
    assert ef(server, "devices", "get", "ops-1")["tags"] == {"site": "lab", "ring": "1"}
    both = ef(server, "devices", "get", "ops-1", "ops-2")
    assert [d["device_id"] for d in both] == ["ops-1", "ops-2"]
    assert ef(server, "devices", "describe", "ops-1")["inventory"] == {
        "capabilities": {},
        "slots": {},
        "active_slot": None,
        "shadow_sha256": None,
        "acceptance": {},
    }
    tagged = ef(server, "devices", "tag", "ops-1", "zone=eu", "ring-")
    assert tagged["tags"] == {"site": "lab", "zone": "eu"}
    assert client.get("/api/v1/devices/ops-1").json()["tags"] == {"site": "lab", "zone": "eu"}
    # changing a value needs --overwrite; refused, nothing changed
    refused = ef(server, "devices", "tag", "ops-1", "site=home", code=1)
    assert refused["error"]["code"] == "tag_exists"
    assert client.get("/api/v1/devices/ops-1").json()["tags"]["site"] == "lab"
    assert ef(server, "devices", "tag", "ops-1", "site=home", "--overwrite")["tags"]["site"] == "home"
    # the table views
    table = runner.invoke(app, ["devices", "get", "ops-1", "--server", server.url], env={"COLUMNS": "80"})
    assert table.exit_code == 0 and "site=home,zone=eu" in table.stdout
    described = runner.invoke(app, ["devices", "describe", "ops-1", "--server", server.url])
    assert "Hardware:" in described.stdout and "Deployment:" in described.stdout
    assert ef(server, "devices", "delete", "ops-2")["device_id"] == "ops-2"
    gone = ef(server, "devices", "get", "ops-2", code=1)
    assert gone == {"error": {"code": "device_not_found", "message": "device_not_found: no device ops-2"}}


def test_delete_refused_while_a_rollout_holds_the_device(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    _, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "cdel", 1)
    rid = create(client, "cdel", stages=[100], min_inferences=1)
    wait_for(lambda: all(directives(d, keydir) for d in devs.values()))
    refused = ef(server, "devices", "delete", "cdel-0", code=1)
    assert refused["error"]["code"] == "device_in_rollout" and rid in refused["error"]["message"]


def test_models_show_and_pull(
    server: ServerThread, client: httpx.Client, keydir: KeyDir, tmp_path: Path
) -> None:
    bundle = make_bundle(tmp_path, keydir.key("release"), name="shown", content=b"weights" * 500)
    pushed = ef(server, "models", "push", str(bundle), "--keys", str(keydir.path))
    shown = ef(server, "models", "show", "shown:1", "--keys", str(keydir.path))
    assert shown["model"]["sha256"] == pushed["sha256"]
    assert shown["signature"]["verified"] is True and shown["signature"]["form"] == "dsse"
    assert shown["signature"]["signers"] == [keydir.key("release").keyid]
    assert shown["tuf"]["listed"] is True and shown["tuf"]["hash_matches"] is True
    # against another trust root the same signature does not verify, and the output says why
    init_keys(tmp_path / "other")
    other = ef(server, "models", "show", "shown:1", "--keys", str(tmp_path / "other"))
    assert other["signature"]["verified"] is False and "unknown_key" in other["signature"]["reason"]
    unchecked = ef(server, "models", "show", "shown:1", "--keys", str(tmp_path / "none"))
    assert unchecked["signature"]["verified"] is None
    # uploaded without TUF metadata: signed, but not listed
    upload(client, make_bundle(tmp_path, keydir.key("release"), name="dsseonly"))
    assert ef(server, "models", "show", "dsseonly:1", "--keys", str(keydir.path))["tuf"]["listed"] is False
    text = runner.invoke(
        app, ["models", "show", "shown:1", "--keys", str(keydir.path), "--server", server.url]
    )
    assert text.exit_code == 0 and "verified" in text.stdout and "listed in targets" in text.stdout
    assert ef(server, "models", "show", "nope:1", code=1)["error"]["code"] == "model_not_found"
    assert ef(server, "models", "show", "noversion", code=2)["error"]["code"] == "usage_error"

    out = tmp_path / "pulled"
    pulled = ef(server, "models", "pull", "shown:1", "--out", str(out))
    assert pulled["sha256"] == pushed["sha256"]
    assert verify_bundle(out, keydir.trust_root().release_keys).ref == "shown:1"
    assert sorted(p.name for p in out.iterdir()) == sorted([ENVELOPE_NAME, "model.onnx"])
    assert ef(server, "models", "pull", "shown:1", "--out", str(out), code=1)["error"]["code"] == "failed"


def test_telemetry_command(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    _, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "tel", 2)
    rid = create(client, "tel", stages=[100], min_inferences=1)
    for dev in devs.values():
        serve(dev, wait_for(lambda dev=dev: directives(dev, keydir))[-1], inferences=5, errors=1)  # type: ignore[misc]
    wait_for(lambda: status(client, rid)["state"] in ("completed", "rolled_back"))
    rows = wait_for(lambda: [r for r in ef(server, "telemetry", "--model", "det:2") if r["inferences"] == 10])
    assert rows[0]["errors"] == 2 and rows[0]["hardware_id"] == "rpi4"
    assert ef(server, "telemetry", "--model", "det:2", "--hw", "jetson") == []
    per_stage = ef(server, "telemetry", "--rollout", rid)
    assert [r["stage"] for r in per_stage if r["model"] == "det:2"] == [0]  # the API's 0-based index
    table = runner.invoke(app, ["telemetry", "--rollout", rid, "--server", server.url], env={"COLUMNS": "80"})
    assert table.exit_code == 0 and all(len(line) <= 80 for line in table.stdout.splitlines())
    row = next(line for line in table.stdout.splitlines() if line.startswith("det:2"))
    assert row.split()[1:6] == ["rpi4", "1", "2", "10", "2"]  # stage 1, as the CLI numbers stages


def test_token_is_uniform(make_server: Callable[..., ServerThread]) -> None:
    srv = make_server(auth_required=True)
    for cmd in (["rollouts", "list"], ["models", "list"], ["telemetry"], ["devices", "get", "x"]):
        denied = runner.invoke(app, [*cmd, "--server", srv.url, "--json"], env={"EDGEFLEET_TOKEN": ""})
        assert denied.exit_code == 1 and json.loads(denied.stderr)["error"]["code"] == "unauthenticated", cmd
        allowed = runner.invoke(app, [*cmd, "--server", srv.url, "--token", srv.admin_token, "--json"])
        expected = 1 if cmd[0] == "devices" else 0  # the device does not exist: but the token was taken
        assert allowed.exit_code == expected, allowed.output
        if expected:
            assert json.loads(allowed.stderr)["error"]["code"] == "device_not_found"
    via_env = runner.invoke(
        app,
        ["rollouts", "list", "--json"],
        env={"EDGEFLEET_TOKEN": srv.admin_token, "EDGEFLEET_SERVER": srv.url},
    )
    assert via_env.exit_code == 0 and json.loads(via_env.stdout) == []


def run_on_pty(args: list[str]) -> tuple[int, str]:
    """Run with stderr and stdout on a terminal; return the exit code and what the terminal showed."""
    master, slave = pty.openpty()
    proc = subprocess.Popen(args, stdout=slave, stderr=slave, env={**os.environ, "COLUMNS": "100"})
    os.close(slave)
    screen = read_pty(master)
    os.close(master)
    return proc.wait(10), ANSI.sub("", screen.decode(errors="replace"))


def test_push_and_pull_show_progress_only_on_a_terminal(
    server: ServerThread, keydir: KeyDir, tmp_path: Path
) -> None:
    big = make_bundle(tmp_path, keydir.key("release"), name="big", content=os.urandom(64 << 20))
    base = [EXE, "--debug", "models"]
    code, screen = run_on_pty([*base, "push", str(big), "--keys", str(keydir.path), "--server", server.url])
    assert code == 0, screen
    assert "uploading big-1-" in screen and "MB" in screen and "pushed big:1" in screen
    piped = subprocess.run(
        [*base, "pull", "big:1", "--out", str(tmp_path / "p1"), "--server", server.url],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert piped.returncode == 0 and piped.stderr == "" and "downloading" not in piped.stdout
    code, screen = run_on_pty([*base, "pull", "big:1", "--out", str(tmp_path / "p2"), "--server", server.url])
    assert code == 0 and "downloading model.onnx" in screen and "sha256 verified" in screen
    assert (tmp_path / "p2" / "model.onnx").read_bytes() == (big / "model.onnx").read_bytes()


def test_upload_progress_counts_every_byte_and_rewinds_on_refusal(
    server: ServerThread, keydir: KeyDir, tmp_path: Path
) -> None:
    release = keydir.key("release")
    bundle = make_bundle(tmp_path, release, name="counted", content=os.urandom(300_000))
    seen: list[int] = []
    with ApiClient(server.url) as api:
        api.push_bundle(bundle, release_keys=[release], progress=seen.append)
        assert sum(seen) == 300_000 and len(seen) > 1 and max(seen) <= 64 * 1024  # streamed in chunks
        tampered = make_bundle(tmp_path / "t", release, name="tampered", content=b"x" * 100_000)
        (tampered / "model.onnx").write_bytes(b"y" * 100_000)
        seen.clear()
        with pytest.raises(ApiError) as refused:
            api.push_bundle(tampered, release_keys=[release], progress=seen.append)
    assert refused.value.code == "digest_mismatch"
    assert seen[-1] == -100_000 and sum(seen) == 0  # the bar goes back to where it started
