"""What each model output *is*, so the gate judges it by the task's own measure.

Raw-output SNR is not a task's quality: a landmark regressor is judged by its
coordinates (SNR, cosine, errors), a classifier by its decisions (top-1
agreement, accuracy), a text detector by its thresholded masks (IoU), a
recurrent model by its drift after N steps. An output's kind is declared by
the user (``--output-kind scores=classification,landmarks=regression``, or a
``.toml``/``.json`` file) or inferred, and inference is deliberately
conservative: a rank-2 ``[N, K]`` float output is called *classification* only
with evidence (a Softmax/LogSoftmax/ArgMax next to it in the graph, rows that
are probability distributions, or a name that says so: ``logits``, ``scores``,
``probs``, ``class``...). Everything else is *regression*, whose figures (SNR,
cosine, errors) are meaningful for any float tensor; detection, segmentation
and sequence are never guessed, because the wrong guess would pass a broken
model. Integer outputs (labels, indices) are *integer*: exact agreement.

Parameters (``name=kind:key=value:key=value``):
- detection: ``box=xyxy|cxcywh`` (default xyxy), ``threshold`` (score, default
  0.5; logits are passed through a sigmoid), ``scores=<output>`` (scores in
  another output, e.g. a face detector's ``classificators``), ``iou`` (match
  IoU, default 0.5), ``match=iou|index`` (default ``iou``: boxes paired by
  greedy IoU, for decoded boxes after NMS; ``index``: box *i* of the float
  model with box *i* of the int8 model, for an anchor-based detector's raw
  outputs, whose boxes are offsets from their anchor: IoU is unchanged by the
  per-anchor shift and scale that decodes them, so it is the decoded boxes'
  IoU, while pairing raw offsets by IoU across anchors would match unrelated
  boxes);
- segmentation: ``threshold`` (default 0.5), ``axis`` (argmax over this class
  axis instead of a threshold);
- sequence: ``axis`` (time axis, default 1), ``step`` (which step's error
  decides, default the last).
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from compiler.errors import InvalidData

KINDS = ("classification", "regression", "detection", "segmentation", "sequence", "integer")
PARAMS: dict[str, set[str]] = {
    "classification": set(),
    "regression": set(),
    "integer": set(),
    "detection": {"box", "threshold", "scores", "iou", "match"},
    "segmentation": {"threshold", "axis"},
    "sequence": {"axis", "step"},
}
CHOICES = {"box": ("xyxy", "cxcywh"), "match": ("iou", "index")}
CLASSIFIER_OPS = frozenset({"Softmax", "LogSoftmax", "SOFTMAX", "LOG_SOFTMAX", "ArgMax", "ARG_MAX"})
CLASSIFIER_NAME = re.compile(r"(logit|score|prob|class|cls|label|pred)", re.IGNORECASE)
# A regressor's output name: these win over the classifier words ("landmark_scores" is coordinates).
REGRESSION_NAME = re.compile(r"(landmark|keypoint|box|regress|coord|offset|depth|pose|bbox)", re.IGNORECASE)


@dataclass(frozen=True)
class OutputKind:
    """One output's kind, where it came from (``declared``/``inferred: why``/``default``), parameters."""

    kind: str
    source: str
    params: dict[str, str] = field(default_factory=dict)

    def param(self, key: str, default: str | None = None) -> str | None:
        return self.params.get(key, default)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "source": self.source, **({"params": self.params} if self.params else {})}


def parse_kind(name: str, text: str, source: str = "declared") -> OutputKind:
    """``classification`` / ``detection:box=cxcywh:threshold=0.3`` for output ``name``."""
    kind, *rest = [p.strip() for p in text.split(":")]
    kind = kind.lower()
    if kind not in KINDS:
        raise InvalidData(f"output {name!r}: unknown kind {kind!r}; kinds: {', '.join(KINDS)}")
    params: dict[str, str] = {}
    for part in rest:
        key, sep, value = part.partition("=")
        if not sep or key not in PARAMS[kind]:
            allowed = ", ".join(sorted(PARAMS[kind])) or "none"
            raise InvalidData(f"output {name!r}: bad {kind} parameter {part!r} (parameters: {allowed})")
        if key in CHOICES and value not in CHOICES[key]:
            raise InvalidData(f"output {name!r}: {key}={value!r}, expected one of {', '.join(CHOICES[key])}")
        params[key] = value
    return OutputKind(kind, source, params)


