"""UUIDv7 inference ids: RFC 9562 bits, order, uniqueness across threads, the string form."""

from __future__ import annotations

import threading
import time
import uuid
from datetime import UTC, datetime

from hypothesis import given, settings
from hypothesis import strategies as st

from device_agent.ids import IdMinter, format_id, id_millis, id_time, parse_id


def test_ids_are_rfc9562_version_7_with_the_clock_in_the_first_48_bits() -> None:
    mint = IdMinter()
    before = time.time_ns() // 1_000_000
    value = mint()
    after = time.time_ns() // 1_000_000
    u = uuid.UUID(format_id(value))
    assert u.version == 7 and u.variant == uuid.RFC_4122
    assert u.int == value and before <= id_millis(value) <= after
    assert abs((id_time(value) - datetime.now(UTC)).total_seconds()) < 5


@given(st.lists(st.floats(min_value=1.6e9, max_value=4.0e9), min_size=1, max_size=200))
@settings(max_examples=60, deadline=None)
def test_ids_sort_in_minting_order_whatever_the_clock_does(times: list[float]) -> None:
    """Ids minted one after another increase, even when the wall clock jumps back or stands still."""
    clock = iter(times)
    mint = IdMinter(lambda: next(clock))
    ids = [mint() for _ in times]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert [format_id(i) for i in ids] == sorted(format_id(i) for i in ids)  # the strings sort alike
    for value in ids:
        u = uuid.UUID(format_id(value))
        assert u.version == 7 and u.variant == uuid.RFC_4122
    # Time never goes back: each id carries the latest millisecond seen so far.
    seen = 0
    for t, value in zip(times, ids, strict=True):
        seen = max(seen, int(t * 1000))
        assert id_millis(value) == seen


def test_ids_within_one_millisecond_are_ordered_and_unique() -> None:
    mint = IdMinter(lambda: 1_800_000_000.0)
    ids = [mint() for _ in range(10_000)]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    assert {id_millis(i) for i in ids} == {1_800_000_000_000}


def test_ids_are_unique_across_threads_and_each_threads_ids_are_ordered() -> None:
    mint = IdMinter()
    per_thread: list[list[int]] = [[] for _ in range(8)]
    start = threading.Barrier(8)

    def work(out: list[int]) -> None:
        start.wait()
        for _ in range(5_000):
            out.append(mint())

    threads = [threading.Thread(target=work, args=(out,)) for out in per_thread]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    every = [i for out in per_thread for i in out]
    assert len(set(every)) == len(every) == 40_000
    for out in per_thread:
        assert out == sorted(out)


def test_two_minters_do_not_collide() -> None:
    """Two processes (two devices) in the same millisecond: the counter start and 32 random bits differ."""
    a, b = IdMinter(lambda: 1_800_000_000.0), IdMinter(lambda: 1_800_000_000.0)
    assert not {a() for _ in range(2000)} & {b() for _ in range(2000)}


@given(st.integers(min_value=0, max_value=(1 << 48) - 1), st.integers(min_value=0, max_value=(1 << 74) - 1))
def test_the_string_form_round_trips(ms: int, rand: int) -> None:
    value = ms << 80 | 0x7 << 76 | (rand >> 62) << 64 | 0b10 << 62 | (rand & ((1 << 62) - 1))
    text = format_id(value)
    assert text == str(uuid.UUID(int=value))
    assert parse_id(text) == value and parse_id(text.upper()) == value


def test_what_is_not_a_uuid7_does_not_parse() -> None:
    assert parse_id(str(uuid.uuid4())) is None  # version 4
    assert parse_id("not-an-id") is None
    assert parse_id(None) is None and parse_id(42) is None
    assert parse_id(format_id(IdMinter()())[:-1] + "g") is None
    assert parse_id("{" + format_id(IdMinter()())[1:]) is None
