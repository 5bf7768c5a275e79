"""How many samples a compile may push through a model at once, from a memory budget.

Calibration and evaluation run the model on batches of samples, and an
onnxruntime session's memory grows with the batch: every activation of every
sample in the batch is alive at once (calibration keeps all of them, the
evaluation's fp32 and int8 sessions each keep their arena). A fixed batch of
32 put a 640x640 detector at a 16.9 GB peak, against 4.6 GB one sample at a
time; on a smaller machine that is a silent OOM kill. So the batch is planned:

- the *budget* is ``--max-memory`` or, automatically, the smallest of the
  address-space limit (``RLIMIT_AS``), the cgroup limit and what the machine has
  available, with a safety share kept free (``budget_from_machine``);
- the *per-sample cost* is the sum of the model's tensors for one sample, from
  ONNX shape inference with the sample's concrete shapes (an upper bound:
  onnxruntime reuses buffers), or the TFLite tensor table;
- the batch is what fits in the budget minus what the process already uses,
  times how many copies the step keeps (``plan_batch``), at least 1, at most 32.

Pure functions, plus ``current_usage`` and ``budget_from_machine`` that read
``/proc`` and the resource limits.
"""

from __future__ import annotations

import contextlib
import math
import re
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

MAX_BATCH = 32
AUTO_SHARE = 0.7  # of the limit the compile may plan for; the rest is headroom (libraries, fragmentation)
UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
# Copies of one sample's tensors alive per step (see plan_batch).
CALIBRATION_COPIES = 2.0  # the augmented float model: its tensors and their min/max reductions (measured ~2x)
EVALUATION_COPIES = 3.5  # the float model + the QDQ model run unoptimised (float, quantized, dequantized)


def parse_size(text: str) -> int:
    """``4G``, ``512M``, ``1.5G``, ``1000000``: bytes. Refuses anything else with ValueError."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)I?B?\s*", text.upper())
    if not m:
        raise ValueError(f"not a memory size: {text!r} (e.g. 4G, 512M)")
    value = int(float(m.group(1)) * UNITS[m.group(2)])
    if value <= 0:
        raise ValueError(f"memory size must be positive: {text!r}")
    return value


@dataclass(frozen=True)
class MemoryPlan:
    """The budget a compile plans its batches in, and where it came from."""

    budget: int
    source: str

    def batch(self, per_sample: int, copies: float, in_use: int, most: int = MAX_BATCH) -> int:
        return plan_batch(self.budget, per_sample, copies, in_use, most)

    def to_dict(self) -> dict[str, Any]:
        return {"budget_bytes": self.budget, "source": self.source}


def plan_batch(budget: int, per_sample: int, copies: float, in_use: int, most: int = MAX_BATCH) -> int:
    """Samples per batch: ``(budget - in_use) / (per_sample * copies)``, between 1 and ``most``.

    1 even when one sample does not fit: the compile then tries, and the report says it was over.
    """
    room = budget - in_use
    need = max(per_sample, 1) * copies
    return max(1, min(most, math.floor(room / need) if room > 0 else 1))


def _proc_status(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def _address_space_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def current_usage() -> int:
    """What the process holds now: resident memory, or its address space when that is what is limited."""
    rss = _proc_status("VmRSS") or 0
    if _address_space_limit() is not None:
        return max(rss, _proc_status("VmSize") or 0)
    return rss


def reset_peak() -> None:
    """Restart the peak-RSS count (``VmHWM``; Linux: ``5`` to ``/proc/self/clear_refs``), so a second
    compile in the same process reports its own peak. Without it ``peak_usage`` is the process's."""
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")


def peak_usage() -> int:
    """Peak resident memory since ``reset_peak`` (``VmHWM``), else of the process (``ru_maxrss``)."""
    hwm = _proc_status("VmHWM")
    if hwm is not None:
        return hwm
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024


def _cgroup_limit() -> int | None:
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            text = Path(path).read_text().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) < (1 << 60):
            return int(text)
    return None


def _available() -> int | None:
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"^MemAvailable:\s+(\d+) kB", text, re.MULTILINE)
    return int(m.group(1)) * 1024 if m else None


def budget_from_machine() -> MemoryPlan:
    """``AUTO_SHARE`` of the tightest of: RLIMIT_AS, the cgroup limit, available memory + what we hold."""
    limits: list[tuple[int, str]] = []
    if (limit := _address_space_limit()) is not None:
        limits.append((limit, "address-space limit (RLIMIT_AS)"))
    if (limit := _cgroup_limit()) is not None:
        limits.append((limit, "cgroup memory limit"))
    if (avail := _available()) is not None:
        limits.append((avail + (_proc_status("VmRSS") or 0), "available memory"))
    if not limits:
        return MemoryPlan(8 << 30, "automatic: 8 GiB (no limit readable)")
    limit, what = min(limits)
    return MemoryPlan(int(limit * AUTO_SHARE), f"automatic: {AUTO_SHARE:.0%} of the {what}")


def onnx_sample_bytes(model: Any, shapes: dict[str, tuple[int, ...]]) -> int:
    """Sum of every tensor's bytes for one sample: shape inference with the sample's concrete shapes.

    Tensors whose size stays unknown count as the largest known one (conservative).
    """
    import onnx

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    initializers = {i.name for i in fixed.graph.initializer}
    for value in fixed.graph.input:
        if value.name in initializers or value.name not in shapes:
            continue
        dims = value.type.tensor_type.shape.dim
        for dim, size in zip(dims, (1, *shapes[value.name][1:]), strict=False):
            dim.Clear()
            dim.dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    except Exception:  # shape inference gives up on some graphs; then only the inputs are known
        inferred = fixed
    known: list[int] = []
    unknown = 0
    for value in (*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output):
        if value.name in initializers or not value.type.HasField("tensor_type"):
            continue
        ttype = value.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in ttype.shape.dim]
        if any(d < 0 for d in dims) or not ttype.HasField("shape"):
            unknown += 1
            continue
        itemsize = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(ttype.elem_type)).itemsize
        known.append(int(np.prod(dims, dtype=np.int64)) * itemsize)
    return sum(known) + unknown * max(known, default=0)


def tflite_sample_bytes(model: Any) -> int:
    """Sum of the non-constant tensors' bytes of a (batch-1) TFLite model."""
    # TensorType -> bytes: FLOAT32, FLOAT16, INT32, UINT8, INT64, BOOL, INT16, INT8, FLOAT64
    sizes = {0: 4, 1: 2, 2: 4, 3: 1, 4: 8, 6: 1, 7: 2, 9: 1, 10: 8}
    total = 0
    for sg in model.subgraphs:
        for t in sg.tensors or []:
            data = model.buffers[t.buffer].data if t.buffer < len(model.buffers) else None
            if data is not None and len(data):
                continue
            shape = [int(d) for d in (t.shape if t.shape is not None else [])]
            total += int(np.prod([max(d, 1) for d in shape], dtype=np.int64)) * sizes.get(int(t.type), 4)
    return total
