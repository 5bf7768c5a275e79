"""`edgefleet examples`: a model and data to try the loop with, trained here (nothing is downloaded).

``digits`` is the model the demo compiles and rolls out (``compiler.examples.train_digits``): an MLP on
scikit-learn's 8x8 digits, with calibration samples and a labelled held-out set. Files already in the
output directory are never overwritten unless ``--force`` says so.
"""

from __future__ import annotations

import os
import shlex
import tempfile
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from edgefleet.commands.common import JsonOpt, console, fail, print_json

examples_app = typer.Typer(
    help="Write an example model and data to try the compile -> push -> rollout loop with.",
    no_args_is_help=True,
)

# What ``digits`` writes, under the names the README's loop uses; values are train_digits's own names.
DIGITS_FILES = {"model.onnx": "digits.onnx", "calib.npz": "calib.npz", "eval.npz": "eval.npz"}


@examples_app.command("digits")
def digits_cmd(
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Directory to write into (created if missing).")
    ] = Path("."),
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite model.onnx, calib.npz, eval.npz there.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Train the digits classifier; write model.onnx, calib.npz and eval.npz.

    model.onnx: float32 input [N, 64] (8x8 pixels, 0..1) -> float32 scores [N, 10].
    calib.npz: 400 training images (x). eval.npz: the held-out split with labels (x, y).
    """
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        fail(f"cannot write to {out}: {exc.strerror or exc}")
    taken = [name for name in DIGITS_FILES if (out / name).exists()]
    if taken and not force:
        fail(f"{out} has {', '.join(taken)} already (--force overwrites)")
    try:
        from compiler.examples import train_digits
    except ImportError as exc:
        fail(f"examples need the compiler extra (pip install 'edgefleet[compiler]'): {exc}")
    try:
        # Trained aside and moved in whole: an interrupted run leaves no half-written model.onnx.
        with tempfile.TemporaryDirectory(prefix=".edgefleet-digits-", dir=out) as tmp:
            example = train_digits(Path(tmp))
            for name, written in DIGITS_FILES.items():
                os.replace(Path(tmp) / written, out / name)
    except OSError as exc:
        fail(f"cannot write to {out}: {exc.strerror or exc}")
    files = {name.split(".")[0]: str(out / name) for name in DIGITS_FILES}
    sizes = {name: (out / name).stat().st_size for name in DIGITS_FILES}
    compile_cmd = (
        f"edgefleet compile {shlex.quote(files['model'])} --calib {shlex.quote(files['calib'])} "
        f"--eval {shlex.quote(files['eval'])} --name digits --version 1"
    )
    if as_json:
        print_json(
            {
                "ok": True,
                "example": "digits",
                "files": files,
                "fp32_accuracy": round(example.accuracy, 4),
                "calibration_samples": example.n_calib,
                "evaluation_samples": example.n_eval,
                "next": compile_cmd,
            }
        )
        return
    table = Table("file", "bytes", "what", title="digits example", title_justify="left")
    table.add_row(files["model"], str(sizes["model.onnx"]), "float model: input [N, 64] -> scores [N, 10]")
    table.add_row(files["calib"], str(sizes["calib.npz"]), f"{example.n_calib} calibration inputs (x)")
    table.add_row(
        files["eval"], str(sizes["eval.npz"]), f"{example.n_eval} held-out inputs and labels (x, y)"
    )
    table.caption = f"float accuracy on the held-out set: {example.accuracy:.4f}"
    console.print(table)
    console.print("next:", compile_cmd, highlight=False, soft_wrap=True)
