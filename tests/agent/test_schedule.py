"""Window arithmetic (midnight, DST, time zones), deferral limits and the metered-link rule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from device_agent import schedule
from device_agent.schedule import (
    BUDGET,
    DEFERRED,
    METERED,
    WINDOW,
    MeteredRule,
    ScheduleError,
    Window,
    activation_hold,
    download_hold,
    next_opening,
    open_window,
)

BERLIN = schedule.zone("Europe/Berlin")
NEW_YORK = schedule.zone("America/New_York")
TOKYO = schedule.zone("Asia/Tokyo")


def win(days: list[str], start: str, end: str) -> Window:
    return Window.from_dict({"days": days, "start": start, "end": end})


def local(tz: schedule.ZoneInfo, year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    """A local wall-clock time in ``tz`` as the UTC instant it is."""
    return datetime(year, month, day, hour, minute, tzinfo=tz).astimezone(UTC)


def test_a_window_crossing_midnight_belongs_to_the_day_it_opens() -> None:
    sat_night = [win(["sat"], "22:00", "04:00")]
    # Saturday 2026-12-05 22:00 Berlin opens; Sunday 03:59 is still inside; Sunday 04:00 is out.
    assert open_window(sat_night, local(BERLIN, 2026, 12, 5, 21, 59), BERLIN) is None
    assert open_window(sat_night, local(BERLIN, 2026, 12, 5, 22, 0), BERLIN) is not None
    assert open_window(sat_night, local(BERLIN, 2026, 12, 6, 3, 59), BERLIN) is not None
    assert open_window(sat_night, local(BERLIN, 2026, 12, 6, 4, 0), BERLIN) is None
    # Sunday 22:00 is not a Saturday: the next opening is a week after the last.
    assert next_opening(sat_night, local(BERLIN, 2026, 12, 6, 22, 0), BERLIN) == local(
        BERLIN, 2026, 12, 12, 22, 0
    )


def test_the_same_window_is_read_in_each_devices_own_zone() -> None:
    nightly = [win(["mon", "tue", "wed", "thu", "fri", "sat", "sun"], "02:00", "04:00")]
    at = datetime(2026, 12, 6, 1, 30, tzinfo=UTC)  # 02:30 in Berlin, 10:30 in Tokyo, 20:30 in New York
    assert open_window(nightly, at, BERLIN) is not None
    assert open_window(nightly, at, TOKYO) is None
    assert open_window(nightly, at, NEW_YORK) is None
    assert next_opening(nightly, at, TOKYO) == local(TOKYO, 2026, 12, 7, 2, 0)
    assert next_opening(nightly, at, NEW_YORK) == local(NEW_YORK, 2026, 12, 6, 2, 0)


def test_spring_forward_the_window_opens_when_the_clocks_jump() -> None:
    # 2026-03-08 in New York: 02:00 EST jumps to 03:00 EDT. A 02:30-04:00 window opens at 03:00 EDT.
    w = [win(["sun"], "02:30", "04:00")]
    before = datetime(2026, 3, 8, 6, 59, tzinfo=UTC)  # 01:59 EST
    opens = next_opening(w, before, NEW_YORK)
    assert opens == datetime(2026, 3, 8, 7, 30, tzinfo=UTC)  # 02:30 EST = 03:30 EDT: the wall-clock gap
    assert opens.astimezone(NEW_YORK).strftime("%H:%M %Z") == "03:30 EDT"
    span = open_window(w, opens, NEW_YORK)
    assert span is not None and span[1] - span[0] == timedelta(minutes=30)  # closes at 04:00 EDT


def test_fall_back_a_window_over_the_repeated_hour_lasts_its_real_length() -> None:
    # 2026-11-01 in New York: 02:00 EDT falls back to 01:00 EST; 01:00-03:00 local is three real hours.
    w = [win(["sun"], "01:00", "03:00")]
    span = open_window(w, datetime(2026, 11, 1, 6, 30, tzinfo=UTC), NEW_YORK)  # 01:30 EST (second pass)
    assert span is not None
    assert span[1] - span[0] == timedelta(hours=3)
    # The Berlin switch a week earlier: a window across it is exact as well.
    w = [win(["sat"], "23:00", "04:00")]  # 2026-10-24 23:00 CEST to 25th 04:00 CET: 6 real hours
    span = open_window(w, local(BERLIN, 2026, 10, 25, 3, 30), BERLIN)
    assert span is not None and span[1] - span[0] == timedelta(hours=6)


def test_a_whole_day_window_and_no_windows_are_always_open() -> None:
    at = datetime(2026, 12, 9, 12, 0, tzinfo=UTC)  # a Wednesday
    assert open_window([win(["wed"], "00:00", "00:00")], at, BERLIN) is not None
    assert open_window([], at, BERLIN) is not None
    assert next_opening([], at, BERLIN) == at


@pytest.mark.parametrize(
    ("doc", "words"),
    [
        ({"days": ["funday"], "start": "01:00", "end": "02:00"}, "not one of"),
        ({"days": [], "start": "01:00", "end": "02:00"}, "non-empty"),
        ({"days": ["mon"], "start": "25:00", "end": "02:00"}, "HH:MM"),
        ({"days": ["mon"], "start": "1:00", "end": "02:00"}, "HH:MM"),
        ({"days": ["mon"], "start": "01:00"}, "end: field required"),
        ({"days": ["mon"], "start": "01:00", "end": "02:00", "tz": "UTC"}, "unknown field"),
    ],
)
def test_malformed_windows_are_refused_with_the_field_named(doc: dict[str, object], words: str) -> None:
    with pytest.raises(ScheduleError, match=words):
        Window.from_dict(doc)


def test_time_zones_come_from_iana_names_or_the_system(tmp_path: Path) -> None:
    with pytest.raises(ScheduleError, match="unknown time zone"):
        schedule.zone("Mars/Olympus_Mons")
    assert schedule.system_timezone({"TZ": "Asia/Tokyo"}, tmp_path) == "Asia/Tokyo"
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc/timezone").write_text("Europe/Berlin\n")
    assert schedule.system_timezone({}, tmp_path) == "Europe/Berlin"
    assert schedule.system_timezone({"TZ": "nonsense"}, tmp_path) == "Europe/Berlin"
    (tmp_path / "etc/timezone").unlink()
    (tmp_path / "etc/localtime").symlink_to("/usr/share/zoneinfo/America/New_York")
    assert schedule.system_timezone({}, tmp_path) == "America/New_York"
    assert schedule.system_timezone({}, tmp_path / "nowhere") == "UTC"


def test_outside_the_window_the_staged_model_waits_for_the_opening() -> None:
    w = [win(["sat"], "22:00", "04:00")]
    now = local(BERLIN, 2026, 12, 5, 12, 0)
    hold, ready = activation_hold(
        now, windows=w, tz=BERLIN, busy_until=None, ready_at=None, max_deferral_s=60
    )
    assert hold is not None and hold.reason == WINDOW and hold.until == local(BERLIN, 2026, 12, 5, 22, 0)
    assert ready is None  # the deferral budget has not started
    hold, ready = activation_hold(
        hold.until, windows=w, tz=BERLIN, busy_until=None, ready_at=None, max_deferral_s=60
    )
    assert hold is None and ready == local(BERLIN, 2026, 12, 5, 22, 0)


def test_a_deferral_holds_up_to_the_maximum_counted_from_readiness() -> None:
    opens = local(BERLIN, 2026, 12, 5, 22, 0)
    w = [win(["sat"], "22:00", "04:00")]
    busy = opens + timedelta(hours=5)  # the app asks for longer than the policy's hour
    hold, ready = activation_hold(
        opens, windows=w, tz=BERLIN, busy_until=busy, ready_at=None, max_deferral_s=3600
    )
    assert hold is not None and hold.reason == DEFERRED and hold.until == opens + timedelta(hours=1)
    assert "most the policy allows" in hold.detail
    # Half an hour on, the app asks again: the budget still ends an hour after readiness.
    later = opens + timedelta(minutes=30)
    hold, ready = activation_hold(
        later,
        windows=w,
        tz=BERLIN,
        busy_until=later + timedelta(hours=2),
        ready_at=ready,
        max_deferral_s=3600,
    )
    assert hold is not None and hold.until == opens + timedelta(hours=1)
    # At the limit the model goes in, busy or not.
    at_limit = opens + timedelta(hours=1)
    hold, _ = activation_hold(
        at_limit, windows=w, tz=BERLIN, busy_until=busy, ready_at=ready, max_deferral_s=3600
    )
    assert hold is None
    # A short deferral ends on its own; a withdrawn one (None) holds nothing.
    hold, _ = activation_hold(
        opens,
        windows=w,
        tz=BERLIN,
        busy_until=opens + timedelta(minutes=5),
        ready_at=None,
        max_deferral_s=3600,
    )
    assert hold is not None and hold.until == opens + timedelta(minutes=5)
    assert (
        activation_hold(opens, windows=w, tz=BERLIN, busy_until=None, ready_at=None, max_deferral_s=3600)[0]
        is None
    )


def test_a_deferral_past_the_window_waits_for_the_next_opening_then_goes() -> None:
    w = [win(["sat", "sun"], "22:00", "23:00")]
    opens = local(BERLIN, 2026, 12, 5, 22, 0)
    busy = opens + timedelta(hours=3)
    hold, ready = activation_hold(
        opens, windows=w, tz=BERLIN, busy_until=busy, ready_at=None, max_deferral_s=7200
    )
    assert hold is not None and hold.reason == DEFERRED
    # At 23:00 the window closed: wait for Sunday's; there the deferral budget is spent: go.
    closed = opens + timedelta(hours=1)
    hold, ready = activation_hold(
        closed, windows=w, tz=BERLIN, busy_until=busy, ready_at=ready, max_deferral_s=7200
    )
    assert hold is not None and hold.reason == WINDOW and hold.until == local(BERLIN, 2026, 12, 6, 22, 0)
    sunday = local(BERLIN, 2026, 12, 6, 22, 0)
    assert (
        activation_hold(
            sunday,
            windows=w,
            tz=BERLIN,
            busy_until=sunday + timedelta(hours=1),
            ready_at=ready,
            max_deferral_s=7200,
        )[0]
        is None
    )


def test_an_unmetered_link_is_never_held() -> None:
    now = datetime(2026, 12, 6, 12, tzinfo=UTC)
    rule = MeteredRule("unmetered_only")
    kw = {"device_budget": 10, "used_today": 10, "length": 10**9, "tz": BERLIN}
    assert download_hold(now, link_class="unmetered", rule=rule, **kw) is None  # type: ignore[arg-type]


def test_unmetered_only_holds_a_metered_link_without_a_time() -> None:
    now = datetime(2026, 12, 6, 12, tzinfo=UTC)
    hold = download_hold(
        now,
        link_class="metered",
        rule=MeteredRule("unmetered_only"),
        device_budget=0,
        used_today=0,
        length=100,
        tz=BERLIN,
    )
    assert hold is not None and hold.reason == METERED and hold.until is None


def test_a_daily_budget_waits_for_local_midnight_and_takes_the_smaller_cap() -> None:
    now = local(TOKYO, 2026, 12, 6, 18, 0)
    rule = MeteredRule(max_bytes_per_day=1000)
    assert (
        download_hold(
            now, link_class="metered", rule=rule, device_budget=0, used_today=0, length=900, tz=TOKYO
        )
        is None
    )
    hold = download_hold(
        now, link_class="metered", rule=rule, device_budget=0, used_today=200, length=900, tz=TOKYO
    )
    assert hold is not None and hold.reason == BUDGET and hold.until == local(TOKYO, 2026, 12, 7, 0, 0)
    # The device's own budget is smaller: it wins.
    hold = download_hold(
        now, link_class="metered", rule=rule, device_budget=500, used_today=0, length=900, tz=TOKYO
    )
    assert (
        hold is not None and hold.reason == BUDGET and hold.until is None
    )  # never fits a day: waits for the link
    # No rule at all but a device budget still caps the metered link.
    assert (
        download_hold(
            now, link_class="metered", rule=None, device_budget=1000, used_today=0, length=900, tz=TOKYO
        )
        is None
    )
    assert schedule.local_day(datetime(2026, 12, 6, 16, tzinfo=UTC), TOKYO) == "2026-12-07"


def test_metered_rules_refuse_nonsense() -> None:
    with pytest.raises(ScheduleError, match="download"):
        MeteredRule.from_dict({"download": "never"})
    with pytest.raises(ScheduleError, match="max_bytes_per_day"):
        MeteredRule.from_dict({"max_bytes_per_day": -5})
    with pytest.raises(ScheduleError, match="unknown"):
        MeteredRule.from_dict({"max_mb_per_day": 5})
