"""Declarative configuration: the kinds a fleet file may hold, their one schema, and what an
apply would change.

A fleet file holds documents in kubectl's shape::

    apiVersion: edgefleet.dev/v1
    kind: RolloutPolicy
    metadata: {name: canary, labels: {team: vision}}
    spec: {stages: [5, 50, 100], soak_seconds: 600}

Each kind's ``spec`` is a pydantic model that already has a home elsewhere: ``RolloutPolicy``
is the rollout policy the API composes (``schemas.RolloutPlan``: ``policy.Policy`` plus the
stages), ``SLO`` is the SLO request without its name (``slo_schemas.SloIn``), ``Experiment``
the experiment request without its name (``experiment_schemas.ExperimentSpec``); only ``Model``,
``HardwareTargets`` and ``MaintenanceWindow`` (windows as the policy declares them, under a name
the policies refer to) are declared here, because nothing else describes them. A kind is one
``register_kind`` call; the published JSON schema (``docs/schema/fleet.schema.json``) and the
server's validation are generated from the registry, so they cannot disagree.

Pure: no I/O, no database. ``fleet_server.config_store`` stores what this decides, the CLI
(``edgefleet.manifests``) reads YAML and maps a validation error back to its file and line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from functools import cache
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    create_model,
)

from fleet_server.experiment_schemas import ExperimentSpec
from fleet_server.policy import Policy, WindowPolicy, window_names
from fleet_server.schemas import RolloutPlan
from fleet_server.slo_schemas import SloIn

API_VERSION = "edgefleet.dev/v1"
SCHEMA_ID = "https://edgefleet.dev/schema/fleet.schema.json"

Name = Annotated[
    str,
    StringConstraints(min_length=1, max_length=64, pattern=r"^[a-z0-9]([a-z0-9._-]*[a-z0-9])?$"),
]
"""A document's name: lower-case letters, digits, '.', '_', '-' (as an SLO's), at most 64."""

HardwareClass = Annotated[str, StringConstraints(min_length=1, max_length=128)]
TargetName = Annotated[str, StringConstraints(min_length=1, max_length=64)]


class Metadata(BaseModel):
    """Who a document is: its name (unique per kind) and free labels."""

    model_config = ConfigDict(extra="forbid")

    name: Name = Field(description="unique per kind: lower-case letters, digits, '.', '_', '-'")
    labels: dict[Annotated[str, StringConstraints(max_length=64)], str] = Field(
        default_factory=dict, max_length=32, description="free key/value labels (team, service)"
    )


class GateOptions(BaseModel):
    """Thresholds of the compiler's quality gate (``compiler.gate.Gate``) a model overrides; a
    field left out keeps the compiler's default. Names and meanings are the gate's own."""

    model_config = ConfigDict(extra="forbid")

    min_top1_agreement: float | None = Field(default=None, ge=0, le=1, description="int8 vs fp32 top-1")
    min_cosine: float | None = Field(default=None, ge=-1, le=1, description="cosine similarity of outputs")
    min_snr_db: float | None = Field(default=None, description="signal-to-noise ratio of outputs, dB")
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1, description="with labelled data")
    min_box_f1: float | None = Field(default=None, ge=0, le=1, description="detection outputs")
    min_mask_iou: float | None = Field(default=None, ge=0, le=1, description="segmentation outputs")
    max_sequence_error: float | None = Field(default=None, ge=0, description="sequence outputs")
    max_sram_kib: float | None = Field(default=None, gt=0, description="Ethos-U: SRAM budget, KiB")
    max_flash_kib: float | None = Field(default=None, gt=0, description="Ethos-U: flash/DRAM budget, KiB")
    max_cpu_fraction: float | None = Field(
        default=None, ge=0, le=1, description="Ethos-U: share of ops left on the CPU"
    )

    def overrides(self) -> dict[str, float]:
        """The thresholds set, as ``compiler.Gate`` keyword arguments."""
        return {k: v for k, v in self.model_dump().items() if v is not None}


class ClassTarget(BaseModel):
    """How a model is compiled for one hardware class: the target, and gate thresholds for it."""

    model_config = ConfigDict(extra="forbid")

    target: TargetName | None = Field(
        default=None, description="compiler target (edgefleet compile --target); null: the fleet's mapping"
    )
    gate: GateOptions = Field(
        default_factory=GateOptions, description="gate thresholds for this class, over the model's"
    )


class ModelSpec(BaseModel):
    """A model as ``edgefleet deploy`` builds it: its float source, the data it is calibrated and
    judged on, gate thresholds, and per-hardware-class targets."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(min_length=1, description="float ONNX or TFLite file, relative to the fleet file")
    calib: str | None = Field(default=None, description="calibration samples (as edgefleet compile --calib)")
    eval: str | None = Field(default=None, description="held-out samples (as edgefleet compile --eval)")
    output_kinds: dict[Annotated[str, StringConstraints(min_length=1, max_length=256)], str] = Field(
        default_factory=dict,
        description="output name -> kind[:param=v] (classification, regression, detection, segmentation,"
        " sequence, integer), as edgefleet compile --output-kind; undeclared outputs are inferred",
    )
    gate: GateOptions = Field(default_factory=GateOptions, description="gate thresholds for every class")
    targets: dict[HardwareClass, ClassTarget] = Field(
        default_factory=dict, description="hardware class -> its target and gate thresholds"
    )


