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
