"""Merging histograms column-wise gives exactly the device-by-device sum (any bucket counts)."""

from __future__ import annotations

from functools import reduce

from hypothesis import given
from hypothesis import strategies as st

from fleet_server.gates import Histograms, add_counts, merge

counts = st.lists(st.integers(min_value=0, max_value=10**6), max_size=45)


@given(st.lists(st.tuples(counts, counts), max_size=30))
def test_merge_equals_the_pairwise_sum(pairs: list[tuple[list[int], list[int]]]) -> None:
    hists = [Histograms(tuple(lat), tuple(out)) for lat, out in pairs]
    merged = merge(hists)
    none: tuple[int, ...] = ()
    expect_lat = reduce(add_counts, (h.latency for h in hists), none)
    expect_out = reduce(add_counts, (h.output for h in hists), none)
    assert (merged.latency, merged.output) == (tuple(expect_lat), tuple(expect_out))
