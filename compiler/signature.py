"""The model's input/output signature, read from the ONNX graph.

Used three times: to validate calibration data before spending time on
quantization, to feed the onnxruntime sessions, and as the manifest's
``io_signature`` (the agent checks requests against it). Dimensions are kept
as the graph declares them: an int for a fixed size, a string for a symbolic
one (``"N"``), ``None`` when the graph leaves it unnamed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
from onnx import helper

Dim = int | str | None


@dataclass(frozen=True)
class TensorSpec:
    """Name, declared shape and numpy dtype name of one graph input or output."""

    name: str
    shape: tuple[Dim, ...]
    dtype: str

    @property
    def numpy_dtype(self) -> np.dtype[Any]:
        return np.dtype(self.dtype)

    @property
    def batch_size(self) -> int | None:
        """The fixed leading dimension, or None when the batch is dynamic (or rank 0)."""
        if not self.shape:
            return None
        first = self.shape[0]
        return first if isinstance(first, int) else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class IOSignature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``io_signature``: ``{"inputs": [...], "outputs": [...]}``."""
        return {"inputs": [t.to_dict() for t in self.inputs], "outputs": [t.to_dict() for t in self.outputs]}


def _spec(value: onnx.ValueInfoProto) -> TensorSpec:
    ttype = value.type.tensor_type
    if not value.type.HasField("tensor_type"):
        raise ValueError(f"{value.name!r} is not a tensor (sequences and maps are not supported)")
    dims: list[Dim] = []
    for d in ttype.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(int(d.dim_value))
        elif d.HasField("dim_value"):  # Paddle exports write -1 for a dynamic axis
            dims.append(None)
        elif d.HasField("dim_param"):
            dims.append(d.dim_param)
        else:
            dims.append(None)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(ttype.elem_type)).name
    return TensorSpec(value.name, tuple(dims), dtype)


def io_signature(model: onnx.ModelProto) -> IOSignature:
    """Read the signature; initializers listed as graph inputs (old exporters) are not inputs."""
    initializers = {i.name for i in model.graph.initializer}
    inputs = tuple(_spec(v) for v in model.graph.input if v.name not in initializers)
    outputs = tuple(_spec(v) for v in model.graph.output)
    return IOSignature(inputs, outputs)