class HardwareTargetsSpec(BaseModel):
    """Which compiler target each hardware class runs: what ``edgefleet deploy`` compiles for a
    class. A class not named here takes the compiler's built-in default for the model's format."""

    model_config = ConfigDict(extra="forbid")

    targets: dict[HardwareClass, TargetName] = Field(
        description="hardware class (a device's hardware id) -> compiler target", min_length=1
    )


class MaintenanceWindowSpec(BaseModel):
    """Weekly windows under one name, for rollout policies to refer to (``maintenance_windows``,
    of the policy or of a cohort): one place to change when a fleet's quiet hours change. A rollout
    takes the windows when it is created and keeps them; a later change of the document applies
    to the rollouts created after it."""

    model_config = ConfigDict(extra="forbid")

    windows: list[WindowPolicy] = Field(
        min_length=1, max_length=64, description="weekly windows in each device's local time"
    )


def without(model: type[BaseModel], *names: str, title: str) -> type[BaseModel]:
    """``model`` less the fields ``names``, every other field kept as declared (its type, default,
    constraints and description): a kind whose document carries a field in ``metadata`` instead."""
    kept = {k: (f.annotation, f) for k, f in model.model_fields.items() if k not in names}
    out: type[BaseModel] = create_model(title, __config__=ConfigDict(extra="forbid"), **kept)  # type: ignore[call-overload]
    out.__doc__ = model.__doc__
    return out


SloDocumentSpec = without(SloIn, "name", title="SloSpec")
"""An SLO document's spec: the SLO request, named by ``metadata.name``."""


@dataclass(frozen=True)
class Kind:
    """A kind of document: its name, the model of its spec, and a line for ``edgefleet get``."""

    name: str
    spec: type[BaseModel]
    summary: str
    plural: str = ""
    aliases: tuple[str, ...] = ()

    @property
    def names(self) -> tuple[str, ...]:
        """What the CLI accepts for this kind: its name, plural and aliases, any case."""
        return (self.name.lower(), (self.plural or self.name + "s").lower(), *self.aliases)


_KINDS: dict[str, Kind] = {}


def register_kind(kind: Kind, *, replace: bool = False) -> Kind:
    """Add a kind; refuses a silent redefinition. The published schema must then be regenerated
    (``edgefleet schema --write``), which a test enforces."""
    if kind.name in _KINDS and not replace:
        raise ValueError(f"kind {kind.name!r} is already registered")
    _KINDS[kind.name] = kind
    document_model.cache_clear()
    fleet_schema.cache_clear()
    return kind


def kinds() -> list[Kind]:
    return list(_KINDS.values())


def find_kind(text: str) -> Kind | None:
    """The kind ``text`` names (``RolloutPolicy``, ``rolloutpolicies``, ``rp``), or None."""
    wanted = text.lower()
    return next((k for k in _KINDS.values() if wanted in k.names), None)


def kind_names() -> str:
    return ", ".join(_KINDS)


@cache
def document_model(kind_name: str) -> type[BaseModel]:
    """The model of a whole document of one kind: apiVersion, kind, metadata, spec."""
    kind = _KINDS[kind_name]
    fields: dict[str, Any] = {
        "apiVersion": (Literal[API_VERSION], Field(description="always " + API_VERSION)),
        "kind": (Literal[kind.name], Field(description=kind.summary)),
        "metadata": (Metadata, ...),
        "spec": (kind.spec, ...),
    }
    model: type[BaseModel] = create_model(
        f"{kind.name}Document", __config__=ConfigDict(extra="forbid", title=f"{kind.name} document"), **fields
    )
    model.__doc__ = f"A {kind.name} document: {kind.summary}."
    return model


@cache
def fleet_schema() -> dict[str, Any]:
    """The published JSON schema of one document of a fleet file (any registered kind)."""
    models = tuple(document_model(k) for k in _KINDS)
    union: Any = Annotated[Union[models], Field(discriminator="kind")] if len(models) > 1 else models[0]  # noqa: UP007
    schema = TypeAdapter(union).json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID,
        "title": "edgefleet fleet document",
        "description": f"One document of a fleet file (apiVersion {API_VERSION}); kinds: {kind_names()}.",
        **schema,
    }


