"""`edgefleet broker config --shards N` and `edgefleet devices provision --shards`: N brokers from one
CA, each device written for the one shard its id hashes to, its password in that shard's file only."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.cli import app
from fleet_server.shards import assign, load_shards
from signing.keyring import init_keys

runner = CliRunner()
NOPASS = "--insecure-no-passphrase"


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    init_keys(tmp_path / "keys")
    return tmp_path / "keys"


def _config(out: Path, keys: Path, *extra: str) -> list[dict[str, str]]:
    r = runner.invoke(
        app,
        ["broker", "config", "--out", str(out), "--hostname", "mqtt.example", "--keys", str(keys),
         "--shards", "3", *extra, NOPASS, "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    return list(json.loads(r.stdout)["shards"])


def test_three_shards_from_one_ca_and_devices_on_their_own(tmp_path: Path, keys: Path) -> None:
    out = tmp_path / "brokers"
    files = _config(out, keys, "--auth", "password")
    shards = load_shards(out / "shards.json")
    assert [s.name for s in shards] == ["shard-0", "shard-1", "shard-2"]
    assert [(s.port, f["server_port"]) for s, f in zip(shards, files, strict=True)] == [
        (8883, "8884"), (8885, "8886"), (8887, "8888")
    ]  # fmt: skip
    cas = {(out / s.name / "ca.crt").read_bytes() for s in shards}
    assert len(cas) == 1  # one fleet CA: a device certificate is good on every shard
    for s in shards:
        conf = (out / s.name / "mosquitto.conf").read_text()
        assert f"listener {s.port} " in conf and f"persistence_location {out / s.name / 'data'}/" in conf
        assert s.server_credentials == out / s.name / "fleet-server.json"
        assert json.loads(s.server_credentials.read_text())["port"] == s.port + 1

    placed = {}
    for i in range(12):
        device = f"cam-{i}"
        r = runner.invoke(
            app,
            ["devices", "provision", device, "--hw", "rpi4", "--keys", str(keys), "--shards",
             str(out / "shards.json"), "--out", str(tmp_path / device), NOPASS, "--json"],
        )  # fmt: skip
        assert r.exit_code == 0, r.output
        shard = assign(device, ["shard-0", "shard-1", "shard-2"])
        placed[device] = shard
        assert json.loads(r.stdout)["shard"] == shard
        toml = tomllib.loads((tmp_path / device / "agent.toml").read_text())["agent"]
        port = {s.name: s.port for s in shards}[shard]
        assert (toml["mqtt_host"], toml["mqtt_port"]) == ("mqtt.example", port)
        assert toml["mqtt_username"] == device  # password mode: the shards' password files
        boot = json.loads((tmp_path / device / "bootstrap.json").read_text())
        assert boot["broker"]["shard"] == shard and boot["broker"]["port"] == port
    assert len(set(placed.values())) > 1
    for s in shards:
        users = {ln.split(":")[0] for ln in (out / s.name / "passwd").read_text().splitlines()}
        assert users == {d for d, shard in placed.items() if shard == s.name}


def test_mtls_shards_need_no_per_device_state(tmp_path: Path, keys: Path) -> None:
    out = tmp_path / "brokers"
    _config(out, keys, "--auth", "mtls")
    assert all(s.password_file is None for s in load_shards(out / "shards.json"))
    r = runner.invoke(
        app,
        ["devices", "provision", "cam-1", "--hw", "rpi4", "--keys", str(keys), "--shards",
         str(out / "shards.json"), "--out", str(tmp_path / "cam-1"), NOPASS, "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    assert "mqtt_cert_file" in tomllib.loads((tmp_path / "cam-1" / "agent.toml").read_text())["agent"]


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["--broker-host", "x", "--shards", "s.json"], "one of them"),
        ([], "one of them"),
        (["--shards", "missing.json"], "cannot read the shards file"),
    ],
)
def test_provision_needs_exactly_one_broker_source(
    tmp_path: Path, keys: Path, args: list[str], why: str
) -> None:
    r = runner.invoke(
        app,
        ["devices", "provision", "cam-1", "--hw", "rpi4", "--keys", str(keys), "--out", str(tmp_path / "c"),
         *[str(tmp_path / a) if a.endswith(".json") else a for a in args], NOPASS],
    )  # fmt: skip
    assert r.exit_code == 2, r.output
    assert why in " ".join(r.output.split())
    assert not (tmp_path / "c").exists()


def test_shard_ports_that_collide_are_refused(tmp_path: Path, keys: Path) -> None:
    r = runner.invoke(
        app,
        ["broker", "config", "--out", str(tmp_path / "b"), "--hostname", "h", "--keys", str(keys),
         "--shards", "2", "--port", "8883", "--server-port", "8885", NOPASS],
    )  # fmt: skip
    assert r.exit_code == 1 and "collide" in " ".join(r.output.split()), r.output
