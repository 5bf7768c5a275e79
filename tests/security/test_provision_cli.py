"""`edgefleet broker config` and `edgefleet devices provision`: what they write, and bad input refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edgefleet.cli import app
from edgefleet.provision import ProvisionError, check_device_id, fleet_ca
from signing.keyring import KeyDir, init_keys
from signing.keys import KeyLocked

runner = CliRunner()
NOPASS = "--insecure-no-passphrase"


def _text(result: object) -> str:
    return " ".join(str(getattr(result, "output", "")).split())


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    init_keys(tmp_path / "keys")
    return tmp_path / "keys"


def test_broker_config_and_provision(tmp_path: Path, keys: Path) -> None:
    out = tmp_path / "broker"
    r = runner.invoke(
        app,
        [
            "broker",
            "config",
            "--out",
            str(out),
            "--hostname",
            "mqtt.example",
            "--keys",
            str(keys),
            NOPASS,
            "--json",
        ],
    )
    assert r.exit_code == 0, r.output
    conf = (out / "mosquitto.conf").read_text()
    for line in (
        "allow_anonymous false",
        "use_username_as_clientid true",
        "persistence true",
        "listener 8883",
    ):
        assert line in conf
    assert "pattern write ef/v1/%u/events" in (out / "acl").read_text()
    r = runner.invoke(
        app,
        ["devices", "provision", "cam-1", "--hw", "rpi4", "--broker-host", "mqtt.example",
         "--keys", str(keys), "--out", str(tmp_path / "cam-1"), "--password-file", str(out / "passwd"),
         NOPASS, "--json"],
    )  # fmt: skip
    assert r.exit_code == 0, r.output
    boot = json.loads((tmp_path / "cam-1" / "bootstrap.json").read_text())
    assert boot["broker"] == {"host": "mqtt.example", "port": 8883, "tls": True, "ca_file": "ca.crt"}
    # the server is in no password file: its certificate (server CA) on the server listener only
    assert [ln.split(":")[0] for ln in (out / "passwd").read_text().splitlines()] == ["cam-1"]
    again = runner.invoke(
        app, ["devices", "provision", "cam-1", "--hw", "rpi4", "--broker-host", "x", "--keys", str(keys),
              "--out", str(tmp_path / "cam-1"), NOPASS],
    )  # fmt: skip
    assert again.exit_code == 1 and "exists" in _text(again)


@pytest.mark.parametrize("device_id", ["bad/id", "a+", "#", "%u", "", "fleet-server", "x" * 200])
def test_bad_device_ids_are_refused(device_id: str) -> None:
    with pytest.raises(ProvisionError):
        check_device_id(device_id)


def test_bad_input_to_the_commands(tmp_path: Path, keys: Path) -> None:
    bad_auth = runner.invoke(
        app,
        [
            "broker",
            "config",
            "--out",
            str(tmp_path / "b"),
            "--hostname",
            "h",
            "--auth",
            "none",
            "--keys",
            str(keys),
            NOPASS,
        ],
    )
    assert bad_auth.exit_code == 2 and "--auth" in _text(bad_auth)
    no_keys = runner.invoke(
        app,
        [
            "devices",
            "provision",
            "d1",
            "--hw",
            "rpi4",
            "--broker-host",
            "h",
            "--keys",
            str(tmp_path / "nope"),
            NOPASS,
        ],
    )
    assert no_keys.exit_code == 1 and "keys init" in _text(no_keys)
    bad_id = runner.invoke(
        app,
        ["devices", "provision", "a/b", "--hw", "rpi4", "--broker-host", "h", "--keys", str(keys), NOPASS],
    )
    assert bad_id.exit_code == 1 and "invalid device id" in _text(bad_id)
    assert not Path("a/b").exists()


def test_fleet_ca_key_is_encrypted_with_the_passphrase(tmp_path: Path) -> None:
    init_keys(tmp_path / "k", passphrase=b"passphrase-1")
    kd = KeyDir(tmp_path / "k")
    ca = fleet_ca(kd, b"passphrase-1")
    assert (kd.path / "ca" / "ca.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    with pytest.raises(KeyLocked):
        fleet_ca(kd)
    assert fleet_ca(kd, b"passphrase-1").cert == ca.cert
