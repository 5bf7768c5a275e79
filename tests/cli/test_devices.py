"""`edgefleet devices register|list` against a real server with real agents: the shared --token,
and the list's filters (selector, state, online, model) answered by the server."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from edgefleet.broker import Broker, fleet_mqtt_keys, server_mqtt_settings
from edgefleet.cli import app
from fleet_server.runner import ServerThread
from fleet_server.settings import ServerSettings
from signing.keyring import KeyDir
from simulator.fleet import DeviceSpec, Fleet
from tests.support.waiting import wait_for

TOKEN = "readme-cli-token-0123456789"
NO_ENV: dict[str, str | None] = {"EDGEFLEET_TOKEN": None, "EDGEFLEET_SERVER": None}  # flags only
runner = CliRunner()


@pytest.fixture
def server(tmp_path: Path, keydir: KeyDir, mosquitto: Broker) -> Iterator[ServerThread]:
    """A server that wants the admin token, on the session's production broker."""
    settings = ServerSettings(
        data_dir=tmp_path / "server-data",
        keys_dir=keydir.path,
        **server_mqtt_settings(mosquitto.info),
        tick_interval=0.1,
        auth_required=True,
        admin_token=TOKEN,
    )
    srv = ServerThread(settings).start()
    assert srv.wait_subscribed(10), "the server subscribed before any device speaks"
    yield srv
    srv.stop()


def ef(server: ServerThread, *args: str, code: int = 0, token: str | None = TOKEN) -> Any:
    auth = ["--token", token] if token else []
    result = runner.invoke(app, [*args, "--server", server.url, *auth, "--json"], env=NO_ENV)
    assert result.exit_code == code, result.output
    return json.loads(result.stdout if code == 0 else result.stderr)


def ids(devices: list[dict[str, Any]]) -> list[str]:
    return sorted(d["device_id"] for d in devices)


def test_register_and_list_take_the_token(server: ServerThread) -> None:
    denied = ef(server, "devices", "register", "tok-1", "--hw", "rpi4", code=1, token=None)
    assert denied["error"]["code"] == "unauthenticated"
    wrong = ef(server, "devices", "list", code=1, token="not-the-token")
    assert wrong["error"]["code"] == "invalid_token"
    device = ef(server, "devices", "register", "tok-1", "--hw", "rpi4", "--tag", "site=lab")
    assert (device["device_id"], device["tags"]) == ("tok-1", {"site": "lab"})
    assert ids(ef(server, "devices", "list")) == ["tok-1"]
    # and the table: the columns `devices get` shows, tags as k=v
    table = runner.invoke(
        app, ["devices", "list", "--server", server.url, "--token", TOKEN], env={"COLUMNS": "100"}
    )
    assert table.exit_code == 0, table.output
    assert "device" in table.stdout and "tok-1" in table.stdout and "site=lab" in table.stdout


def test_list_filters_are_the_servers(
    server: ServerThread, keydir: KeyDir, mosquitto: Broker, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:6]
    agents = [DeviceSpec(f"lf{run}-{i}", "rpi4", {"site": "a"}) for i in range(2)]
    fleet = Fleet(
        agents,
        mosquitto.info,
        keydir.trust_path,
        tmp_path / "devices",
        workload_hz=0.0,
        credentials=fleet_mqtt_keys(mosquitto.info, [s.device_id for s in agents]),
    )
    for spec in agents:
        ef(server, "devices", "register", spec.device_id, "--hw", "rpi4", "--tag", "site=a")
    ef(server, "devices", "register", f"lf{run}-off", "--hw", "jetson", "--tag", "site=b")
    fleet.start()
    try:
        online = [s.device_id for s in agents]
        everyone = sorted([*online, f"lf{run}-off"])
        assert ids(ef(server, "devices", "list")) == everyone
        assert ids(ef(server, "devices", "list", "--selector", "hw=jetson")) == [f"lf{run}-off"]
        assert ids(ef(server, "devices", "list", "-l", "site=a")) == online
        wait_for(
            lambda: ids(ef(server, "devices", "list", "--online")) == online,
            20,
            "the online devices listed",
            interval=0.1,
        )
        assert ids(ef(server, "devices", "list", "--offline")) == [f"lf{run}-off"]
        wait_for(
            lambda: ids(ef(server, "devices", "list", "--state", "idle")) == online,
            20,
            "the idle devices listed",
            interval=0.1,
        )
        assert ef(server, "devices", "list", "--state", "serving") == []
        assert ef(server, "devices", "list", "--model", "digits:1") == []
        both = ef(server, "devices", "list", "--online", "--selector", "hw=jetson")
        assert both == []  # the filters hold together (AND)
    finally:
        fleet.stop()


def test_bad_filters_are_refused_with_their_reason(server: ServerThread) -> None:
    bad_state = ef(server, "devices", "list", "--state", "sleeping", code=2)
    assert bad_state["error"]["code"] == "usage_error" and "serving" in bad_state["error"]["message"]
    bad_selector = ef(server, "devices", "list", "--selector", "hw", code=1)
    assert bad_selector["error"]["code"] == "invalid_selector"
