"""Inside the arm64 userland: run one compiled model on the agent's own runtime and compare.

Reads ``<dir>/model.onnx`` and ``<dir>/data.npz`` (``x``: inputs; ``int8:<output>``: the
host's int8 outputs with onnxruntime's QDQ reference semantics, which the compiler's gate
judged; ``fp32:<output>``: the float model's), runs the model one sample at a time with
:class:`device_agent.runtime.OnnxRuntimeFactory` (what the agent serves with: graph
optimizations on, so onnxruntime's fused ARM int8 kernels for the emulated CPU run), and
prints one JSON line: per output the share of bit-identical values, the largest absolute
difference and the top-1 agreement against the reference, and the SNR against fp32 next
to the host's. Only numpy, onnxruntime and the agent are needed.

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
from device_agent.runtime import OnnxRuntimeFactory


def main(folder: str) -> int:
    root = Path(folder)
    model = OnnxRuntimeFactory().load(root / "model.onnx", "lane")
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
        "samples": len(x),
        "outputs": {},
    }
    for n in names:
        out = np.concatenate(outs[n], axis=0)
        diff = np.abs(out.astype(np.float64) - ref[n].astype(np.float64))
        flat_r, flat_o = ref[n].reshape(len(x), -1), out.reshape(len(x), -1)
        result["outputs"][n] = {  # type: ignore[index]
            "bit_identical": float((out == ref[n]).mean()),
            "max_abs_diff": float(diff.max()),
            "top1_agreement": float((flat_r.argmax(axis=1) == flat_o.argmax(axis=1)).mean()),
            "snr_db_device": regression(fp32[n], out)["snr_db"],
            "snr_db_reference": regression(fp32[n], ref[n])["snr_db"],
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