register_kind(Kind("Model", ModelSpec, "a model: source, calibration data, gate, per-class targets"))
register_kind(
    Kind(
        "RolloutPolicy",
        RolloutPlan,
        "stages and the rollout policy (gates, timing, retries, on_class_failure)",
        plural="RolloutPolicies",
        aliases=("policy", "policies", "rp"),
    )
)
register_kind(
    Kind("SLO", SloDocumentSpec, "a service level objective of a model (created on apply)", plural="SLOs")
)
register_kind(
    Kind(
        "HardwareTargets",
        HardwareTargetsSpec,
        "hardware class -> compiler target, for edgefleet deploy",
        plural="HardwareTargets",
        aliases=("hwtargets", "ht"),
    )
)


register_kind(
    Kind(
        "MaintenanceWindow",
        MaintenanceWindowSpec,
        "named weekly windows a rollout policy refers to (maintenance_windows)",
        aliases=("mw", "window", "windows"),
    )
)
register_kind(
    Kind(
        "Experiment",
        ExperimentSpec,
        "an A/B experiment, started on apply; not edited in place",
        aliases=("exp",),
    )
)

WINDOW_KIND = "MaintenanceWindow"


def _policies(doc: Document) -> list[tuple[tuple[str | int, ...], Policy]]:
    """The rollout policies a document holds, with their path in it."""
    if isinstance(doc.spec, Policy):
        return [(("spec",), doc.spec)]
    if isinstance(doc.spec, ExperimentSpec):
        return [(("spec", "policy"), doc.spec.policy)]
    return []


def window_problems(docs: Sequence[Document], known: Iterable[str]) -> list[DocumentError]:
    """The window names ``docs`` refer to that neither one of them nor ``known`` (the applied
    ``MaintenanceWindow`` names) declares, each at its field; ``index`` is the document's position
    in ``docs``."""
    declared = set(known) | {d.name for d in docs if d.kind == WINDOW_KIND}
    errors = []
    for i, doc in enumerate(docs):
        problems = []
        for at, pol in _policies(doc):
            where: list[tuple[tuple[str | int, ...], list[str]]] = [
                ((*at, "maintenance_windows"), pol.maintenance_windows)
            ]
            where += [
                ((*at, "cohorts", n, "maintenance_windows"), c.maintenance_windows)
                for n, c in enumerate(pol.cohorts)
            ]
            for loc, names in where:
                problems += [
                    Problem(
                        (*loc, j),
                        f"no MaintenanceWindow {name!r} in these documents or applied to the server",
                    )
                    for j, name in enumerate(names)
                    if name not in declared
                ]
        if problems:
            errors.append(DocumentError(i, problems))
    return errors


def referenced_windows(docs: Sequence[Document]) -> set[str]:
    """Every window name ``docs`` refer to."""
    return {n for doc in docs for _, pol in _policies(doc) for n in window_names(pol)}


