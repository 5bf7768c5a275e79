"""The CLI's conventions: --help everywhere, --json output, non-zero exit codes with reasons."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from edgefleet.cli import app, parse_selector, registry

runner = CliRunner()

COMMANDS = [
    [],
    ["keys"],
    ["keys", "init"],
    ["keys", "show"],
    ["compile"],
    ["models"],
    ["models", "push"],
    ["models", "list"],
    ["models", "revoke"],
    ["tokens"],
    ["tokens", "create"],
    ["tokens", "list"],
    ["tokens", "revoke"],
    ["audit"],
    ["audit", "list"],
    ["devices"],
    ["devices", "list"],
    ["devices", "register"],
    ["rollouts"],
    ["rollouts", "create"],
    ["rollouts", "status"],
    ["rollouts", "pause"],
    ["rollouts", "resume"],
    ["rollouts", "abort"],
    ["rollouts", "list"],
    ["server"],
    ["agent"],
    ["sim"],
    ["sim", "run"],
    ["sim", "fleet"],
    ["sim", "check"],
    ["demo"],
    ["broker", "run"],
]


@pytest.mark.parametrize("cmd", COMMANDS, ids=lambda c: " ".join(c) or "edgefleet")
def test_help_everywhere(cmd: list[str]) -> None:
    result = runner.invoke(app, [*cmd, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_the_root_builds_only_the_command_asked_for(monkeypatch: pytest.MonkeyPatch) -> None:
    """Building the root (every call does) builds none of its commands; naming one builds that one."""
    root = [*registry.registered_commands, *registry.registered_groups]
    built: list[object] = []

    def recording(real: Callable[..., Any]) -> Callable[..., Any]:
        def build(*args: Any, **kwargs: Any) -> Any:
            built.extend([*args[:1], kwargs.get("command_info"), kwargs.get("group_info")])
            return real(*args, **kwargs)

        return build

    for name in ("get_command_from_info", "get_group_from_info"):
        monkeypatch.setattr(typer.main, name, recording(getattr(typer.main, name)))
    group = typer.main.get_command(app)
    assert [info.name for info in root if any(info is b for b in built)] == []
    assert list(group.commands) == [info.name for info in root]
    assert "devices" in group.commands and "nope" not in group.commands  # asking builds nothing
    assert [info.name for info in root if any(info is b for b in built)] == []
    assert group.commands["devices"].name == "devices"
    assert [info.name for info in root if any(info is b for b in built)] == ["devices"]
    monkeypatch.undo()
    eager = typer.main.get_group(registry)  # typer's own build of every command: the help's order
    assert list(group.commands) == list(eager.commands)


def test_console_script_installed() -> None:
    exe = Path(sys.executable).parent / "edgefleet"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "rollouts" in out.stdout


def test_keys_init_and_show_json(tmp_path: Path) -> None:
    result = runner.invoke(
        app, ["keys", "init", "--insecure-no-passphrase", "--dir", str(tmp_path / "k"), "--json"]
    )
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["version"] == 1 and len(info["release_keys"]) == 1 and len(info["fleet_keys"]) == 1
    shown = runner.invoke(app, ["keys", "show", "--dir", str(tmp_path / "k"), "--json"])
    assert json.loads(shown.stdout)["release_keys"] == info["release_keys"]
    # refusing to overwrite is a failure with a reason, not a silent success
    again = runner.invoke(app, ["keys", "init", "--insecure-no-passphrase", "--dir", str(tmp_path / "k")])
    assert again.exit_code == 1
    assert "exists" in again.output


def test_keys_show_rejects_tampered_trust_root(tmp_path: Path) -> None:
    runner.invoke(app, ["keys", "init", "--insecure-no-passphrase", "--dir", str(tmp_path / "k")])
    trust = tmp_path / "k" / "trust.json"
    env = json.loads(trust.read_text())
    env["signatures"][0]["sig"] = "A" * 88
    trust.write_text(json.dumps(env))
    result = runner.invoke(app, ["keys", "show", "--dir", str(tmp_path / "k")])
    assert result.exit_code == 1
    assert "signature" in result.output


def test_unreachable_server_exits_nonzero() -> None:
    result = runner.invoke(app, ["devices", "list", "--server", "http://127.0.0.1:9"])
    assert result.exit_code == 1
    assert "unreachable" in result.output


def test_bad_stage_list_is_a_usage_error() -> None:
    result = runner.invoke(app, ["rollouts", "create", "--model", "m:1", "--stages", "50,10"])
    assert result.exit_code == 2


def test_selector_parsing() -> None:
    assert parse_selector("hw=rpi4,site=berlin") == {"hardware_id": "rpi4", "tags": {"site": "berlin"}}
    assert parse_selector(None) == {}


def test_compile_with_encrypted_release_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keys are encrypted by default; compile asks for the passphrase only when it needs it."""
    from compiler.examples import train_digits

    monkeypatch.setenv("EDGEFLEET_KEY_PASSPHRASE", "correct horse battery")
    assert runner.invoke(app, ["keys", "init", "--dir", str(tmp_path / "k")]).exit_code == 0
    assert b"ENCRYPTED" in (tmp_path / "k" / "release.key").read_bytes()
    ex = train_digits(tmp_path / "digits")
    args = ["compile", str(ex.model_path), "--calib", str(ex.calib_path), "--name", "d", "--version", "1"]
    args += ["--keys", str(tmp_path / "k"), "--json"]
    ok = runner.invoke(app, [*args, "--out", str(tmp_path / "b1")])
    assert ok.exit_code == 0, ok.output
    monkeypatch.setenv("EDGEFLEET_KEY_PASSPHRASE", "wrong passphrase")
    wrong = runner.invoke(app, [*args, "--out", str(tmp_path / "b2")])
    assert wrong.exit_code == 1 and "wrong passphrase" in wrong.output
    monkeypatch.delenv("EDGEFLEET_KEY_PASSPHRASE")
    locked = runner.invoke(app, [*args, "--out", str(tmp_path / "b3")])
    assert locked.exit_code == 2 and "--passphrase-file" in locked.output
    assert not (tmp_path / "b2").exists() and not (tmp_path / "b3").exists()
