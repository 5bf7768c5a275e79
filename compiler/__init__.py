"""Float ONNX model -> quantized (static QDQ int8), evaluated, gated, signed bundle.

The public entry point is ``compile_model``; ``Gate`` sets the quality bar and
``GateFailed`` carries the failures and the report when a model misses it.
Every refusal is a ``CompilerError`` subclass with a message meant for users.
"""

from compiler.errors import (
    CompilerError,
    GateFailed,
    InvalidData,
    InvalidModel,
    QuantizationError,
    UnknownTarget,
)
from compiler.gate import Gate
from compiler.pipeline import CompileResult, compile_model
from compiler.targets import Target, get_target, known_targets, register_target

__all__ = [
    "CompileResult",
    "CompilerError",
    "Gate",
    "GateFailed",
    "InvalidData",
    "InvalidModel",
    "QuantizationError",
    "Target",
    "UnknownTarget",
    "compile_model",
    "get_target",
    "known_targets",
    "register_target",
]
