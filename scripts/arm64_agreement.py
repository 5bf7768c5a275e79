"""Inside the arm64 userland: run one compiled model on the agent's own runtime and compare.

Reads ``<dir>/model.onnx`` or ``<dir>/model.tflite`` and ``<dir>/data.npz`` (``x``: inputs;
``int8:<output>``: the host's outputs of the int8 model; ``fp32:<output>``: the float
model's), runs the model one sample at a time with the runtime the agent serves it with, and
prints one JSON line: per output the share of bit-identical values, the largest absolute
difference and (for a ``(samples, classes)`` output) the top-1 agreement against the host's,
and the SNR against fp32 next to the host's. Only numpy, the runtimes and the agent are needed.

- ONNX: :class:`device_agent.runtime.OnnxRuntimeFactory` (graph optimizations on, so
  onnxruntime's fused ARM int8 kernels for the emulated CPU run); the host's outputs are
  onnxruntime's QDQ reference semantics, which the compiler's gate judged.
- TFLite: :class:`device_agent.runtime.LiteRtFactory` (LiteRT with its default XNNPACK
  delegate, float in and out through the model's own scales); the host's outputs are the
  same agent code on the host's x86 LiteRT, so the only thing that differs is the CPU's
  kernels.

Usage: ``python scripts/arm64_agreement.py DIR`` (``QEMU_CPU`` picks the emulated CPU).
"""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

import numpy as np

from device_agent.figures import regression
from device_agent.runtime import LiteRtFactory, LoadedModel, OnnxRuntimeFactory


def load(folder: Path) -> tuple[str, LoadedModel]:
    """The folder's model on the agent's runtime for its format: ("onnx" | "tflite", model)."""
    if (folder / "model.tflite").is_file():
        return "tflite", LiteRtFactory().load(folder / "model.tflite", "lane", target="tflite-int8")
    if (folder / "model.onnx").is_file():
        return "onnx", OnnxRuntimeFactory().load(folder / "model.onnx", "lane")
    raise FileNotFoundError(f"{folder}: neither model.tflite nor model.onnx")


def compare(out: np.ndarray, ref: np.ndarray, fp32: np.ndarray) -> dict[str, float | None]:
    """Device outputs ``out`` against the host's ``ref`` and the float model's ``fp32``."""
    if out.shape != ref.shape:
        raise ValueError(f"device output shape {out.shape} differs from the host's {ref.shape}")
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    figures: dict[str, float | None] = {
        "bit_identical": float((out == ref).mean()),
        "max_abs_diff": float(diff.max()),
        "snr_db_device": regression(fp32, out)["snr_db"],
        "snr_db_reference": regression(fp32, ref)["snr_db"],
    }
    if ref.ndim == 2 and ref.shape[1] > 1:  # scores per class: top-1 means something
        figures["top1_agreement"] = float((ref.argmax(axis=1) == out.argmax(axis=1)).mean())
    return figures


def main(folder: str) -> int:
    root = Path(folder)
    runtime, model = load(root)
    with np.load(root / "data.npz", allow_pickle=False) as data:
        x = data["x"]
        names = [k.removeprefix("int8:") for k in data.files if k.startswith("int8:")]
        ref = {n: data[f"int8:{n}"] for n in names}
        fp32 = {n: data[f"fp32:{n}"] for n in names}
    outs: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for i in range(len(x)):
        for n, o in zip(names, model.run(x[i : i + 1]), strict=True):
            outs[n].append(np.asarray(o))
    result: dict[str, object] = {
        "cpu": os.environ.get("QEMU_CPU", "native"),
        "machine": platform.machine(),
        "runtime": runtime,
        "samples": len(x),
        "outputs": {n: compare(np.concatenate(outs[n], axis=0), ref[n], fp32[n]) for n in names},
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
