"""The ``edgefleet`` command line: git/kubectl-style subcommands over the five packages.

Each command group lives in ``edgefleet/commands/``. Heavy imports
(onnxruntime, fastapi, sqlmodel) happen inside the command that needs them, so
``edgefleet agent`` works on a device with the ``agent`` extra only, and
``--help`` stays fast.

The root command owns the manners every subcommand shares (docs/cli.md): help
rendered as plain text (no markup eats ``[brackets]``, option names never
cut), every failure one line on stderr (a JSON object under ``--json``) with
exit code 1, usage errors exit code 2, and a traceback only with ``--debug``.
"""

from __future__ import annotations

import sys
import traceback
from collections.abc import Iterator, MutableMapping, Sequence
from typing import Annotated, Any

import typer
from typer.core import TyperGroup
from typer.models import CommandInfo, TyperInfo

from edgefleet import __version__
from edgefleet.commands.broker import broker_app
from edgefleet.commands.common import (
    EXIT_FAILURE,
    OutputMode,
    enable_debug,
    output_mode,
    output_mode_set,
    report_error,
)
from edgefleet.commands.compile import compile_cmd
from edgefleet.commands.config import register_config_commands
from edgefleet.commands.data import data_app
from edgefleet.commands.deploy import deploy_cmd
from edgefleet.commands.device_ops import register_device_ops
from edgefleet.commands.devices import devices_app
from edgefleet.commands.examples import examples_app
from edgefleet.commands.experiments import experiments_app
from edgefleet.commands.keys import keys_app
from edgefleet.commands.mirror import mirror_app
from edgefleet.commands.models import models_app
from edgefleet.commands.processes import agent_cmd, demo_cmd, server_cmd
from edgefleet.commands.rollouts import parse_selector, parse_stages, rollouts_app
from edgefleet.commands.sim import sim_app
from edgefleet.commands.slo import slo_app
from edgefleet.commands.telemetry import telemetry_cmd
from edgefleet.commands.tokens import audit_app, tokens_app

EPILOG = (
    "Exit codes: 0 success; 1 failure (one line on stderr, or a JSON object "
    '{"error": {"code", "message"}} on stderr with --json); 2 usage error. '
    "`rollouts status --watch` exits 0 only when the rollout completed. "
    "Environment: EDGEFLEET_SERVER, EDGEFLEET_TOKEN, EDGEFLEET_DEBUG. See docs/cli.md."
)


def describe_exception(exc: BaseException) -> tuple[str, str]:
    """An unexpected exception as (code, one-line message): what failed, not where."""
    from edgefleet.client import ApiError

    text = " ".join(str(exc).split())
    if isinstance(exc, ApiError):
        return exc.code, text
    if type(exc).__module__.split(".")[0] == "sqlalchemy":  # the server's database refused or broke
        return "database_error", f"database: {text.split(' (Background on this error at:')[0]}"
    if isinstance(exc, OSError):
        return "os_error", text or type(exc).__name__
    return "unexpected_error", f"{type(exc).__name__}: {text} (--debug shows the traceback)"


# typer raises click's exceptions (or those of the click it vendors): find their classes through one
# it exports, so this works whichever click typer was built on.
_CLICK_ERRORS = {cls.__name__: cls for cls in typer.BadParameter.__mro__}
ClickException: type[Exception] = _CLICK_ERRORS["ClickException"]
UsageError: type[Exception] = _CLICK_ERRORS["UsageError"]


class LazyCommands(MutableMapping[str, Any]):
    """The root's commands by name, each turned into its click command when first asked for.

    typer makes click parameters out of every command's signature and type hints before it
    parses anything; for all of them that was about a third of the CPU of a short call such as
    ``edgefleet devices list`` (scripts, the demo and the tests call the CLI again and again).
    A call runs one command: click asks for that one by name (``get_command``), and only the
    help listing and shell completion ask for every one. Names and their order (commands, then
    groups, in the order registered, as typer lists them) are known without building anything.
    """

    def __init__(self, registry: typer.Typer, group: TyperGroup) -> None:
        infos: list[CommandInfo | TyperInfo] = [*registry.registered_commands, *registry.registered_groups]
        self._infos: dict[str, CommandInfo | TyperInfo] = {}
        for info in infos:
            if not isinstance(info.name, str):  # typer would derive it: name every command here
                raise TypeError(f"register {info} under an explicit name")
            self._infos[info.name] = info
        self._names = list(self._infos)
        self._built: dict[str, Any] = {}
        self._group = group

    def __getitem__(self, name: str) -> Any:
        if name not in self._built:
            info = self._infos[name]  # KeyError: no such command
            short = app.pretty_exceptions_short
            markup = self._group.rich_markup_mode
            self._built[name] = (
                typer.main.get_command_from_info(info, pretty_exceptions_short=short, rich_markup_mode=markup)
                if isinstance(info, CommandInfo)
                else typer.main.get_group_from_info(
                    info,
                    pretty_exceptions_short=short,
                    rich_markup_mode=markup,
                    suggest_commands=self._group.suggest_commands,
                )
            )
        return self._built[name]

    def __setitem__(self, name: str, command: Any) -> None:  # click's add_command
        if name not in self._names:
            self._names.append(name)
        self._built[name] = command

    def __delitem__(self, name: str) -> None:
        if name not in self._names:
            raise KeyError(name)
        self._names.remove(name)
        self._infos.pop(name, None)
        self._built.pop(name, None)

    def __contains__(self, name: object) -> bool:  # without building it (Mapping's would)
        return name in self._names

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._names))

    def __len__(self) -> int:
        return len(self._names)


