"""What answers requests: the loaded models, one inference's result, and the output scan.

These live on the inference hot path (``Agent.infer`` runs on any thread, many
thousands of times a second), so they are the cheapest shapes that hold the
data: a frozen dataclass replaced whole on a swap, a NamedTuple per answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from device_agent.ids import format_id
from device_agent.input_checks import InputCheck
from device_agent.runtime import LoadedModel
from device_agent.telemetry import top1_classes

if TYPE_CHECKING:
    from device_agent.shadow import Shadow


@dataclass(frozen=True)
class Serving:
    """A model ready to answer: the one reference ``infer`` reads, replaced whole on a swap, never mutated."""

    model: LoadedModel
    sha256: str
    name: str
    version: str
    slot: str
    check: InputCheck | None = None  # its input as the signed manifest declares it (feature availability)

    @property
    def input_name(self) -> str:
        """The input's name as the manifest (and so the fleet) knows it."""
        return self.check.name if self.check is not None else self.model.input_name


class InferenceResult(NamedTuple):
    """One answer and the model that gave it (a NamedTuple: the cheapest immutable record to build).

    ``id128`` is the inference's UUIDv7 as an int; ``inference_id`` formats it when read, so an
    inference whose id nobody asks for never pays for the string.
    """

    outputs: list[np.ndarray]
    model_sha256: str
    model_version: str
    ok: bool = True
    error: str | None = None  # "non_finite" | "runtime_error"
    id128: int = 0

    @property
    def inference_id(self) -> str:
        return format_id(self.id128)


def scan(outputs: list[np.ndarray]) -> tuple[bool, list[int], float | None]:
    """(any non-finite value?, top-1 class per row of the first output, its top value) in two cheap
    reductions.

    argmax/argmin propagate NaN (they return its index) and land on +inf/-inf,
    so an array is all-finite iff the values at its argmax and argmin are: the
    same argmax is the top-1 class of a batch-1 classifier, and the value there
    its score (a regressor's one output value). ~1 us instead of
    isfinite().all() + a separate argmax (~3 us) on the hot path. The top value
    is None unless the first output is a float tensor of one row.
    """
    classes: list[int] = []
    top: float | None = None
    for i, o in enumerate(outputs):
        if o.dtype.kind != "f" or o.size == 0:
            if i == 0:
                classes = top1_classes(outputs)
            continue
        hi = int(o.argmax())
        best = o.item(hi)  # a Python float: no numpy scalar, no reshape
        if not (math.isfinite(best) and math.isfinite(o.item(int(o.argmin())))):
            return True, [], None
        if i == 0:
            if o.ndim <= 1 or o.shape[0] == 1:
                classes, top = [hi % o.shape[-1]] if o.ndim else [0], best
            else:
                classes = top1_classes(outputs)
    return False, classes, top


class Models:
    """The models in memory, shared by the inference threads and the loop.

    ``serving`` is the one reference every inference reads (replaced whole, never
    mutated); ``previous`` is kept loaded during a probation for an instant revert;
    ``history`` lists every model that served, in order (boot, swaps, reverts).
    """

    def __init__(self) -> None:
        self.serving: Serving | None = None
        self.previous: Serving | None = None
        self.shadow: Shadow | None = None
        self.history: list[str] = []
        self.awaiting_proof: str | None = None  # swapped in; the first ok inference proves it serves

    def swap(self, new: Serving) -> None:
        self.serving = new
        self.history.append(new.sha256)


__all__ = ["InferenceResult", "Models", "Serving", "scan"]
