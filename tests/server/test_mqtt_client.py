"""How the server's connections find the broker and prove who they are: settings, fleet-server.json,
and the client ids under the reserved prefix (no broker needed)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgefleet.provision import ProvisionError, check_device_id
from fleet_server.mqtt_client import MqttConfigError, endpoint
from fleet_server.mqtt_identity import SERVER_ACCOUNT, is_reserved, server_client_id, worker_client_id
from fleet_server.settings import ServerSettings


def _files(d: Path) -> dict[str, Path]:
    out = {}
    for name in ("ca.crt", "fleet-server.crt", "fleet-server.key", "pw"):
        (d / name).write_text("x\n" if name != "pw" else "s3cret\nignored second line\n")
        out[name] = d / name
    return out


def test_the_credentials_file_fills_what_the_settings_leave_unset(tmp_path: Path) -> None:
    _files(tmp_path)
    creds = tmp_path / "fleet-server.json"
    fields = {"host": "mqtt.example", "port": 8884, "tls": True, "ca_file": "ca.crt",
              "cert_file": "fleet-server.crt", "key_file": "fleet-server.key"}  # fmt: skip
    creds.write_text(json.dumps(fields))
    where = endpoint(ServerSettings(data_dir=tmp_path, mqtt_credentials=creds))
    assert (where.host, where.port, where.url) == ("mqtt.example", 8884, "mqtts://mqtt.example:8884")
    sec = where.security
    assert sec.tls and sec.ca_file == tmp_path / "ca.crt"  # relative to the file's directory
    assert (sec.cert_file, sec.key_file) == (tmp_path / "fleet-server.crt", tmp_path / "fleet-server.key")
    # what is set explicitly wins (here: the address, e.g. the broker's name on another network)
    where = endpoint(ServerSettings(data_dir=tmp_path, mqtt_credentials=creds, mqtt_host="10.0.0.2"))
    assert (where.host, where.port) == ("10.0.0.2", 8884)


def test_username_and_password_from_a_file_or_a_secret(tmp_path: Path) -> None:
    f = _files(tmp_path)
    base = {"data_dir": tmp_path, "mqtt_tls": True, "mqtt_ca_file": f["ca.crt"], "mqtt_username": "fleet"}
    from_file = endpoint(ServerSettings(**base, mqtt_password_file=f["pw"])).security
    assert (from_file.username, from_file.password) == ("fleet", "s3cret")
    secret = ServerSettings(**base, mqtt_password="p4ss")
    assert endpoint(secret).security.password == "p4ss"
    assert "p4ss" not in repr(secret)  # a settings dump or log line never shows it


def test_bad_broker_settings_are_clear_errors(tmp_path: Path) -> None:
    f = _files(tmp_path)
    with pytest.raises(MqttConfigError, match="cannot read the broker credentials"):
        endpoint(ServerSettings(data_dir=tmp_path, mqtt_credentials=tmp_path / "missing.json"))
    (tmp_path / "bad.json").write_text('{"host": "h", "pasword": "typo"}')
    with pytest.raises(MqttConfigError, match="unknown keys pasword"):
        endpoint(ServerSettings(data_dir=tmp_path, mqtt_credentials=tmp_path / "bad.json"))
    with pytest.raises(MqttConfigError, match="no such file"):
        endpoint(ServerSettings(data_dir=tmp_path, mqtt_tls=True, mqtt_ca_file=tmp_path / "nope.crt"))
    with pytest.raises(MqttConfigError, match="both cert_file and key_file"):
        endpoint(ServerSettings(data_dir=tmp_path, mqtt_tls=True, mqtt_cert_file=f["fleet-server.crt"]))
    with pytest.raises(MqttConfigError, match="tls is off"):
        endpoint(ServerSettings(data_dir=tmp_path, mqtt_ca_file=f["ca.crt"]))


def test_every_server_connection_has_its_own_id_under_the_reserved_prefix() -> None:
    a, b = server_client_id(None), server_client_id(None)
    assert a != b and a.startswith(f"{SERVER_ACCOUNT}-") and is_reserved(a)
    assert worker_client_id(a, 0) != worker_client_id(a, 1) and is_reserved(worker_client_id(a, 1))
    # a configured id stays stable (persistent sessions) and gets the prefix once
    assert server_client_id("replica-a") == server_client_id("replica-a") == "fleet-server-replica-a"
    assert server_client_id("fleet-server-compose") == "fleet-server-compose"
    # and no device may carry such an id
    for taken in ("fleet-server", "fleet-server-replica-a", "fleet-server-replica-a-ingest0"):
        with pytest.raises(ProvisionError, match="reserved"):
            check_device_id(taken)
    check_device_id("cam-fleet-server")  # the prefix only
