"""`edgefleet keys`: create, rotate, revoke and inspect signing keys and the trust root.

Private keys are encrypted with a passphrase. It comes from ``--passphrase-file``,
the environment variable named by ``--passphrase-env`` (default
``EDGEFLEET_KEY_PASSPHRASE``, for CI), or a prompt; unencrypted keys only with an
explicit ``--insecure-no-passphrase``.

Release keys are Ed25519 unless ``--release-algorithm ecdsa-p256`` asks for
ECDSA P-256: bundles signed with such a key are in the OpenSSF model-signing
format, which ``model_signing verify key`` checks against ``release.pub.pem``.
"""

from __future__ import annotations

import enum
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgefleet.commands.common import (
    JsonOpt,
    console,
    fail,
    print_json,
)

keys_app = typer.Typer(
    help="Create, rotate, revoke and inspect signing keys and the trust root.", no_args_is_help=True
)

DirOpt = Annotated[Path, typer.Option("--dir", "-d", help="Key directory.")]
PassFileOpt = Annotated[
    Path | None, typer.Option("--passphrase-file", help="Read the key passphrase from this file.")
]
PassEnvOpt = Annotated[
    str, typer.Option("--passphrase-env", help="Environment variable holding the key passphrase.")
]
InsecureOpt = Annotated[
    bool,
    typer.Option(
        "--insecure-no-passphrase", help="Write/read private keys UNENCRYPTED (demos and tests only)."
    ),
]
DEFAULT_PASS_ENV = "EDGEFLEET_KEY_PASSPHRASE"


class ReleaseAlgorithm(enum.StrEnum):
    """Release key algorithms: Ed25519 (default), or P-256 for OpenSSF model-signing interop."""

    ed25519 = "ed25519"
    ecdsa_p256 = "ecdsa-p256"


ReleaseAlgOpt = Annotated[
    ReleaseAlgorithm | None,
    typer.Option(
        "--release-algorithm",
        help="Release key algorithm: ed25519, or ecdsa-p256 so `model_signing verify key` "
        "can check bundles (default: ed25519 for init, the current key's for rotate).",
    ),
]


def resolve_passphrase(
    passphrase_file: Path | None, passphrase_env: str, insecure: bool, *, confirm: bool
) -> bytes | None:
    """The passphrase from a file, an env var or a prompt; None only when the user opted out."""
    if passphrase_file is not None:
        try:
            value = passphrase_file.read_text().rstrip("\r\n")
        except OSError as exc:
            fail(f"cannot read passphrase file: {exc}", 2)
        if not value:
            fail(f"passphrase file {passphrase_file} is empty", 2)
        return value.encode()
    env_value = os.environ.get(passphrase_env)
    if env_value:
        return env_value.encode()
    if insecure:
        return None
    if not sys.stdin.isatty():
        fail(
            "private keys are encrypted: give --passphrase-file, set "
            f"{passphrase_env}, or pass --insecure-no-passphrase explicitly",
            2,
        )
    value = typer.prompt("key passphrase", hide_input=True, confirmation_prompt=confirm)
    if len(value) < 8:
        fail("the passphrase must be at least 8 characters", 2)
    return str(value).encode()


def load_role_key(directory: Path, role: str, passphrase_file: Path | None, passphrase_env: str) -> Any:
    """Load ``<directory>/<role>.key``, asking for the passphrase only when the key is encrypted."""
    from signing.keyring import KeyDir
    from signing.keys import KeyLocked, WrongPassphrase

    keydir = KeyDir(directory)
    try:
        return keydir.key(role)
    except KeyLocked:
        pass
    except (OSError, ValueError) as exc:
        fail(f"cannot load {role} key from {directory}: {exc}")
    passphrase = resolve_passphrase(passphrase_file, passphrase_env, False, confirm=False)
    try:
        return keydir.key(role, passphrase=passphrase)
    except WrongPassphrase:
        fail(f"wrong passphrase for {directory / (role + '.key')}")
    except (OSError, ValueError) as exc:
        fail(f"cannot load {role} key from {directory}: {exc}")


