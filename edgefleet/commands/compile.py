"""`edgefleet compile`: quantize, evaluate, gate and sign a model for a target."""

from __future__ import annotations

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
    shows_progress,
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
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace the bundle directory if it exists.")
    ] = False,
    keys: Annotated[Path, typer.Option("--keys", help="Key directory (uses release.key).")] = Path("keys"),
    hardware: Annotated[
        list[str] | None, typer.Option("--hw", help="Hardware id the bundle is for (repeatable).")
    ] = None,
    min_agreement: Annotated[float | None, typer.Option(help="Gate: min top-1 agreement.")] = None,
    min_snr: Annotated[float | None, typer.Option("--min-snr", help="Gate: min SNR in dB.")] = None,
    min_cosine: Annotated[float | None, typer.Option(help="Gate: min cosine similarity.")] = None,
    output_kind: Annotated[
        list[str] | None,
        typer.Option(
            "--output-kind",
            help="Declare output kinds: name=kind[:param=v],... (classification, regression, detection, "
            "segmentation, sequence, integer) or a .toml/.json file; undeclared ones are inferred.",
        ),
    ] = None,
    metric: Annotated[
        str | None,
        typer.Option(
            "--metric", help="Your metric module:function(fp32_outputs, int8_outputs, labels) -> float."
        ),
    ] = None,
    metric_threshold: Annotated[
        float | None, typer.Option("--metric-threshold", help="Gate: min value of --metric.")
    ] = None,
    metric_only: Annotated[
        bool, typer.Option("--metric-only", help="Gate on --metric alone, not on the outputs' kinds.")
    ] = False,
    min_box_f1: Annotated[float | None, typer.Option(help="Gate (detection): min box match F1.")] = None,
    min_mask_iou: Annotated[float | None, typer.Option(help="Gate (segmentation): min mask IoU.")] = None,
    max_sequence_error: Annotated[
        float | None, typer.Option(help="Gate (sequence): max relative error after N steps.")
    ] = None,
    max_memory: Annotated[
        str | None,
        typer.Option(
            "--max-memory",
            help="Memory the compile plans its calibration/evaluation batches in, e.g. 4G "
            "(default: from the machine's limits).",
        ),
    ] = None,
    mixed_precision_budget: Annotated[
        float,
        typer.Option(
            "--mixed-precision-budget",
            help="Seconds to search 16-bit/float layers when 8-bit misses the gate "
            "(arm64-cpu, qnn-htp, tflite-int8; 0 = off).",
        ),
    ] = 120.0,
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
    from compiler.memory import parse_size
    from compiler.pipeline import compile_model
    from compiler.sources import Preprocess

    try:
        memory_bytes = parse_size(max_memory) if max_memory is not None else None
    except ValueError as exc:
        fail(f"--max-memory: {exc}")
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
                "min_box_f1": min_box_f1,
                "min_mask_iou": min_mask_iou,
                "max_sequence_error": max_sequence_error,
                "metric": metric,
                "metric_threshold": metric_threshold,
            }.items()
            if v is not None
        }
        try:
            gate = Gate(**overrides, metric_only=metric_only)
        except ValueError as exc:
            fail(f"--metric: {exc}")
    out = out or Path(f"{name}-{version}.bundle")
    try:
        pre = Preprocess.parse(preprocess) if preprocess else None
    except CompilerError as exc:
        fail(str(exc))
    try:
        with Progress(console=err, transient=True, disable=not shows_progress()) as progress:
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
                overwrite=overwrite,
                output_kinds=",".join(output_kind) if output_kind else None,
                max_memory=memory_bytes,
                mixed_precision_seconds=mixed_precision_budget,
            )
    except GateFailed as exc:
        if as_json:
            log = exc.report.get("notes", [])
            print_json({"ok": False, "failures": exc.failures, "report": exc.report, "log": log})
        if not as_json:
            print_report(exc.report)
            _notes_line(exc.report)
        fail("quality gate failed, no bundle written: " + "; ".join(exc.failures), code="gate_failed")
    except CompilerError as exc:
        _print_notes(exc.notes)
        fail(str(exc))
    except (FileExistsError, FileNotFoundError) as exc:
        fail(str(exc))
    manifest = result.manifest
    if as_json:
        print_json(
            {
                "ok": True,
                "bundle": str(result.bundle_dir),
                "manifest": manifest.to_dict(),
                "log": result.report.get("notes", []),
            }
        )
        return
    print_report(result.report)
    _notes_line(result.report)
    console.print(
        f"[green]wrote[/] {result.bundle_dir} ({manifest.ref}, release {manifest.release}, "
        f"{manifest.target}, sha256 {manifest.model_file.sha256[:12]}…)"
    )


# The terminal shows what decides whether to ship; the method and run details are in --html and --json.
TERMINAL_TABLES = (
    "gate",
    "checks",
    "outputs",
    "accuracy",
    "precision",
    "size",
    "bytes",
    "latency",
    "npu",
    "budgets",
    "ops",
)


def print_report(report: dict[str, Any], footer: bool = True) -> None:
    """The report's decisive tables (as the HTML page shows them), nested values as ``key: value`` lines."""
    from compiler.report_tables import fmt, tables

    for t in tables(report):
        if t.key not in TERMINAL_TABLES:
            continue
        table = Table(title=t.title, caption=t.caption or None, title_justify="left", caption_justify="left")
        for column in t.head:
            # Fold long cells (output names, Vela figures) onto more lines: a cut cell hides the very
            # figure (SRAM, cycles, an output's name) the user is reading for.
            table.add_column(column, overflow="fold")
        for row in t.rows:
            table.add_row(*(fmt(c) for c in row))
        console.print(table)
    if footer:
        console.print("[dim]method, calibration and run details: --html FILE or --json[/]")


def _print_notes(rows: list[dict[str, Any]]) -> None:
    """After a failure without a report: the toolchain's messages, often the real reason."""
    if not rows:
        return
    table = Table("level", "from", "message", title="toolchain messages", title_justify="left")
    for row in rows:
        times = f" (x{row['count']})" if row["count"] > 1 else ""
        table.add_row(row["level"], row["source"], row["message"] + times)
    err.print(table)


def _notes_line(report: dict[str, Any]) -> None:
    count = len(report.get("notes") or [])
    if count:
        console.print(
            f"[dim]{count} toolchain message(s) kept in the report's notes: --html FILE or --json[/]"
        )
