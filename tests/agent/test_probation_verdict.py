"""The probation verdict from made-up counts, and the probation record as ``state.json`` keeps it."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent import wire
from device_agent.probation import MAX_BOOTS, Pass, ProbationRecord, Revert, Wait, verdict
from device_agent.telemetry import ModelTotals
from device_agent.wire import ReasonCode

N = wire.LATENCY_BUCKETS
PARAMS = wire.Probation(seconds=10.0, min_inferences=5, max_error_rate=0.1, max_latency_ratio=2.0)
RECORD = ProbationRecord(seq=3, slot="b", previous="a", sha256="b" * 64, params=PARAMS, min_inferences=5)


def totals(ok: int = 0, errors: int = 0, at: int = 4) -> ModelTotals:
    buckets = [0] * N
    buckets[at] = ok + errors
    return ModelTotals(ok, errors, buckets)


def test_waits_for_the_window_and_the_inferences() -> None:
    base, old = totals(), totals(100)
    assert verdict(RECORD, 0.0, base, totals(50), old) == Wait()  # window not over
    assert verdict(RECORD, 11.0, base, totals(4), old) == Wait()  # window over, 4 of 5 ok
    assert verdict(RECORD, 11.0, base, totals(5), old) == Pass(5)
    # counts from before the probation do not count
    assert verdict(RECORD, 11.0, totals(3), totals(7), old) == Wait()


def test_an_error_rate_reverts_at_once() -> None:
    got = verdict(RECORD, 0.1, totals(), totals(ok=4, errors=1), totals(100))
    assert isinstance(got, Revert) and got.reason == ReasonCode.ERROR_RATE and "1/5" in got.detail
    assert verdict(RECORD, 0.1, totals(), totals(ok=0, errors=4), totals(100)) == Wait()  # < min_inferences


def test_a_slower_model_reverts_at_the_end_of_the_window() -> None:
    old = totals(100, at=4)
    slow = totals(40, at=8)  # two buckets per doubling: 4x slower
    assert verdict(RECORD, 1.0, totals(), slow, old) == Wait()
    got = verdict(RECORD, 11.0, totals(), slow, old)
    assert isinstance(got, Revert) and got.reason == ReasonCode.LATENCY_REGRESSION
    assert verdict(RECORD, 11.0, totals(), totals(40, at=5), old) == Pass(40)  # 1.4x: within 2x
    assert verdict(RECORD, 11.0, totals(), totals(10, at=8), old) == Pass(10)  # too few samples to judge


def test_a_crash_loop_reverts() -> None:
    record = RECORD
    for _ in range(MAX_BOOTS):
        record = record.rebooted()
        assert verdict(record, 0.0, totals(), totals(), totals()) == Wait()
    got = verdict(record.rebooted(), 0.0, totals(), totals(), totals())
    assert isinstance(got, Revert) and got.reason == ReasonCode.CRASH_LOOP


def test_the_record_keeps_the_state_json_shape() -> None:
    doc = RECORD.rebooted().to_dict()
    assert doc == {
        "seq": 3,
        "slot": "b",
        "previous": "a",
        "sha256": "b" * 64,
        "params": PARAMS.to_dict(),
        "min_inferences": 5,
        "boots": 1,
    }
    assert ProbationRecord.from_dict(doc) == RECORD.rebooted()
    first = ProbationRecord.from_dict({**doc, "previous": None})
    assert first is not None and first.previous is None


_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=10,
)


@settings(max_examples=300)
@given(
    st.one_of(
        _json,
        st.fixed_dictionaries(
            {},
            optional={
                k: _json | st.integers(-2, 9)
                for k in ("seq", "slot", "previous", "sha256", "params", "min_inferences", "boots")
            },
        ),
    )
)
def test_a_damaged_record_reads_as_none_never_raises(data: Any) -> None:
    record = ProbationRecord.from_dict(data)
    if record is not None:
        assert record.seq >= 0 and record.boots >= 0 and isinstance(record.slot, str)
        assert ProbationRecord.from_dict(record.to_dict()) == record
