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
import math
import re
from typing import Any

MAX_DEPTH = 32  # deepest nesting any edgefleet document needs is under 10
MAX_BYTES = 16 << 20  # default ceiling; callers with a tighter contract pass their own


class JsonError(ValueError):
    """Untrusted JSON was too large, too deep, or not JSON at all."""


def loads(
    data: bytes | bytearray | str,
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    int64_only: bool = False,
) -> Any:
    """Parse ``data``; raise :class:`JsonError` when it is malformed, over ``max_bytes`` or ``max_depth``
    or, with ``int64_only``, holds an integer outside the signed 64-bit range or a number that is not
    finite (NaN, Infinity, 1e999): values that would end in a BIGINT column or are not JSON at all."""
    size = len(data)
    if size > max_bytes:
        raise JsonError(f"JSON document of {size} bytes exceeds the {max_bytes}-byte limit")
    try:
        value = json.loads(data)
    except RecursionError:
        raise JsonError(f"JSON nested deeper than {max_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise JsonError(f"invalid JSON: {exc}") from exc
    deep = _opening_brackets(data) > max_depth
    if deep or int64_only:
        bare = skeleton(data)  # once for both checks; strings are most of a document's bytes
        if deep and _nesting_exceeds(bare, max_depth):
            raise JsonError(f"JSON nested deeper than {max_depth} levels")
        if int64_only and _UNSAFE_NUMBER.search(bare) is not None:
            _check_numbers(value)  # only when a number may be unsafe: the walk is the slow part
    return value


_NOT_STRUCTURE = bytes(sorted(set(range(256)) - set(b'[]{}"')))
_INNERMOST = re.compile(rb"\[\]|\{\}")
# what a number outside int64 or not finite needs in the text: NaN/Infinity, 19+ digits in a row,
# or a 3-digit exponent; text without any of these needs no walk
_UNSAFE_NUMBER = re.compile(rb"NaN|Infinity|\d{19}|[eE][+-]?\d{3}")


def _utf8(data: bytes | bytearray | str) -> bytes:
    if isinstance(data, str):
        return data.encode("utf-8", "surrogatepass")
    encoding = json.detect_encoding(data)
    return (
        bytes(data) if encoding == "utf-8" else bytes(data).decode(encoding).encode("utf-8", "surrogatepass")
    )


def skeleton(data: bytes | bytearray | str) -> bytes:
    """Valid JSON with the contents of its strings taken out (UTF-8): what is left is structure,
    numbers and literals, so they can be scanned in C instead of walking the parsed value.

    Escapes occur only inside strings: drop escaped backslashes, then escaped quotes; the
    remaining quotes delimit strings, so every other piece between them is outside one."""
    raw = _utf8(data).replace(b"\\\\", b"").replace(b'\\"', b"")
    return b"".join(raw.split(b'"')[0::2])


def _nesting_exceeds(bare: bytes, max_depth: int) -> bool:
    """Whether the containers of a parsed document's skeleton nest deeper than ``max_depth``: each
    pass takes out the innermost level (balanced, since the document parsed)."""
    brackets = bare.translate(None, _NOT_STRUCTURE)  # quotes are gone from a skeleton already
    for _ in range(max_depth):
        if not brackets:
            return False
        brackets = _INNERMOST.sub(b"", brackets)  # one sub: "[{[]}]" loses one level, not two
    return bool(brackets)


INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1


def _check_numbers(value: Any) -> None:
    """Refuse integers outside int64 and non-finite floats anywhere in a parsed document."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
        elif isinstance(node, bool):
            continue
        elif isinstance(node, int) and not INT64_MIN <= node <= INT64_MAX:
            raise JsonError("an integer is outside the 64-bit range")
        elif isinstance(node, float) and not math.isfinite(node):
            raise JsonError("NaN and Infinity are not JSON numbers")


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
