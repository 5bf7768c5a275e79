"""The registry of compilation targets and of the target families that build them.

A *target* names a runtime/format pair a device can execute (e.g. ONNX QDQ int8
on onnxruntime's CPU/XNNPACK provider). Devices announce the targets they run
and the agent refuses bundles for other targets, so the name is part of the
signed manifest. A *family* is the code behind a group of targets: one module
in ``compiler.targets`` per family declares the format it accepts, the file it
emits, and its ``build`` step, and registers its targets. The pipeline only
looks targets up here and calls their family's ``build``, so a new family is a
new module and nothing else changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from compiler.errors import UnknownTarget

if TYPE_CHECKING:
    from compiler.build import BuildFn

ONNX_QDQ = "onnx-qdq"
QNN_QDQ = "qnn-qdq"
TFLITE_INT8 = "tflite-int8"
ETHOS_U = "ethos-u"


@dataclass(frozen=True)
class Family:
    """A group of targets built the same way: what it takes, what it emits, how it builds."""

    name: str  # the ``backend`` of its targets
    accepts: str  # input model format: onnx | tflite
    emits: str  # the one file the runtime loads, e.g. model.onnx
    build: BuildFn
    summary: str


@dataclass(frozen=True)
class Target:
    """One compilation target.

    ``backend`` names its family, which says what it accepts and the single
    file it emits (``model_file``, ``manifest.files[0]``);
    ``default_hardware_ids`` are used when the caller does not narrow them.
    """

    name: str
    backend: str
    description: str
    default_hardware_ids: tuple[str, ...]
    runtime: str
    operator_domains: tuple[str, ...] = ("", "ai.onnx")
    options: tuple[tuple[str, str], ...] = ()  # backend settings, e.g. (("activations", "uint16"),)
    # Ethos-U: the Vela accelerator/system/memory-mode config and the budgets the gate applies.
    vela: tuple[str, str, str] | None = None
    budgets: tuple[tuple[str, float], ...] = ()

    @property
    def accepts(self) -> str:
        """Input model format (``onnx`` | ``tflite``): its family's."""
        return family_of(self).accepts

    @property
    def model_file(self) -> str:
        """The file the runtime loads: what its family emits."""
        return family_of(self).emits

    def option(self, key: str, default: str = "") -> str:
        return dict(self.options).get(key, default)

    def unsupported_domains(self, used: set[str]) -> list[str]:
        """Operator domains a model uses that this target's runtime does not implement."""
        return sorted(d for d in used if d not in self.operator_domains)


_FAMILIES: dict[str, Family] = {}
_REGISTRY: dict[str, Target] = {}


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Add a family (a module's ``FAMILY``); refuses silent redefinition like ``register_target``."""
    if family.name in _FAMILIES and not replace:
        raise ValueError(f"target family {family.name!r} is already registered")
    _FAMILIES[family.name] = family
    return family


def family_of(target: Target) -> Family:
    """The family that builds ``target``."""
    try:
        return _FAMILIES[target.backend]
    except KeyError:
        raise UnknownTarget(
            f"target {target.name!r}: no family {target.backend!r} is registered "
            f"(families: {', '.join(sorted(_FAMILIES))})"
        ) from None


def register_target(target: Target, *, replace: bool = False) -> None:
    """Add a target; refuses silent redefinition so two plugins cannot fight over a name.

    The target's family (``backend``) must be registered: it says what the target accepts and emits.
    """
    if target.name in _REGISTRY and not replace:
        raise ValueError(f"target {target.name!r} is already registered")
    family_of(target)
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
