"""``signing.safejson``: its checks on the raw text (nesting depth, unsafe numbers) decide exactly as
a walk of the parsed value would, for any document, in any of JSON's encodings."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from signing import safejson

# strings full of what the text scan must not be fooled by: quotes, escapes, brackets, digits
TRICKY = st.text(alphabet='"\\[]{}0123456789eE.-NaInfty', max_size=12)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(1 << 70), max_value=1 << 70),
    st.floats(allow_nan=True, allow_infinity=True),
    TRICKY,
)
DOCS = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(TRICKY, inner, max_size=3)),
    max_leaves=60,
)


def _deep(n: int) -> Any:
    doc: Any = 1
    for i in range(n):
        doc = [doc] if i % 2 else {"k[": doc}
    return doc


def _walk_refuses(value: Any) -> bool:
    try:
        safejson._check_numbers(value)
    except safejson.JsonError:
        return True
    return False


@settings(max_examples=300, deadline=None)
@given(DOCS, st.sampled_from(["str", "utf-8", "utf-16", "utf-32"]), st.integers(min_value=1, max_value=8))
def test_text_checks_decide_as_the_walk(doc: Any, encoding: str, max_depth: int) -> None:
    text = json.dumps(doc)
    data: str | bytes = text if encoding == "str" else text.encode(encoding)
    deep = safejson.depth_exceeds(doc, max_depth)
    unsafe = _walk_refuses(doc)
    try:
        safejson.loads(data, max_depth=max_depth, int64_only=True)
        refused = False
    except safejson.JsonError:
        refused = True
    assert refused == (deep or unsafe)
    assert safejson.loads(data, max_depth=64) == json.loads(data) or doc != doc  # NaN != NaN


@pytest.mark.parametrize("depth", [31, 32, 33, 200])
def test_depth_at_the_limit(depth: int) -> None:
    doc = _deep(depth)  # ``depth`` containers around a scalar
    text = json.dumps(doc)
    if depth <= safejson.MAX_DEPTH:
        assert safejson.loads(text) == doc
    else:
        with pytest.raises(safejson.JsonError, match="deeper"):
            safejson.loads(text)


@pytest.mark.parametrize(
    "text", ["[NaN]", "[-Infinity]", "[1e999]", '{"a": [9223372036854775808]}', "[-9223372036854775809]"]
)
def test_unsafe_numbers_are_refused_only_when_asked(text: str) -> None:
    with pytest.raises(safejson.JsonError):
        safejson.loads(text, int64_only=True)
    safejson.loads(text)  # plain JSON parsing as before


def test_safe_lookalikes_pass() -> None:
    numbers = "[9223372036854775807, -9223372036854775808, 1e308, 0.1234567890123456789]"
    text = '{"NaN": "Infinity 1e999", "n": ' + numbers + "}"
    assert safejson.loads(text, int64_only=True)["NaN"] == "Infinity 1e999"