class EdgefleetGroup(TyperGroup):
    """The root group: renders every way an invocation can fail in the one output mode, and
    builds the command it runs only (``LazyCommands``; the commands are registered on
    ``registry``, not on ``app``, so typer builds none of them up front)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if app.registered_commands or app.registered_groups:  # they would be dropped silently
            raise TypeError("register edgefleet's commands on `registry`, not on `app`")
        self.commands = LazyCommands(registry, self)

    def main(  # type: ignore[override]
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        with output_mode_set(OutputMode.from_args(argv)):
            code = self._run(argv, prog_name, complete_var, **extra)
        if not standalone_mode:
            return code
        sys.exit(code)

    def _run(self, argv: list[str], prog_name: str | None, complete_var: str | None, **extra: Any) -> int:
        try:
            rv = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            report_error("aborted", code="aborted")
            return EXIT_FAILURE
        except ClickException as exc:
            exit_code = int(getattr(exc, "exit_code", EXIT_FAILURE))
            if type(exc).__name__ == "NoArgsIsHelpError":  # a bare group: its help, as click shows it
                exc.show()  # type: ignore[attr-defined]
                return exit_code
            message = exc.format_message()  # type: ignore[attr-defined]
            if isinstance(exc, UsageError):
                ctx = getattr(exc, "ctx", None)
                where = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
                report_error(message + where, code="usage_error")
            else:
                report_error(message, code="failed")
            return exit_code
        except Exception as exc:
            if output_mode().debug:
                traceback.print_exception(exc)
            code, message = describe_exception(exc)
            report_error(message, code=code)
            return EXIT_FAILURE
        # click returns the exit code of a typer.Exit, else the command's return value (None)
        return rv if isinstance(rv, int) else 0


app = typer.Typer(
    name="edgefleet",
    help="Compile, sign, roll out and serve ML models on fleets of edge devices.",
    epilog=EPILOG,
    cls=EdgefleetGroup,
    no_args_is_help=True,
    rich_markup_mode=None,  # plain help: literal [brackets], names never cut at 80 columns
    pretty_exceptions_enable=False,  # EdgefleetGroup reports them in one line
)


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"edgefleet {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
    debug: Annotated[
        bool,
        typer.Option("--debug", envvar="EDGEFLEET_DEBUG", help="Print the traceback of an unexpected error."),
    ] = False,
) -> None:
    """Compile, sign, roll out and serve ML models on fleets of edge devices."""
    if debug:
        enable_debug()


# The root's commands and groups (its help lists the commands in this order, then the groups, as
# typer does); EdgefleetGroup takes them from here one at a time (``LazyCommands``). Each under an
# explicit name.
registry = typer.Typer()
registry.add_typer(keys_app, name="keys")
registry.command("compile")(compile_cmd)
registry.add_typer(examples_app, name="examples")
registry.add_typer(models_app, name="models")
registry.add_typer(data_app, name="data")
register_device_ops(devices_app)
registry.add_typer(devices_app, name="devices")
registry.add_typer(rollouts_app, name="rollouts")
registry.add_typer(experiments_app, name="experiments")
registry.command("telemetry")(telemetry_cmd)
registry.command("server")(server_cmd)
registry.command("agent")(agent_cmd)
registry.add_typer(sim_app, name="sim")
registry.add_typer(broker_app, name="broker")
registry.add_typer(tokens_app, name="tokens")
registry.add_typer(audit_app, name="audit")
registry.add_typer(slo_app, name="slo")
registry.add_typer(mirror_app, name="mirror")
registry.command("demo")(demo_cmd)
register_config_commands(registry)
registry.command("deploy")(deploy_cmd)

__all__ = ["app", "main", "parse_selector", "parse_stages", "registry"]


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
