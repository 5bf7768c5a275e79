"""`edgefleet mirror`: publish the TUF repository and bundles for static delivery; nginx for a mirror."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from edgefleet.commands.common import EXIT_USAGE, JsonOpt, console, fail, print_json

mirror_app = typer.Typer(
    help="Static delivery: the published tree devices download from, through any web server or CDN "
    "(docs/trust.md).",
    no_args_is_help=True,
)


@mirror_app.command("publish")
def publish_cmd(
    data_dir: Annotated[
        Path | None, typer.Option(help="The server's data directory [EDGEFLEET_DATA_DIR].")
    ] = None,
    database_url: Annotated[
        str | None, typer.Option(help="The server's database [EDGEFLEET_DATABASE_URL].")
    ] = None,
    to: Annotated[
        str | None,
        typer.Option(
            "--to",
            help="A directory or s3://bucket/prefix [EDGEFLEET_MIRROR; default <data_dir>/mirror].",
        ),
    ] = None,
    s3_endpoint_url: Annotated[
        str | None,
        typer.Option(help="An S3-compatible service other than AWS [EDGEFLEET_MIRROR_S3_ENDPOINT_URL]."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Publish what the server holds (run on its host): only what the storage lacks, the timestamp last.

    The server publishes by itself on every release, revocation and re-signing; this re-runs it, e.g.
    after an upload failed or to fill a new bucket. Safe to run at any time, as often as wanted."""
    from fleet_server.releases import make_publisher
    from fleet_server.settings import ServerSettings
    from fleet_server.store import make_engine

    overrides: dict[str, Any] = {
        "data_dir": data_dir,
        "database_url": database_url,
        "mirror": to,
        "mirror_s3_endpoint_url": s3_endpoint_url,
    }
    settings = ServerSettings(**{k: v for k, v in overrides.items() if v is not None})
    if not Path(settings.data_dir).is_dir():
        fail(f"no server data directory at {settings.data_dir} (pass --data-dir)")
    if settings.mirror == "off":
        fail("the mirror is off (EDGEFLEET_MIRROR=off): pass --to", EXIT_USAGE)
    try:
        publisher = make_publisher(settings, make_engine(settings, migrate=False))
        assert publisher is not None
        tuf_dir = settings.tuf_dir
        publisher.tuf_dir = tuf_dir if (tuf_dir / "metadata").is_dir() else None
        report = publisher.publish()
    except (ValueError, RuntimeError, OSError) as exc:
        fail(f"cannot publish: {exc}")
    except Exception as exc:  # boto3's errors (no such bucket, denied) without importing boto3 here
        fail(f"cannot publish: {type(exc).__name__}: {exc}")
    if as_json:
        print_json(report.to_dict())
        return
    console.print(
        f"published to {report.storage}: {len(report.uploaded)} uploaded, {report.unchanged} unchanged, "
        f"timestamp {report.timestamp}",
        highlight=False,
    )


@mirror_app.command("nginx-config")
def nginx_config_cmd(
    root: Annotated[Path, typer.Option("--root", help="The published directory nginx serves.")],
    listen: Annotated[str, typer.Option(help="nginx's listen address.")] = "80",
) -> None:
    """Print an nginx server block for a mirror: cache headers right (timestamp.json revalidated,
    everything else immutable). Put it in /etc/nginx/conf.d/ and add TLS as your site does."""
    from edgefleet.nginx import server_block

    typer.echo(server_block(root.resolve(), listen), nl=False)
