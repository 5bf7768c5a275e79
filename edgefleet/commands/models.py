"""`edgefleet models`: push, list, show, pull and revoke signed bundles on the fleet server."""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from edgefleet.commands.common import (
    EXIT_USAGE,
    JsonOpt,
    ServerOpt,
    TokenOpt,
    api,
    client,
    console,
    err,
    fail,
    print_json,
    transfer_progress,
)
from edgefleet.commands.keys import DEFAULT_PASS_ENV, PassEnvOpt, PassFileOpt, load_role_key

models_app = typer.Typer(
    help="Push, list, show, pull and revoke signed model bundles on the fleet server.", no_args_is_help=True
)


KeysOpt = Annotated[
    Path, typer.Option("--keys", help="Key directory holding release.key (signs the TUF release metadata).")
]
RefArg = Annotated[str, typer.Argument(help="name:version", metavar="NAME:VERSION", show_default=False)]


def split_ref(ref: str) -> tuple[str, str]:
    name, sep, version = ref.partition(":")
    if not sep or not name or not version:
        fail(f"a model is named name:version, got {ref!r}", EXIT_USAGE)
    return name, version


@models_app.command("push")
def models_push(
    bundle: Annotated[Path, typer.Argument(help="Bundle directory.", exists=True, file_okay=False)],
    keys: KeysOpt = Path("keys"),
    no_tuf: Annotated[
        bool,
        typer.Option("--no-tuf", help="Upload without TUF release metadata (DSSE-only devices)."),
    ] = False,
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = DEFAULT_PASS_ENV,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Upload a signed bundle and release it: the server verifies the bundle against its trusted
    release keys and the TUF targets metadata signed here with release.key (never sent).

    On a terminal a progress bar shows the upload; the files are streamed, never read whole.
    """
    from signing.errors import TrustError
    from signing.manifest import read_bundle

    release_keys = None if no_tuf else [load_role_key(keys, "release", passphrase_file, passphrase_env)]
    try:
        total = sum(f.length for f in read_bundle(bundle).files)
    except (OSError, TrustError) as exc:
        fail(f"cannot read the bundle in {bundle}: {exc}")
    uploading = transfer_progress(f"uploading {bundle.name}", total, then="the server verifies the bundle")
    with client(server, token) as conn, uploading as advance:
        model = api(lambda: conn.push_bundle(bundle, release_keys=release_keys, progress=advance))
    if as_json:
        print_json(model)
    else:
        console.print(
            f"[green]pushed[/] {model['name']}:{model['version']} sha256 {model['sha256'][:12]}…",
            highlight=False,
        )


@models_app.command("revoke")
def models_revoke(
    family: Annotated[str, typer.Argument(help="Model family (the bundle name).")],
    below: Annotated[int, typer.Option("--below", min=0, help="Lowest release devices may still install.")],
    keys: KeysOpt = Path("keys"),
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = DEFAULT_PASS_ENV,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Raise the family's signed revocation floor: devices refuse releases below it (floors never go down)."""
    release_key = load_role_key(keys, "release", passphrase_file, passphrase_env)
    with client(server, token) as conn:
        try:
            out = api(lambda: conn.revoke_below(family, below, [release_key]))
        except ValueError as exc:
            fail(str(exc))
    if as_json:
        print_json(out)
    else:
        console.print(
            f"[green]revoked[/] {family} releases below {below} (targets v{out['targets_version']})"
        )


@models_app.command("list")
def models_list(server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List the models the server holds."""
    with client(server, token) as conn:
        models = api(conn.models)
    if as_json:
        print_json(models)
        return
    table = Table("model", "release", "target", "hardware", "sha256", "size")
    for m in models:
        table.add_row(
            f"{m['name']}:{m['version']}",
            str(m["release"]),
            m["target"],
            ",".join(m.get("hardware_ids", [])),
            m["sha256"][:12],
            f"{m['length']:,}",
        )
    console.print(table)


@models_app.command("show")
def models_show(
    ref: RefArg,
    keys: Annotated[
        Path, typer.Option("--keys", help="Key directory whose trust.json checks the signature here.")
    ] = Path("keys"),
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """A model's release, compile report figures, provenance and signature status.

    The signature is checked here against KEYS/trust.json when there is one (the server
    checked it at upload against its own); the TUF line says whether the release is listed
    in the server's targets metadata with the same hash.
    """
    name, version = split_ref(ref)
    with client(server, token) as conn:
        model = api(lambda: conn.model(name, version))
        envelope = api(lambda: conn.model_envelope(model["sha256"]))
        targets = api(conn.tuf_targets)
    trusted, trust_note = _trusted_release_keys(keys)
    info = {
        "model": model,
        "signature": signature_status(envelope, model["sha256"], trusted, trust_note),
        "tuf": tuf_status(targets, name, version, model["sha256"]),
    }
    if as_json:
        print_json(info)
        return
    _print_model(info)


@models_app.command("metrics")
def models_metrics(
    ref: RefArg, server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """A model's figures in the field per hardware cohort and rollout stage: accuracy with its 95%
    Wilson interval, label coverage and delay, prediction and feature availability, CPU per inference;
    then precision, recall and FPR per class over all devices."""
    name, version = split_ref(ref)
    with client(server, token) as conn:
        out = api(lambda: conn.model_metrics(name, version))
    if as_json:
        print_json(out)
        return
    _print_metrics(out)


@models_app.command("acceptance")
def models_acceptance(
    ref: RefArg, server: ServerOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """What the devices' acceptance checks (the bundle's golden set on each device's own runtime,
    before the swap) measured, per hardware class, beside the figures compiled on the host."""
    name, version = split_ref(ref)
    with client(server, token) as conn:
        out = api(lambda: conn.model_acceptance(name, version))
    if as_json:
        print_json(out)
        return
    if out["golden_samples"] is None:
        console.print(f"{out['model']}: the bundle carries no golden set (no on-device check)")
        return
    console.print(
        f"{out['model']}: golden set of {out['golden_samples']} samples, {out['golden_bytes']} bytes"
    )
    for h in out["hardware"]:
        console.print(
            f"  {h['hardware_id']}: {h['devices']} devices, {h['passed']} passed, {h['refused']} refused"
        )
    for line in out["summary"] or ["no device has reported a check yet"]:
        console.print(f"  {line}")


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def _accuracy_cell(acc: Mapping[str, Any] | None) -> str:
    if not acc or acc.get("value") is None:
        return "-"
    lo, hi = acc["interval"]
    return f"{_pct(acc['value'])} [{_pct(lo)}, {_pct(hi)}] of {acc['labels']:,}"


def _print_metrics(out: Mapping[str, Any]) -> None:
    rollout = f", stages of rollout {out['rollout_id']}" if out.get("rollout_id") else ""
    console.print(f"[bold]{out['model']}[/] ({out['sha256'][:12]}){rollout}")
    table = Table(
        "cohort",
        "stage",
        "devices",
        "inferences",
        "accuracy [95% CI] of labels",
        "server labels",
        "coverage",
        "delay p50/p95 s",
        "predictions ok",
        "cpu ms/inf",
    )
    for column in table.columns:  # a narrow terminal wraps the figures, never cuts them to "…"
        column.overflow = "fold"
    # the cohort's name is what a reader looks for: whole, on one line
    table.columns[0].no_wrap = True
    table.columns[0].min_width = max([len(g["hardware_id"] or "all") for g in out["groups"]] + [5])
    for g in [*out["groups"], out["total"]]:
        stage = g["stage"]
        table.add_row(
            g["hardware_id"] or "[bold]all[/]",
            "-" if stage is None else str(stage),
            str(g["devices"]),
            f"{g['inferences']:,}",
            _accuracy_cell(g["accuracy"]) if g["accuracy"] else f"MAE {_num(g['mean_abs_error'], '{:.4g}')}",
            _accuracy_cell(g["server_labels"]),
            _pct(g["label_coverage"]),
            f"{_num(g['label_delay_p50_s'], '{:g}')}/{_num(g['label_delay_p95_s'], '{:g}')}",
            _pct(g["prediction_availability"]["value"]),
            _num(g["cpu_ms_per_inference"], "{:.3f}"),
        )
    console.print(table)
    total = out["total"]
    if total["classes"]:
        classes = Table("class", "support", "precision", "recall", "FPR", title="per class, all devices")
        for c, f in total["classes"].items():
            classes.add_row(c, f"{f['support']:,}", _pct(f["precision"]), _pct(f["recall"]), _pct(f["fpr"]))
        console.print(classes)
    if total["feature_availability"]:
        features = Table("input", "checked", "NaN", "missing", "out of range", "available", title="inputs")
        for n, f in total["feature_availability"].items():
            features.add_row(
                n,
                f"{f['checked']:,}",
                _pct(f["nan_share"]),
                _pct(f["missing_share"]),
                _pct(f["out_of_range_share"]),
                _pct(f["available"]),
            )
        console.print(features)
    console.print(f"energy per inference: null ({total['energy_note']})", highlight=False)


@models_app.command("pull")
def models_pull(
    ref: RefArg,
    out: Annotated[
        Path | None,
        typer.Option("--out", "-o", help="Bundle directory to write (default: NAME-VERSION.bundle)."),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUT if it exists.")] = False,
    server: ServerOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Download a model's bundle (model file and signed envelope), checked against the signed manifest.

    On a terminal a progress bar shows the download. The bundle is written aside and moved into
    place only once its hash and length match, so OUT never holds a partial bundle.
    """
    from signing.errors import TrustError
    from signing.manifest import ENVELOPE_NAME, BundleManifest, read_bundle, verify_file

    name, version = split_ref(ref)
    out = out or Path(f"{name}-{version}.bundle")
    if out.exists() and not force:
        fail(f"{out} exists (--force replaces it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    os.chmod(staging, 0o755)  # mkdtemp makes it owner-only; a bundle is public data
    try:
        with client(server, token) as conn:
            model = api(lambda: conn.model(name, version))
            manifest = BundleManifest.from_dict(model["manifest"])
            entry = manifest.model_file
            (staging / ENVELOPE_NAME).write_bytes(api(lambda: conn.model_envelope(model["sha256"])))
            with transfer_progress(f"downloading {entry.path}", entry.length) as advance:
                api(
                    lambda: conn.download_artifact(
                        model["sha256"], staging / entry.path, lambda n, _t: advance(n)
                    )
                )
            for other in manifest.files[1:]:  # the golden set: small, listed and signed
                data: bytes = api(functools.partial(conn.bundle_file, model["sha256"], other.path))
                (staging / other.path).write_bytes(data)
                verify_file(staging / other.path, other)
        verify_file(staging / entry.path, entry)
        if read_bundle(staging).model_file != entry:
            fail(f"the envelope the server holds for {ref} lists another model file")
        if out.exists():
            shutil.rmtree(out)
        staging.replace(out)
    except TrustError as exc:
        fail(f"downloaded {ref} does not match its signed manifest: {exc}", code=exc.code)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = {"model": ref, "bundle": str(out), "sha256": entry.sha256, "length": entry.length}
    if as_json:
        print_json(result)
    else:
        console.print(
            f"[green]pulled[/] {ref} into {out}/ ({entry.length:,} bytes, sha256 verified)", highlight=False
        )


def _trusted_release_keys(keys: Path) -> tuple[dict[str, Any] | None, str]:
    from signing.errors import TrustError
    from signing.keyring import KeyDir

    trust_path = keys / "trust.json"
    if not trust_path.is_file():
        return None, f"not checked here: no {trust_path} (pass --keys)"
    try:
        root = KeyDir(keys).trust_root()
    except (OSError, ValueError, TrustError) as exc:
        return None, f"not checked here: {trust_path} does not verify: {exc}"
    return dict(root.release_keys), f"trust root v{root.version} in {keys}"


def signature_status(
    envelope: bytes, sha256: str, trusted: Mapping[str, Any] | None, trust_note: str
) -> dict[str, Any]:
    """What signs the stored envelope and, given trusted release keys, whether it verifies for this file."""
    from signing import openssf
    from signing.errors import TrustError
    from signing.manifest import envelope_of, manifest_from_envelope
    from signing.safejson import loads as safe_loads

    status: dict[str, Any] = {"checked_against": trust_note}
    try:
        document = safe_loads(envelope)
        status["form"] = "openssf-sigstore-bundle" if openssf.is_bundle(document) else "dsse"
        status["signers"] = [str(s.get("keyid")) for s in envelope_of(document).get("signatures", [])]
    except (ValueError, TrustError) as exc:
        return {**status, "verified": False, "reason": f"malformed envelope: {exc}"}
    if trusted is None:
        return {**status, "verified": None}
    try:
        manifest = manifest_from_envelope(envelope, trusted)
    except TrustError as exc:
        return {**status, "verified": False, "reason": f"{exc.code}: {exc}"}
    if manifest.model_file.sha256 != sha256:
        return {**status, "verified": False, "reason": "the signed manifest names another model file"}
    return {**status, "verified": True}


def tuf_status(targets: bytes | None, name: str, version: str, sha256: str) -> dict[str, Any]:
    """Whether the server's TUF targets metadata lists this release with this file's hash (display only:
    devices verify the metadata chain themselves)."""
    from tuf.api.metadata import Metadata, Targets

    from signing.tuf_release import target_name

    if targets is None:
        return {"listed": False, "reason": "the server has no TUF targets metadata"}
    try:
        md = Metadata[Targets].from_bytes(targets)
    except Exception as exc:  # tuf raises several unrelated types for a malformed document
        return {"listed": False, "reason": f"targets metadata does not parse: {exc}"}
    target = md.signed.targets.get(target_name(name, version))
    out: dict[str, Any] = {"targets_version": md.signed.version, "listed": target is not None}
    if target is not None:
        out["hash_matches"] = target.hashes.get("sha256") == sha256
    return out


def _print_model(info: Mapping[str, Any]) -> None:
    m = info["model"]
    manifest = m.get("manifest") or {}
    sig, tuf = info["signature"], info["tuf"]
    if sig.get("verified") is True:
        verdict = Text("verified", style="green")
    elif sig.get("verified") is None:
        verdict = Text("not checked", style="yellow")
    else:
        verdict = Text(f"NOT verified: {sig.get('reason')}", style="bold red")
    signers = ", ".join(k[:16] + "…" for k in sig.get("signers", [])) or "-"
    if tuf.get("listed"):
        tuf_text = f"listed in targets v{tuf['targets_version']}" + (
            "" if tuf.get("hash_matches") else " with ANOTHER hash"
        )
    else:
        tuf_text = f"not listed ({tuf.get('reason') or 'DSSE-only delivery'})"
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")  # hashes wrap whole, never cut
    rows: list[tuple[str, Text | str]] = [
        ("Model", f"{m['name']}:{m['version']}"),
        ("Release", str(m["release"])),
        ("Target", str(m["target"])),
        ("Hardware", ", ".join(m.get("hardware_ids", [])) or "-"),
        ("Model file", f"{m['sha256']} ({m['length']:,} bytes)"),
        ("Pushed", str(m.get("created_at"))),
        ("Signature", Text.assemble(verdict, f" ({sig.get('form', '?')}, {sig['checked_against']})")),
        ("Signed by", signers),
        ("TUF", tuf_text),
    ]
    provenance = manifest.get("provenance") or {}
    if provenance:
        rows.append(("Provenance", ""))
        rows += [(f"  {key}", str(value)) for key, value in provenance.items()]
    for label, value in rows:
        grid.add_row(
            label if label.startswith("  ") else f"{label}:",
            value if isinstance(value, Text) else Text(value),
        )
    console.print(grid)
    report = manifest.get("quantization") or {}
    if report:
        _print_compile_report(report)


def _print_compile_report(report: dict[str, Any]) -> None:
    """The compile report's decisive tables, as `edgefleet compile` printed them."""
    from edgefleet.commands.compile import print_report

    try:
        print_report(report, footer=False)
    except ImportError:  # pragma: no cover - a CLI without the compiler extra
        err.print("compile report: install the compiler extra to see its tables (or use --json)")


__all__ = ["models_app", "signature_status", "split_ref", "tuf_status"]
