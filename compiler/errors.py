"""Exceptions the compiler raises, one class per thing the user must fix.

The CLI prints ``str(exc)`` and exits non-zero; the class tells a caller (or a
test) *which* input was wrong without parsing messages. Every class derives
from ``CompilerError`` so a caller can catch the whole family at once.
"""

from __future__ import annotations

from typing import Any


class CompilerError(Exception):
    """Base class: the compiler refused or failed; nothing was written.

    ``notes``: what the toolchain said before the failure (``compiler.toolchain_notes``), often the
    real reason, since the message itself is the compiler's summary.
    """

    notes: list[dict[str, Any]] = []


class UnknownTarget(CompilerError, ValueError):
    """The requested target is not in the registry (the message lists the known ones)."""


class InvalidModel(CompilerError, ValueError):
    """The input is not a loadable, valid ONNX float model."""


class InvalidData(CompilerError, ValueError):
    """A calibration/evaluation ``.npz`` does not fit the model's inputs."""


class QuantizationError(CompilerError, RuntimeError):
    """onnxruntime.quantization could not produce a working int8 model."""


class GateFailed(CompilerError):
    """The int8 model missed the quality gate; no bundle was written.

    Carries the human-readable ``failures`` and the full evaluation ``report``
    so the caller can show *why* and by how much, not just "refused".
    """

    def __init__(self, failures: list[str], report: dict[str, Any]) -> None:
        self.failures = list(failures)
        self.report = report
        super().__init__("quality gate failed: " + "; ".join(self.failures))