def schema_text() -> str:
    """The schema as the published file holds it (stable key order, trailing newline)."""
    return json.dumps(fleet_schema(), indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a document: where (a path into it) and what."""

    loc: tuple[str | int, ...]
    message: str

    @property
    def field(self) -> str:
        return ".".join(str(p) for p in self.loc) or "(document)"


class DocumentError(ValueError):
    """A document the schema refuses; ``problems`` name each field (the CLI adds file and line)."""

    def __init__(self, index: int, problems: Sequence[Problem]) -> None:
        self.index = index
        self.problems = list(problems)
        super().__init__(
            f"document {index + 1}: " + "; ".join(f"{p.field}: {p.message}" for p in self.problems)
        )


@dataclass(frozen=True)
class Document:
    """One validated document: the spec as declared (``declared``) and as read (``spec``)."""

    kind: str
    name: str
    labels: dict[str, str]
    declared: dict[str, Any]  # the spec's fields as written, without the defaults left out
    spec: BaseModel = field(compare=False)

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.name)

    @property
    def ref(self) -> str:
        return f"{self.kind}/{self.name}"

    def body(self) -> dict[str, Any]:
        """The document as stored and shown: what ``get -o yaml`` prints."""
        return {
            "apiVersion": API_VERSION,
            "kind": self.kind,
            "metadata": {"name": self.name, "labels": self.labels},
            "spec": self.declared,
        }

    def effective(self) -> dict[str, Any]:
        """The spec with every default filled in: what the fleet runs with."""
        return self.spec.model_dump(mode="json")


def parse_document(raw: Any, index: int = 0) -> Document:
    """Validate one document; ``DocumentError`` names every field that is wrong."""
    if not isinstance(raw, Mapping):
        raise DocumentError(index, [Problem((), f"a document is a mapping, got {type(raw).__name__}")])
    kind_name = raw.get("kind")
    if not isinstance(kind_name, str) or kind_name not in _KINDS:
        shown = "missing" if kind_name is None else repr(kind_name)
        raise DocumentError(index, [Problem(("kind",), f"{shown}: a kind is one of {kind_names()}")])
    try:
        doc = document_model(kind_name).model_validate(raw)
    except ValidationError as exc:
        raise DocumentError(index, [_problem(e) for e in exc.errors()]) from None
    spec: BaseModel = doc.spec  # type: ignore[attr-defined]
    metadata: Metadata = doc.metadata  # type: ignore[attr-defined]
    return Document(
        kind=kind_name,
        name=metadata.name,
        labels=dict(metadata.labels),
        declared=spec.model_dump(mode="json", exclude_unset=True),
        spec=spec,
    )


def _problem(error: Any) -> Problem:
    loc = tuple(p for p in error["loc"] if not (isinstance(p, str) and p.startswith(("function-", "["))))
    message = str(error["msg"])
    if error["type"] == "extra_forbidden":
        message = "unknown field (a misspelt setting would otherwise be dropped)"
    elif error["type"] == "literal_error" and loc == ("apiVersion",):
        message = f"must be {API_VERSION}"
    return Problem(loc, message)


def parse_documents(raws: Iterable[Any]) -> list[Document]:
    """Validate every document, and refuse two with the same kind and name."""
    docs: list[Document] = []
    problems: list[DocumentError] = []
    seen: dict[tuple[str, str], int] = {}
    for i, raw in enumerate(raws):
        try:
            doc = parse_document(raw, i)
        except DocumentError as exc:
            problems.append(exc)
            continue
        if doc.key in seen:
            problems.append(
                DocumentError(
                    i, [Problem(("metadata", "name"), f"{doc.ref} is also document {seen[doc.key] + 1}")]
                )
            )
            continue
        seen[doc.key] = i
        docs.append(doc)
    if problems:
        raise DocumentSetError(problems)
    return docs


class DocumentSetError(ValueError):
    """Every document of a set that was refused, each with its problems."""

    def __init__(self, errors: Sequence[DocumentError]) -> None:
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))


class Action(StrEnum):
    """What applying a document does to the stored one (kubectl's words)."""

    CREATED = "created"
    CONFIGURED = "configured"
    UNCHANGED = "unchanged"


@dataclass(frozen=True)
class Change:
    """What applying one document does: the action and a unified diff of the document."""

    kind: str
    name: str
    action: Action
    diff: str

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": self.name, "action": str(self.action), "diff": self.diff}


def digest(body: Mapping[str, Any]) -> str:
    """A stored document's identity: sha256 of its canonical JSON (labels and declared spec)."""
    canonical = json.dumps({"labels": body["metadata"]["labels"], "spec": body["spec"]}, sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()


def render(body: Mapping[str, Any] | None) -> list[str]:
    """A document as diffable lines (YAML, keys sorted, so equal documents render equal)."""
    if body is None:
        return []
    import yaml

    return str(yaml.safe_dump(dict(body), sort_keys=True, default_flow_style=False)).splitlines(keepends=True)


def plan(current: Mapping[tuple[str, str], Mapping[str, Any]], docs: Sequence[Document]) -> list[Change]:
    """What applying ``docs`` over the stored documents ``current`` does, document by document.
    Applying the result again plans only ``unchanged``: an apply is idempotent."""
    import difflib

    changes = []
    for doc in docs:
        old = current.get(doc.key)
        new = doc.body()
        if old is None:
            action = Action.CREATED
        elif digest(old) == digest(new):
            action = Action.UNCHANGED
        else:
            action = Action.CONFIGURED
        diff = ""
        if action is not Action.UNCHANGED:
            diff = "".join(
                difflib.unified_diff(
                    render(old),
                    render(new),
                    fromfile=f"live/{doc.ref}" if old is not None else "/dev/null",
                    tofile=f"declared/{doc.ref}",
                )
            )
        changes.append(Change(doc.kind, doc.name, action, diff))
    return changes


__all__ = [
    "API_VERSION",
    "Action",
    "Change",
    "ClassTarget",
    "Document",
    "DocumentError",
    "DocumentSetError",
    "GateOptions",
    "HardwareTargetsSpec",
    "Kind",
    "MaintenanceWindowSpec",
    "Metadata",
    "ModelSpec",
    "Problem",
    "SloDocumentSpec",
    "digest",
    "document_model",
    "find_kind",
    "fleet_schema",
    "kinds",
    "parse_document",
    "parse_documents",
    "plan",
    "referenced_windows",
    "register_kind",
    "schema_text",
    "window_problems",
]