@keys_app.command("init")
def keys_init(
    directory: DirOpt = Path("keys"),
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing keys.")] = False,
    root_keys: Annotated[int, typer.Option("--root-keys", min=1, help="Number of root keys (n).")] = 1,
    root_threshold: Annotated[
        int, typer.Option("--root-threshold", min=1, help="Root signatures required (k of n).")
    ] = 1,
    release_algorithm: ReleaseAlgOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = DEFAULT_PASS_ENV,
    insecure: InsecureOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate root (k of n), release and fleet keys, the trust root and the TUF root metadata."""
    from signing.keyring import KeyDirError, init_keys

    if (directory / "trust.json").exists() and not force:
        fail(f"{directory / 'trust.json'} exists; pass --force to overwrite")
    passphrase = resolve_passphrase(passphrase_file, passphrase_env, insecure, confirm=True)
    try:
        trust = init_keys(
            directory,
            force=force,
            passphrase=passphrase,
            root_keys=root_keys,
            root_threshold=root_threshold,
            release_algorithm=(release_algorithm or ReleaseAlgorithm.ed25519).value,
        )
    except (FileExistsError, KeyDirError) as exc:
        fail(str(exc))
    info = {**_trust_summary(trust), "encrypted": passphrase is not None}
    if as_json:
        print_json({"dir": str(directory), **info})
        return
    console.print(f"[green]wrote[/] keys, trust.json and root.json to {directory}/")
    _print_trust(info)
    if passphrase is None:
        console.print("[bold yellow]private keys are NOT encrypted (--insecure-no-passphrase)[/]")
    console.print(
        "[yellow]keep the root and release keys offline; the server needs only fleet.key, trust.json "
        "and roots/[/]"
    )


@keys_app.command("rotate")
def keys_rotate(
    directory: DirOpt = Path("keys"),
    root_keys: Annotated[
        int | None, typer.Option("--root-keys", min=1, help="Replace the root keys with this many new ones.")
    ] = None,
    root_threshold: Annotated[
        int | None, typer.Option("--root-threshold", min=1, help="New root threshold (k).")
    ] = None,
    release: Annotated[bool, typer.Option("--release", help="Replace the release key.")] = False,
    fleet: Annotated[bool, typer.Option("--fleet", help="Replace the online fleet key.")] = False,
    release_algorithm: ReleaseAlgOpt = None,
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = DEFAULT_PASS_ENV,
    insecure: InsecureOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Publish trust root N+1, signed by the old root's threshold and the new one."""
    from signing.keyring import KeyDir, KeyDirError, rotate_keys
    from signing.keys import KeyLocked, WrongPassphrase

    if not (root_keys or root_threshold or release or fleet):
        fail("nothing to rotate: give --root-keys, --root-threshold, --release and/or --fleet", 2)
    if release_algorithm is not None and not release:
        fail("--release-algorithm applies to a new release key: add --release", 2)
    passphrase = resolve_passphrase(passphrase_file, passphrase_env, insecure, confirm=False)
    try:
        trust = rotate_keys(
            KeyDir(directory),
            passphrase=passphrase,
            root_keys=root_keys,
            root_threshold=root_threshold,
            release=release,
            fleet=fleet,
            release_algorithm=release_algorithm.value if release_algorithm else None,
        )
    except (KeyDirError, KeyLocked, WrongPassphrase, OSError) as exc:
        fail(f"cannot rotate keys in {directory}: {exc}")
    _report(trust, directory, as_json, "rotated")


@keys_app.command("revoke")
def keys_revoke(
    keyid: Annotated[
        str, typer.Argument(help="Key id (or a unique prefix of >= 6 chars) of a release/fleet key.")
    ],
    directory: DirOpt = Path("keys"),
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = DEFAULT_PASS_ENV,
    insecure: InsecureOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Publish trust root N+1 without a release or fleet key (a fresh one replaces the last of its role)."""
    from signing.keyring import KeyDir, KeyDirError, revoke_key
    from signing.keys import KeyLocked, WrongPassphrase

    passphrase = resolve_passphrase(passphrase_file, passphrase_env, insecure, confirm=False)
    try:
        trust = revoke_key(KeyDir(directory), keyid, passphrase=passphrase)
    except (KeyDirError, KeyLocked, WrongPassphrase, OSError) as exc:
        fail(f"cannot revoke {keyid!r} in {directory}: {exc}")
    _report(trust, directory, as_json, f"revoked {keyid[:16]} in")


@keys_app.command("show")
def keys_show(
    directory: DirOpt = Path("keys"),
    as_json: JsonOpt = False,
) -> None:
    """Verify and show the trust root in a key directory (and its chain from v1)."""
    from signing.errors import TrustError
    from signing.keyring import KeyDir
    from signing.trust import TrustRoot

    kd = KeyDir(directory)
    try:
        trust = kd.trust_root()
        if trust.version > 1:
            # the whole chain must verify from v1, as a device pinned at v1 would walk it
            first = TrustRoot.load((directory / "roots" / "1.trust.json").read_bytes())
            first.follow(kd.trust_chain(1))
        info = {**_trust_summary(trust), "encrypted": kd.encrypted, "revoked": sorted(kd.index()["revoked"])}
    except (OSError, ValueError, TrustError) as exc:
        fail(f"cannot read trust root in {directory}: {exc}")
    if as_json:
        print_json(info)
    else:
        _print_trust(info)
        console.print(f"private keys: {'encrypted' if info['encrypted'] else '[yellow]NOT encrypted[/]'}")
        for k in info["revoked"]:
            console.print(f"revoked: {k[:16]}…")


def _report(trust: Any, directory: Path, as_json: bool, verb: str) -> None:
    info = _trust_summary(trust)
    if as_json:
        print_json({"dir": str(directory), **info})
        return
    console.print(f"[green]{verb}[/] {directory}/: trust root v{trust.version}")
    _print_trust(info)
    console.print("[yellow]publish the new root.json to the TUF repository so devices follow the chain[/]")


def _trust_summary(trust: Any) -> dict[str, Any]:
    return {
        "version": trust.version,
        "expires": trust.expires.isoformat(),
        "root_threshold": trust.root_threshold,
        "root_keys": sorted(trust.root_keys),
        "release_keys": sorted(trust.release_keys),
        "fleet_keys": sorted(trust.fleet_keys),
        "release_schemes": sorted({k.scheme for k in trust.release_keys.values()}),
    }


def _print_trust(info: dict[str, Any]) -> None:
    table = Table(
        "role",
        "key ids",
        title=f"trust root v{info['version']} (root {info['root_threshold']} of {len(info['root_keys'])}, "
        f"expires {info['expires']})",
    )
    for role in ("root_keys", "release_keys", "fleet_keys"):
        table.add_row(role.removesuffix("_keys"), "\n".join(k[:16] + "…" for k in info[role]))
    console.print(table)
    console.print(f"release key scheme: {', '.join(info['release_schemes'])}")
