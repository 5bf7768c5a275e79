"""JSON from untrusted peers, bounded in size and nesting depth.

CPython's ``json`` raises ``RecursionError`` (not ``ValueError``) on deeply
nested input, so a payload of 100,000 ``[`` escapes every handler written to
catch malformed JSON: it crashed an upload with a 500 and killed the device's
MQTT handler without a rejection. No message of ours nests deeper than a
handful of levels, so everything parsed from the network or an uploaded file
goes through :func:`loads`, which turns every way the input can be bad into
one :class:`JsonError` (a ``ValueError``).
"""

from __future__ import annotations

import json
from typing import Any

MAX_DEPTH = 32  # deepest nesting any edgefleet document needs is under 10
MAX_BYTES = 16 << 20  # default ceiling; callers with a tighter contract pass their own


class JsonError(ValueError):
    """Untrusted JSON was too large, too deep, or not JSON at all."""


def loads(data: bytes | bytearray | str, *, max_bytes: int = MAX_BYTES, max_depth: int = MAX_DEPTH) -> Any:
    """Parse ``data``; raise :class:`JsonError` when it is malformed, over ``max_bytes`` or ``max_depth``."""
    size = len(data)
    if size > max_bytes:
        raise JsonError(f"JSON document of {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        value = json.loads(data)
    except RecursionError:
        raise JsonError(f"JSON nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise JsonError(f"invalid JSON: {exc}") from exc
    if _opening_brackets(data) > max_depth and depth_exceeds(value, max_depth):
        raise JsonError(f"JSON nested deeper than {max_depth} levels")
    return value


def _opening_brackets(data: bytes | bytearray | str) -> int:
    """An upper bound on the nesting depth, counted in C (brackets inside strings count too)."""
    if isinstance(data, str):
        return data.count("[") + data.count("{")
    return data.count(b"[") + data.count(b"{")


def depth_exceeds(value: Any, max_depth: int = MAX_DEPTH) -> bool:
    """True when containers in ``value`` nest deeper than ``max_depth`` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        if depth > max_depth:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False
