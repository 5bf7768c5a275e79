"""Reading fleet files: YAML documents with the line of every field, validated against the
published schema's models, so an error names the file, the line and the field.

PyYAML's composer keeps a mark (line, column) on every node; the documents are built from the
nodes here, refusing a key given twice (YAML would keep the last one silently), and a
validation problem's path (``spec.targets.rpi4.target``) is walked back through the nodes to
the line that holds it, or to the nearest enclosing one when the field is missing.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from fleet_server.declarative import Document, DocumentError, Problem, parse_document

YAML_SUFFIXES = (".yaml", ".yml", ".json")


class ManifestError(ValueError):
    """A fleet file that cannot be read or validated; each line of ``lines`` is ``file:line: what``."""

    def __init__(self, lines: Sequence[str]) -> None:
        self.lines = list(lines)
        super().__init__("; ".join(self.lines))


@dataclass(frozen=True)
class Sourced:
    """One raw document, where it came from, and its node tree (for line numbers)."""

    file: str
    index: int  # position in its file, from 1
    node: Node
    data: Any

    @property
    def line(self) -> int:
        return self.node.start_mark.line + 1

    def line_of(self, loc: Sequence[str | int]) -> int:
        """The line of the field at ``loc`` (its key's line), or of the deepest part that exists."""
        node, line = self.node, self.node.start_mark.line
        for part in loc:
            found = _child(node, part)
            if found is None:
                break
            node, line = found
        return line + 1

    def where(self, problem: Problem) -> str:
        return f"{self.file}:{self.line_of(problem.loc)}: {problem.field}: {problem.message}"


def _child(node: Node, part: str | int) -> tuple[Node, int] | None:
    """The node at ``part`` under ``node`` and the line naming it (a key's line, an item's)."""
    if isinstance(node, MappingNode):
        for key, value in node.value:
            if isinstance(key, ScalarNode) and key.value == str(part):
                return value, key.start_mark.line
        return None
    if isinstance(node, SequenceNode) and isinstance(part, int) and 0 <= part < len(node.value):
        item: Node = node.value[part]
        return item, item.start_mark.line
    return None


class _Builder:
    """Python values from nodes (the safe loader's scalars), refusing duplicate keys."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.scalars = yaml.SafeLoader("")
        self.problems: list[str] = []

    def build(self, node: Node) -> Any:
        if isinstance(node, MappingNode):
            out: dict[Any, Any] = {}
            for key_node, value_node in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # '<<: *anchor': merge the anchored mapping
                    merged = self.build(value_node)
                    for m in merged if isinstance(merged, list) else [merged]:
                        if isinstance(m, dict):
                            out = {**m, **out}
                    continue
                key = self.build(key_node)
                if not isinstance(key, str | int | float | bool) and key is not None:
                    self.problems.append(
                        f"{self.file}:{key_node.start_mark.line + 1}: a key must be a scalar"
                    )
                    continue
                if key in out:
                    self.problems.append(
                        f"{self.file}:{key_node.start_mark.line + 1}: {key}: given twice in one mapping"
                    )
                out[key] = self.build(value_node)
            return out
        if isinstance(node, SequenceNode):
            return [self.build(v) for v in node.value]
        return self.scalars.construct_object(node, deep=True)


def read_text(text: str, file: str) -> list[Sourced]:
    """The documents of one YAML text (empty documents, e.g. after a trailing ``---``, skipped)."""
    builder = _Builder(file)
    docs: list[Sourced] = []
    try:
        nodes = list(yaml.compose_all(text, Loader=yaml.SafeLoader))
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark is not None else file
        raise ManifestError([f"{where}: not YAML: {exc.problem or exc.context}"]) from None
    except yaml.YAMLError as exc:
        raise ManifestError([f"{file}: not YAML: {exc}"]) from None
    for i, node in enumerate(nodes, start=1):
        if node is None:
            continue
        data = builder.build(node)
        if data is None:
            continue
        docs.append(Sourced(file, i, node, data))
    if builder.problems:
        raise ManifestError(builder.problems)
    return docs


def expand(paths: Iterable[str]) -> list[str]:
    """Files named, a directory's YAML/JSON files (sorted), or ``-`` for standard input."""
    out: list[str] = []
    for p in paths:
        path = Path(p)
        if p != "-" and path.is_dir():
            out += sorted(str(f) for f in path.iterdir() if f.suffix in YAML_SUFFIXES and f.is_file())
        else:
            out.append(p)
    return out


def read_files(paths: Iterable[str]) -> list[Sourced]:
    docs: list[Sourced] = []
    problems: list[str] = []
    for p in expand(paths):
        try:
            text = sys.stdin.read() if p == "-" else Path(p).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            problems.append(f"{p}: cannot read: {exc}")
            continue
        try:
            docs += read_text(text, "<stdin>" if p == "-" else p)
        except ManifestError as exc:
            problems += exc.lines
    if problems:
        raise ManifestError(problems)
    if not docs:
        raise ManifestError([f"{', '.join(paths) or 'no file'}: no documents"])
    return docs


def validate(sourced: Sequence[Sourced]) -> list[Document]:
    """Every document validated; every problem of every document, each with its file and line.
    Two documents of the same kind and name are refused too (the second names the first)."""
    docs: list[Document] = []
    problems: list[str] = []
    seen: dict[tuple[str, str], Sourced] = {}
    for s in sourced:
        try:
            doc = parse_document(s.data, s.index - 1)
        except DocumentError as exc:
            problems += [s.where(p) for p in exc.problems]
            continue
        first = seen.get(doc.key)
        if first is not None:
            problems.append(
                f"{s.file}:{s.line_of(('metadata', 'name'))}: metadata.name: {doc.ref} is also declared at"
                f" {first.file}:{first.line}"
            )
            continue
        seen[doc.key] = s
        docs.append(doc)
    if problems:
        raise ManifestError(problems)
    return docs


def load(paths: Iterable[str]) -> tuple[list[Sourced], list[Document]]:
    """Read and validate fleet files: the raw documents and the validated ones, in order."""
    sourced = read_files(list(paths))
    return sourced, validate(sourced)


__all__ = ["ManifestError", "Sourced", "expand", "load", "read_files", "read_text", "validate"]
