"""The CLI's manners without a fleet server: version, completion, help, errors, exit codes.

In-process through typer's CliRunner where only the output matters; as real
processes where the behaviour is about what a shell sees (stderr lines, exit
codes, completion through the environment).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from edgefleet import __version__
from edgefleet.broker import SecureBrokerInfo, free_port
from edgefleet.cli import app, describe_exception
from edgefleet.client import ApiError
from edgefleet.commands.common import OutputMode

EXE = str(Path(sys.executable).parent / "edgefleet")
runner = CliRunner()


def ef(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [EXE, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


def walk(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    yield path, command
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        yield from walk(sub, (*path, name))


COMMANDS = list(walk(typer.main.get_command(app)))


def test_version() -> None:
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.stdout == f"edgefleet {__version__}\n"
    assert ef("--version").stdout == f"edgefleet {__version__}\n"


def test_shell_completion_is_on() -> None:
    # for bash, named: typer otherwise asks shellingham for the shell this runs under, which is sh
    # when make runs the suite (and the script then says "Shell sh not supported")
    shown = ef("--show-completion", "bash", env={"_TYPER_COMPLETE_TEST_DISABLE_SHELL_DETECTION": "1"})
    assert shown.returncode == 0 and "_EDGEFLEET_COMPLETE" in shown.stdout
    assert "--install-completion" in runner.invoke(app, ["--help"]).stdout
    # the completion protocol itself: what bash asks for when the user presses TAB
    env = {"_EDGEFLEET_COMPLETE": "complete_bash", "COMP_WORDS": "edgefleet devices ", "COMP_CWORD": "2"}
    verbs = ef(env=env).stdout.split()
    assert {"list", "get", "describe", "delete", "tag"} <= set(verbs)


@pytest.mark.parametrize("path,command", COMMANDS, ids=[" ".join(p) or "edgefleet" for p, _ in COMMANDS])
def test_help_at_80_columns_shows_every_option_uncut(path: tuple[str, ...], command: Any) -> None:
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert all(len(line) <= 80 for line in lines), [line for line in lines if len(line) > 80]
    words = set(result.stdout.replace(",", " ").replace("/", " ").split())
    names = ["--help"] + [
        o for p in command.params for o in (*p.opts, *p.secondary_opts) if o.startswith("-")
    ]
    assert all(name in words for name in names), [n for n in names if n not in words]
    assert "…" not in result.stdout  # nothing ellipsized


def test_help_renders_brackets_literally() -> None:
    """Help text is not markup: a [section] name in it stays on the screen."""
    assert "Apply the file's [small] overrides" in runner.invoke(app, ["sim", "run", "--help"]).stdout


def test_root_help_documents_exit_codes_and_environment() -> None:
    text = " ".join(runner.invoke(app, ["--help"], env={"COLUMNS": "80"}).stdout.split())
    assert "Exit codes: 0 success; 1 failure" in text and "2 usage error" in text
    assert "--watch` exits 0 only when the rollout completed" in text
    assert "EDGEFLEET_SERVER" in text and "EDGEFLEET_TOKEN" in text


SERVER_COMMANDS = [
    ["devices", "list"],
    ["devices", "register", "d1", "--hw", "rpi4"],
    ["devices", "drift"],
    ["devices", "get", "d1"],
    ["devices", "describe", "d1"],
    ["devices", "delete", "d1"],
    ["devices", "tag", "d1", "a=b"],
    ["models", "list"],
    ["models", "show", "m:1"],
    ["models", "pull", "m:1"],
    ["rollouts", "list"],
    ["rollouts", "status", "r1"],
    ["rollouts", "pause", "r1"],
    ["rollouts", "approve", "r1"],
    ["rollouts", "create", "--model", "m:1"],
    ["tokens", "list"],
    ["audit", "list"],
    ["telemetry"],
]


@pytest.mark.parametrize("cmd", SERVER_COMMANDS, ids=lambda c: " ".join(c))
def test_server_commands_take_server_token_and_json(cmd: list[str]) -> None:
    """Every command that talks to the server: the same three options, the same error shape."""
    args = [*cmd, "--server", "http://127.0.0.1:9", "--token", "t0k", "--json"]
    result = runner.invoke(app, args)
    assert result.exit_code == 1, result.output
    assert result.stdout == ""
    error = json.loads(result.stderr)["error"]
    assert error["code"] == "unreachable" and "127.0.0.1:9" in error["message"]


def test_unreachable_server_is_one_stderr_line_and_exit_1(refused_port: Callable[[], int]) -> None:
    proc = ef("rollouts", "list", "--server", f"http://127.0.0.1:{refused_port()}")
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: unreachable: http://127.0.0.1:")


def test_json_errors_keep_their_exit_code(refused_port: Callable[[], int]) -> None:
    down = ef("devices", "get", "x", "--server", f"http://127.0.0.1:{refused_port()}", "--json")
    assert down.returncode == 1 and down.stdout == ""
    assert down.stderr.count("\n") == 1
    assert set(json.loads(down.stderr)) == {"error"}
    assert set(json.loads(down.stderr)["error"]) == {"code", "message"}
    usage = ef("rollouts", "create", "--json")  # --model missing: found while parsing
    assert usage.returncode == 2 and usage.stdout == ""
    assert json.loads(usage.stderr)["error"]["code"] == "usage_error"
    assert "--model" in json.loads(usage.stderr)["error"]["message"]
    bad = ef("rollouts", "create", "--model", "m:1", "--stages", "50,10", "--json")  # found by the command
    assert bad.returncode == 2 and json.loads(bad.stderr)["error"]["code"] == "usage_error"


def test_usage_errors_are_one_line_and_exit_2() -> None:
    for args in (["nosuch"], ["rollouts", "status", "r", "--bogus"], ["devices", "tag", "d", "nonsense"]):
        proc = ef(*args, "--server", f"http://127.0.0.1:{free_port()}")
        assert proc.returncode == 2, (args, proc.stderr)
        assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr


@pytest.mark.slow
def test_down_database_is_one_line_and_debug_shows_the_traceback(
    tmp_path: Path, broker_info: SecureBrokerInfo, refused_port: Callable[[], int]
) -> None:
    assert (
        runner.invoke(
            app, ["keys", "init", "--insecure-no-passphrase", "--dir", str(tmp_path / "k")]
        ).exit_code
        == 0
    )
    down = f"postgresql+psycopg://postgres@127.0.0.1:{refused_port()}/nothing"
    args = [
        "server",
        "--keys",
        str(tmp_path / "k"),
        "--data-dir",
        str(tmp_path / "d"),
        "--database-url",
        down,
        "--mqtt",
        f"{broker_info.host}:{broker_info.server_port}",
        "--mqtt-credentials",
        str(broker_info.server_credentials),
    ]
    no_wait = {"EDGEFLEET_STARTUP_RETRY_SECONDS": "0"}  # the database does not come up: fail at once
    proc = ef(*args, "--port", str(free_port()), env=no_wait)
    assert proc.returncode == 1
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: database: "), proc.stderr
    assert "Connection refused" in proc.stderr
    debug = ef("--debug", *args, "--port", str(free_port()), env=no_wait)
    assert debug.returncode == 1 and "Traceback (most recent call last)" in debug.stderr
    assert debug.stderr.splitlines()[-1].startswith("error: database: ")
    assert "Traceback" in ef(*args, env={"EDGEFLEET_DEBUG": "1", **no_wait}).stderr


def test_describe_exception() -> None:
    assert describe_exception(ApiError(404, "device_not_found", "no device x")) == (
        "device_not_found",
        "device_not_found: no device x",
    )
    code, message = describe_exception(FileNotFoundError(2, "No such file or directory", "/x"))
    assert code == "os_error" and "/x" in message
    code, message = describe_exception(ValueError("line one\n  line two"))
    assert code == "unexpected_error" and message.startswith("ValueError: line one line two")
    assert "--debug" in message


def test_output_mode_reads_the_raw_arguments() -> None:
    assert OutputMode.from_args(["devices", "list", "--json"]) == OutputMode(json=True)
    assert OutputMode.from_args(["--debug", "devices", "list"]) == OutputMode(debug=True)
    assert OutputMode.from_args(["sim", "run", "--", "--json"]) == OutputMode()  # after --: an argument


def test_messages_are_not_markup(tmp_path: Path) -> None:
    """An error naming a [bracketed] thing shows it whole (rich would take it as a style)."""
    missing = tmp_path / "[small]"
    result = runner.invoke(app, ["keys", "show", "--dir", str(missing)])
    assert result.exit_code == 1 and "[small]" in result.stderr
