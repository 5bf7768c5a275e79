"""`edgefleet compile`: quantize, evaluate, gate and sign a model for a target."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from edgefleet.commands.common import (
    JsonOpt,
    console,
    err,
    fail,
    print_json,
)
from edgefleet.commands.keys import DEFAULT_PASS_ENV, PassEnvOpt, PassFileOpt, load_role_key


def compile_cmd(
    model: Annotated[Path, typer.Argument(help="Float ONNX or TFLite model.", exists=True, dir_okay=False)],
    calib: Annotated[
        str,
        typer.Option(
            "--calib", help="Calibration samples: .npz, image folder (see --preprocess) or module:function."
        ),
    ],
    name: Annotated[str, typer.Option("--name", help="Model family name.")],
    version: Annotated[str, typer.Option("--version", help="Version label, e.g. 7.")],
    release: Annotated[int, typer.Option("--release", help="Monotonic release counter.")] = 1,
    target: Annotated[
        str,
        typer.Option(
            "--target",
            "-t",
            help="Hardware target: arm64-cpu, qnn-htp, qnn-htp-a16 (ONNX); tflite-int8, ethos-u55-128, "
            "ethos-u55-256, ethos-u65-256, ethos-u65-512 (TFLite).",
        ),
    ] = "arm64-cpu",
    eval_data: Annotated[
        str | None, typer.Option("--eval", help="Held-out samples (same kinds as --calib; labels optional).")
    ] = None,
    preprocess: Annotated[
        str | None,
        typer.Option(help="Image preprocessing, e.g. size=48x192,layout=NCHW,scale=0.0039,mean=0.5,std=0.5."),
    ] = None,
    html: Annotated[
        Path | None, typer.Option("--html", help="Write a self-contained HTML report here.")
    ] = None,
    latency_repeats: Annotated[int, typer.Option(help="Host latency: median of N runs (0 = skip).")] = 20,
    max_accuracy_drop: Annotated[float | None, typer.Option(help="Gate: max accuracy drop.")] = None,
    max_sram_kib: Annotated[float | None, typer.Option(help="Gate (Ethos-U): max SRAM KiB.")] = None,
    max_flash_kib: Annotated[float | None, typer.Option(help="Gate (Ethos-U): max flash/DRAM KiB.")] = None,
    max_cpu_fraction: Annotated[
        float | None, typer.Option(help="Gate (Ethos-U): max fraction of ops left on the CPU.")
    ] = None,
    out: Annotated[Path | None, typer.Option("--out", "-o", help="Bundle directory to write.")] = None,
    keys: Annotated[Path, typer.Option("--keys", help="Key directory (uses release.key).")] = Path("keys"),
    hardware: Annotated[
        list[str] | None, typer.Option("--hw", help="Hardware id the bundle is for (repeatable).")
    ] = None,
    min_agreement: Annotated[float | None, typer.Option(help="Gate: min top-1 agreement.")] = None,
    min_snr: Annotated[float | None, typer.Option("--min-snr", help="Gate: min SNR in dB.")] = None,
    min_cosine: Annotated[float | None, typer.Option(help="Gate: min cosine similarity.")] = None,
    no_gate: Annotated[
        bool, typer.Option("--no-gate", help="Write the bundle even if quality fails (recorded).")
    ] = False,
    passphrase_file: PassFileOpt = None,
    passphrase_env: PassEnvOpt = DEFAULT_PASS_ENV,
    as_json: JsonOpt = False,
) -> None:
    """Quantize a float model for a target, measure what it cost, gate, and write a signed bundle."""
    from rich.progress import Progress

    from compiler import CompilerError, Gate, GateFailed
    from compiler.pipeline import compile_model
    from compiler.sources import Preprocess

    release_key = load_role_key(keys, "release", passphrase_file, passphrase_env)
    gate: Gate | None = None
    if not no_gate:
        overrides: dict[str, Any] = {
            k: v
            for k, v in {
                "min_top1_agreement": min_agreement,
                "min_snr_db": min_snr,
                "min_cosine": min_cosine,
                "max_accuracy_drop": max_accuracy_drop,
                "max_sram_kib": max_sram_kib,
                "max_flash_kib": max_flash_kib,
                "max_cpu_fraction": max_cpu_fraction,
            }.items()
            if v is not None
        }
        gate = Gate(**overrides)
    out = out or Path(f"{name}-{version}.bundle")
    try:
        pre = Preprocess.parse(preprocess) if preprocess else None
    except CompilerError as exc:
        fail(str(exc))
    try:
        with Progress(console=err, transient=True, disable=as_json) as progress:
            task = progress.add_task("compiling", total=1.0)

            def report(step: str, fraction: float) -> None:
                progress.update(task, description=step, completed=fraction)

            result = compile_model(
                model,
                target=target,
                calib_path=calib,
                eval_path=eval_data,
                out_dir=out,
                release_key=release_key,
                name=name,
                version=version,
                release=release,
                hardware_ids=hardware or None,
                gate=gate,
                progress=report,
                preprocess=pre,
                latency_repeats=latency_repeats,
                html_report=html,
            )
    except GateFailed as exc:
        if as_json:
            print_json({"ok": False, "failures": exc.failures, "report": exc.report})
        if not as_json:
            _print_report(exc.report)
        fail("quality gate failed, no bundle written:\n  " + "\n  ".join(exc.failures))
    except (CompilerError, FileExistsError, FileNotFoundError) as exc:
        fail(str(exc))
    manifest = result.manifest
    if as_json:
        print_json({"ok": True, "bundle": str(result.bundle_dir), "manifest": manifest.to_dict()})
        return
    _print_report(result.report)
    console.print(
        f"[green]wrote[/] {result.bundle_dir} ({manifest.ref}, release {manifest.release}, "
        f"{manifest.target}, sha256 {manifest.model_file.sha256[:12]}…)"
    )


def _print_report(report: dict[str, Any]) -> None:
    outputs = Table("output", "top-1 agree", "cosine", "SNR dB", title="int8 vs fp32 (held-out)")
    for out_name, fig in report.get("outputs", {}).items():
        outputs.add_row(
            out_name,
            _fmt(fig.get("top1_agreement")),
            _fmt(fig.get("cosine_mean")),
            _fmt(fig.get("snr_db")),
        )
    console.print(outputs)
    split = report.get("size", {}).get("parts")
    if split:
        sizes = Table("file", "total", "constants", "quantization", "structure", title="size (bytes)")
        for which in ("fp32", "int8"):
            part = split[which]
            sizes.add_row(which, *(str(part[k]) for k in ("total", "constants", "quantization", "structure")))
        sizes.caption = f"int8 numbers alone: {split['data_ratio']} of fp32 (no table rewrite goes below)"
        console.print(sizes)
    table = Table("figure", "value", title="quantization report")
    for key, value in report.items():
        if key == "outputs":
            continue
        if key == "size" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k != "parts"}
        if isinstance(value, dict | list):
            value = json.dumps(value, default=str)
            value = value if len(value) < 80 else value[:77] + "..."
        elif isinstance(value, float):
            value = f"{value:.4g}"
        table.add_row(str(key), str(value))
    console.print(table)


def _fmt(value: Any) -> str:
    return "-" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------- models
