"""``ethos-u55-*`` / ``ethos-u65-*``: ``tflite-int8`` (PRELU made int8) compiled by Vela for Arm Ethos-U.

The evaluated model is the int8 TFLite before Vela (the Ethos-U custom op does
not run on the host); the shipped file is Vela's. Vela's summary gives SRAM,
flash/DRAM, cycles and the ops left on the Cortex-M CPU, which the gate checks
against the budgets declared here per configuration.

When all-8-bit misses the gate, the TFLite search runs here too (16-bit
activations, int16x8 kernels, on the most sensitive ops). Vela runs int16x8
for most ops it supports and leaves the rest on the CPU, and 16-bit tensors
double their SRAM: so the chosen mix is compiled by Vela next to the all-8-bit
model and the report shows both (``mixed_precision["vela"]``: SRAM, flash,
cycles, CPU ops). The budgets are then checked on the mix that ships.
"""

from __future__ import annotations

from typing import Any

from compiler.build import BuildRequest, Built, build_tflite_int8
from compiler.gate import Gate
from compiler.targets.registry import ETHOS_U, Family, Target, register_family, register_target
from compiler.vela import VelaConfig, run_vela


def build(req: BuildRequest) -> Built:
    tgt = req.target
    assert tgt.vela is not None, f"{tgt.name}: an Ethos-U target without a Vela config"
    built = build_tflite_int8(req, npu=True)
    req.progress("vela", 0.7)
    compiled, summary = run_vela(built.artifact, VelaConfig(*tgt.vela), req.work / "vela")
    built.report["npu"] = {
        "vela": summary,
        "budgets": (req.gate or Gate()).budgets(dict(tgt.budgets)),
        "compiled_bytes": compiled.stat().st_size,
        "evaluated": "the int8 TFLite before Vela (the Ethos-U op cannot run on this host)",
    }
    built.artifact = compiled
    mixed = built.report.get("mixed_precision")
    eight = req.work / "mixed-8bit.tflite"
    if isinstance(mixed, dict) and mixed.get("chosen") and eight.is_file():
        _, summary_8bit = run_vela(eight, VelaConfig(*tgt.vela), req.work / "vela-8bit")
        mixed["vela"] = {"8bit": vela_cost(summary_8bit), "chosen": vela_cost(summary)}
    return built


def vela_cost(summary: dict[str, Any]) -> dict[str, Any]:
    """What a precision mix costs on the NPU: memory, cycles and the ops Vela left on the CPU."""
    keys = ("sram_kib", "flash_kib", "dram_kib", "cycles_total", "cpu_operators", "cpu_ops_by_type")
    return {k: summary.get(k) for k in keys}


FAMILY = register_family(
    Family(
        name=ETHOS_U,
        accepts="tflite",
        emits="model.tflite",
        build=build,
        summary="tflite-int8 compiled by Vela for Arm Ethos-U, gated on SRAM, flash and CPU ops",
    )
)

# Budgets: SRAM for the tensor arena, flash (weights + command stream; DRAM on Ethos-U65), and the
# share of ops left on the Cortex-M CPU. Sized for typical boards (Corstone-300 / i.MX93 class).
ETHOS_CONFIGS = {
    "ethos-u55-128": (("Ethos_U55_High_End_Embedded", "Shared_Sram"), 2048.0, 4096.0),
    "ethos-u55-256": (("Ethos_U55_High_End_Embedded", "Shared_Sram"), 2048.0, 4096.0),
    "ethos-u65-256": (("Ethos_U65_High_End", "Dedicated_Sram"), 1024.0, 16384.0),
    "ethos-u65-512": (("Ethos_U65_High_End", "Dedicated_Sram"), 1024.0, 16384.0),
}
MAX_CPU_FRACTION = 0.25
for _name, ((_system, _memory), _sram, _flash) in ETHOS_CONFIGS.items():
    register_target(
        Target(
            name=_name,
            backend=FAMILY.name,
            description=f"tflite-int8 compiled by Vela for Arm {_name.replace('ethos', 'Ethos')} "
            f"({_system}, {_memory})",
            default_hardware_ids=(f"{_name}-board",),
            runtime="tflite-micro-ethos-u",
            operator_domains=(),
            vela=(_name, _system, _memory),
            budgets=(
                ("max_sram_kib", _sram),
                ("max_flash_kib", _flash),
                ("max_cpu_fraction", MAX_CPU_FRACTION),
            ),
        )
    )
