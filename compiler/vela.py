"""Compile a full-int8 TFLite model for an Arm Ethos-U NPU with Vela, and read what it costs.

Vela (``ethos-u-vela``) replaces the ops the NPU runs by one ``ethos-u``
custom op and leaves the rest for the CPU (TFLite Micro). What decides whether
a model fits a microcontroller is in its summary: SRAM for the tensor arena,
flash (or DRAM on Ethos-U65) for weights and command stream, the share of ops
left on the CPU, and the estimated cycles. We run the ``vela`` console script
(its Python API is not stable across releases), take the figures from the
summary CSV it writes, and the CPU/NPU op counts from its stdout, which is the
only place it prints them.
"""

from __future__ import annotations

import csv
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.errors import QuantizationError

OPS_RE = re.compile(r"^(CPU|NPU) operators = (\d+)", re.MULTILINE)
WARNING_RE = re.compile(r"Warning \(supported operators\) operator: (\w+), ofm: '([^']*)'\nReason: (.*)")


@dataclass(frozen=True)
class VelaConfig:
    """An Ethos-U accelerator and system configuration from Vela's bundled ``Arm/vela.ini``."""

    accelerator: str  # e.g. ethos-u55-128
    system_config: str
    memory_mode: str


def vela_executable() -> str:
    """The ``vela`` script next to this interpreter (the venv), else on PATH."""
    local = Path(sys.executable).with_name("vela")
    if local.is_file():
        return str(local)
    found = shutil.which("vela")
    if not found:
        raise QuantizationError("Vela is not installed: pip install 'ethos-u-vela>=4.0' (extra 'ethos')")
    return found


def run_vela(model: Path, config: VelaConfig, out_dir: Path) -> tuple[Path, dict[str, Any]]:
    """Compile ``model``; return the Vela-compiled ``.tflite`` and the parsed summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        vela_executable(),
        "--accelerator-config",
        config.accelerator,
        "--config",
        "Arm/vela.ini",
        "--system-config",
        config.system_config,
        "--memory-mode",
        config.memory_mode,
        "--output-dir",
        str(out_dir),
        str(model),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, timeout=600)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip()[-800:]
        raise QuantizationError(f"Vela failed for {config.accelerator} (exit {proc.returncode}): {tail}")
    compiled = out_dir / f"{model.stem}_vela.tflite"
    summaries = sorted(out_dir.glob(f"{model.stem}_summary_*.csv"))
    if not compiled.is_file() or not summaries:
        raise QuantizationError(f"Vela wrote no compiled model or summary in {out_dir}: {proc.stdout[-400:]}")
    return compiled, parse_summary(summaries[0], proc.stdout)


def parse_summary(csv_path: Path, stdout: str) -> dict[str, Any]:
    """The figures the gate and the report use, in KiB, cycles and op counts."""
    with open(csv_path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise QuantizationError(f"{csv_path}: empty Vela summary")
    row = rows[0]

    def num(key: str) -> float:
        try:
            return float(row.get(key) or 0.0)
        except ValueError:
            return 0.0

    ops = {kind: int(count) for kind, count in OPS_RE.findall(stdout)}
    cpu, npu = ops.get("CPU", 0), ops.get("NPU", 0)
    cpu_ops: dict[str, int] = {}
    reasons: dict[str, str] = {}
    for op, _ofm, reason in WARNING_RE.findall(stdout):
        cpu_ops[op] = cpu_ops.get(op, 0) + 1
        reasons.setdefault(op, reason.strip())
    return {
        "accelerator": row.get("accelerator_configuration"),
        "system_config": row.get("system_config"),
        "memory_mode": row.get("memory_mode"),
        "sram_kib": round(num("sram_memory_used"), 2),
        "flash_kib": round(num("off_chip_flash_memory_used") + num("on_chip_flash_memory_used"), 2),
        "dram_kib": round(num("dram_memory_used"), 2),
        "cycles_total": int(num("cycles_total")),
        "cycles_npu": int(num("cycles_npu")),
        "inference_ms_estimate": round(1000 * num("inference_time"), 4),
        "macs": int(num("nn_macs")),
        "cpu_operators": cpu,
        "npu_operators": npu,
        "cpu_fraction": round(cpu / (cpu + npu), 4) if cpu + npu else 0.0,
        "cpu_ops_by_type": dict(sorted(cpu_ops.items())),
        "cpu_reasons": reasons,
    }