def parse_declarations(text: str) -> dict[str, OutputKind]:
    """``scores=classification,landmarks=regression`` or the path of a ``.toml``/``.json`` file.

    A file holds ``{"outputs": {"<name>": "<kind[:params]>" | {"kind": ..., <param>: ...}}}``.
    """
    declared: dict[str, OutputKind] = {}
    for entry in filter(None, (e.strip() for e in text.split(","))):
        if "=" not in entry and entry.endswith((".toml", ".json")):
            declared.update(_from_file(Path(entry)))
            continue
        name, sep, kind = entry.partition("=")  # parameters after the kind may hold '=' too
        if not sep or not name:
            raise InvalidData(f"--output-kind: expected name=kind, got {entry!r}")
        declared[name.strip()] = parse_kind(name.strip(), kind)
    return declared


def _from_file(path: Path) -> dict[str, OutputKind]:
    if not path.is_file():
        raise InvalidData(f"{path}: no such output-kind file")
    try:
        data = tomllib.loads(path.read_text()) if path.suffix == ".toml" else json.loads(path.read_text())
    except (ValueError, tomllib.TOMLDecodeError) as exc:
        raise InvalidData(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from exc
    outputs = data.get("outputs") if isinstance(data, dict) else None
    if not isinstance(outputs, dict):
        raise InvalidData(f"{path}: expected an 'outputs' table of output name -> kind")
    declared: dict[str, OutputKind] = {}
    for name, value in outputs.items():
        if isinstance(value, str):
            declared[name] = parse_kind(name, value)
        elif isinstance(value, dict) and isinstance(value.get("kind"), str):
            params = ":".join(f"{k}={v}" for k, v in value.items() if k != "kind")
            declared[name] = parse_kind(name, value["kind"] + (f":{params}" if params else ""))
        else:
            raise InvalidData(f"{path}: output {name!r}: expected a kind string or a table with 'kind'")
    return declared


def check_declared(declared: dict[str, OutputKind], outputs: list[str]) -> None:
    """Every declared name (and every ``scores=`` reference) must be a model output."""
    for name, kind in declared.items():
        for ref in (name, kind.param("scores")):
            if ref is not None and ref not in outputs:
                raise InvalidData(
                    f"--output-kind names {ref!r}, which is not an output of the model "
                    f"(outputs: {', '.join(outputs)})"
                )


def infer_kind(name: str, ref: np.ndarray, hint: str | None, labels: bool) -> OutputKind:
    """The kind of an undeclared output from its fp32 values, the op next to it, and its name.

    ``hint``: the graph op that produces (or consumes) the output, when the family knows it.
    ``labels``: the data carries class labels, which only a classifier can be scored against.
    """
    if ref.dtype.kind in "biu":
        return OutputKind("integer", "inferred: integer dtype")
    if ref.ndim != 2 or ref.shape[-1] < 2:
        return OutputKind("regression", "default: not a rank-2 [N, K] output")
    if hint in CLASSIFIER_OPS:
        return OutputKind("classification", f"inferred: next to {hint}")
    if _probabilities(ref):
        return OutputKind("classification", "inferred: rows are probability distributions")
    if REGRESSION_NAME.search(name):
        return OutputKind("regression", "inferred: output name")
    if CLASSIFIER_NAME.search(name):
        return OutputKind("classification", "inferred: output name")
    if labels and ref.shape[-1] > 2:
        return OutputKind("classification", "inferred: the data has class labels")
    return OutputKind("regression", "default: no evidence of class scores")


def _probabilities(ref: np.ndarray) -> bool:
    finite = np.isfinite(ref).all()
    return bool(finite and (ref >= 0).all() and np.allclose(ref.sum(axis=-1), 1.0, atol=1e-3))


def resolve(
    declared: dict[str, OutputKind],
    refs: dict[str, np.ndarray],
    hints: dict[str, str],
    labels: bool,
) -> dict[str, OutputKind]:
    """Declared kinds where given, inferred ones for the rest, in output order.

    An undeclared output that a detection output names with ``scores=`` is of kind ``scores``: its
    values are judged through that detection (which boxes pass the threshold, score agreement), not
    by its raw SNR, which for logits far below the threshold says nothing about the detections.
    """
    check_declared(declared, list(refs))
    score_of = {
        kind.params["scores"]: name
        for name, kind in declared.items()
        if kind.kind == "detection" and "scores" in kind.params
    }
    return {
        name: declared.get(name)
        or (
            OutputKind("scores", f"inferred: the scores of detection output {score_of[name]!r}")
            if name in score_of
            else infer_kind(name, ref, hints.get(name), labels)
        )
        for name, ref in refs.items()
    }
