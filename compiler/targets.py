"""Registry of compilation targets: what a bundle is built for and how.

A target names a runtime/format pair a device can execute (e.g. ONNX QDQ int8
on onnxruntime's CPU/XNNPACK provider). Devices announce the targets they run
and the agent refuses bundles for other targets, so the name is part of the
signed manifest. ``backend`` is the seam for more targets (``qnn-htp``,
``tflite-int8``, ``ethos-u``): the pipeline dispatches on it, and a new
backend only has to provide its own quantize step and model file name.
"""

from __future__ import annotations

from dataclasses import dataclass

from compiler.errors import UnknownTarget

ONNX_QDQ = "onnx-qdq"
QNN_QDQ = "qnn-qdq"
TFLITE_INT8 = "tflite-int8"
ETHOS_U = "ethos-u"


@dataclass(frozen=True)
class Target:
    """One compilation target.

    ``model_file`` is the single file the runtime loads (``manifest.files[0]``);
    ``default_hardware_ids`` are used when the caller does not narrow them.
    """

    name: str
    backend: str
    description: str
    model_file: str
    default_hardware_ids: tuple[str, ...]
    runtime: str
    operator_domains: tuple[str, ...] = ("", "ai.onnx")
    accepts: str = "onnx"  # input model format: onnx | tflite
    options: tuple[tuple[str, str], ...] = ()  # backend settings, e.g. (("activations", "uint16"),)
    # Ethos-U: the Vela accelerator/system/memory-mode config and the budgets the gate applies.
    vela: tuple[str, str, str] | None = None
    budgets: tuple[tuple[str, float], ...] = ()

    def option(self, key: str, default: str = "") -> str:
        return dict(self.options).get(key, default)

    def unsupported_domains(self, used: set[str]) -> list[str]:
        """Operator domains a model uses that this target's runtime does not implement."""
        return sorted(d for d in used if d not in self.operator_domains)


_REGISTRY: dict[str, Target] = {}


def register_target(target: Target, *, replace: bool = False) -> None:
    """Add a target; refuses silent redefinition so two plugins cannot fight over a name."""
    if target.name in _REGISTRY and not replace:
        raise ValueError(f"target {target.name!r} is already registered")
    _REGISTRY[target.name] = target


def known_targets() -> list[str]:
    """Names of all registered targets, sorted (for help texts and error messages)."""
    return sorted(_REGISTRY)


def get_target(name: str) -> Target:
    """Look a target up by name; unknown names fail with the list of known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownTarget(f"unknown target {name!r}; known targets: {', '.join(known_targets())}") from None


register_target(
    Target(
        name="arm64-cpu",
        backend=ONNX_QDQ,
        description="ONNX static QDQ int8 (U8S8, per-channel) for onnxruntime CPU/XNNPACK on 64-bit ARM",
        model_file="model.onnx",
        default_hardware_ids=("rpi4", "rpi5", "jetson-nano", "generic-arm64"),
        runtime="onnxruntime",
        # onnxruntime's CPU provider implements the standard, ONNX-ML and Microsoft contrib ops.
        operator_domains=("", "ai.onnx", "ai.onnx.ml", "com.microsoft"),
    )
)

for _bits in ("8", "16"):
    register_target(
        Target(
            name="qnn-htp" if _bits == "8" else "qnn-htp-a16",
            backend=QNN_QDQ,
            description=f"ONNX QDQ for onnxruntime's QNN EP on the Qualcomm Hexagon NPU (HTP), "
            f"{_bits}-bit activations, 8-bit weights",
            model_file="model.onnx",
            default_hardware_ids=("qcs6490", "qcs8550", "snapdragon-8-gen3"),
            runtime="onnxruntime-qnn",
            operator_domains=("", "ai.onnx", "com.microsoft"),
            options=(("activations", f"uint{_bits}"),),
        )
    )

register_target(
    Target(
        name="tflite-int8",
        backend=TFLITE_INT8,
        description="full-integer TFLite (int8 in/out) by ai-edge-quantizer, run by LiteRT (ai-edge-litert)",
        model_file="model.tflite",
        default_hardware_ids=("rpi4", "rpi5", "generic-arm64", "android-arm64"),
        runtime="litert",
        operator_domains=(),
        accepts="tflite",
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
            backend=ETHOS_U,
            description=f"tflite-int8 compiled by Vela for Arm {_name.replace('ethos', 'Ethos')} "
            f"({_system}, {_memory})",
            model_file="model.tflite",
            default_hardware_ids=(f"{_name}-board",),
            runtime="tflite-micro-ethos-u",
            operator_domains=(),
            accepts="tflite",
            vela=(_name, _system, _memory),
            budgets=(
                ("max_sram_kib", _sram),
                ("max_flash_kib", _flash),
                ("max_cpu_fraction", MAX_CPU_FRACTION),
            ),
        )
    )
