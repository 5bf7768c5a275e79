"""When a device may download and when it may activate a model: maintenance windows, deferral
and metered links, as pure functions of the time, the device's time zone and what it used.

Standard library only (``zoneinfo``), no I/O: the reconciler asks, the answers are a
:class:`Hold` (wait, with the reason the device reports and when to look again) or ``None``
(go). The same rules hold on the device (which enforces them, offline too: they travel in
the signed directive) and in the fleet server's policy validation (which parses windows with
:meth:`Window.from_dict`, so a window the server accepts is one the device understands).

Windows are weekly and read in the DEVICE's local time: ``{"days": ["sat", "sun"], "start":
"22:00", "end": "04:00"}`` opens at 22:00 local on Saturdays and Sundays and closes at 04:00
the next morning (an end at or before the start crosses midnight; ``start == end`` is a
whole day). Every instant is compared in UTC, so daylight saving time is exact: a window
starting inside the hour the clocks skip opens when they jump (02:30 on a spring-forward night
is 03:30), and a window around the repeated hour lasts its real length (01:00-02:00 on a
fall-back night is two hours).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_HHMM = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")
LINK_CLASSES = ("unmetered", "metered")
METERED_DOWNLOAD = ("any", "unmetered_only")

# Why a device waits (the wire's reason codes for them are in device_agent.wire.ReasonCode).
WINDOW, DEFERRED, METERED, BUDGET = "maintenance_window", "deferred", "metered_link", "link_budget"


class ScheduleError(ValueError):
    """A window, time zone or link rule that is not well formed (the message names the field)."""


def parse_hhmm(value: Any, what: str) -> time:
    """``"HH:MM"`` (24-hour) as a time; ScheduleError otherwise."""
    if not isinstance(value, str) or not (m := _HHMM.match(value)):
        raise ScheduleError(f"{what}: expected 'HH:MM' (00:00 to 23:59), got {value!r}")
    return time(int(m.group(1)), int(m.group(2)))


def parse_days(value: Any, what: str = "days") -> tuple[int, ...]:
    """Day names (``mon`` .. ``sun``) as sorted weekday numbers (Monday 0); ScheduleError otherwise."""
    if not isinstance(value, list | tuple) or not value:
        raise ScheduleError(f"{what}: expected a non-empty list of {', '.join(DAYS)}")
    out = set()
    for day in value:
        if not isinstance(day, str) or day.lower() not in DAYS:
            raise ScheduleError(f"{what}: {day!r} is not one of {', '.join(DAYS)}")
        out.add(DAYS.index(day.lower()))
    return tuple(sorted(out))


def zone(name: str) -> ZoneInfo:
    """The IANA time zone ``name``; ScheduleError if this system (or ``tzdata``) does not know it."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, TypeError) as exc:
        raise ScheduleError(f"unknown time zone {name!r} (an IANA name such as 'Europe/Berlin')") from exc


def system_timezone(environ: dict[str, str] | None = None, root: Path = Path("/")) -> str:
    """The IANA name of the system's time zone: ``TZ``, ``/etc/timezone``, the ``/etc/localtime``
    link, else ``UTC`` (a device that cannot tell keeps UTC rather than guessing)."""
    env = os.environ if environ is None else environ
    candidates = [env.get("TZ", "").lstrip(":")]
    with contextlib.suppress(OSError):
        candidates.append((root / "etc/timezone").read_text().strip())
    try:
        target = os.readlink(root / "etc/localtime")
        candidates.append(target.split("zoneinfo/", 1)[1] if "zoneinfo/" in target else "")
    except OSError:
        pass
    for name in candidates:
        if name:
            try:
                zone(name)
                return name
            except ScheduleError:
                continue
    return "UTC"


@dataclass(frozen=True, slots=True)
class Window:
    """A weekly window: opens at ``start`` local time on each of ``days``, closes at ``end``."""

    days: tuple[int, ...]  # weekday numbers, Monday 0
    start: time
    end: time

    @classmethod
    def from_dict(cls, data: Any, what: str = "window") -> Window:
        if not isinstance(data, dict):
            raise ScheduleError(f"{what}: expected an object {{days, start, end}}")
        unknown = sorted(set(data) - {"days", "start", "end"})
        if unknown:
            raise ScheduleError(f"{what}: unknown field(s) {', '.join(unknown)}")
        for key in ("days", "start", "end"):
            if key not in data:
                raise ScheduleError(f"{what}.{key}: field required")
        return cls(
            parse_days(data["days"], f"{what}.days"),
            parse_hhmm(data["start"], f"{what}.start"),
            parse_hhmm(data["end"], f"{what}.end"),
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "days": [DAYS[d] for d in self.days],
            "start": self.start.strftime("%H:%M"),
            "end": self.end.strftime("%H:%M"),
        }

    def spans(self, around: date, tz: ZoneInfo) -> Iterable[tuple[datetime, datetime]]:
        """The (open, close) instants in UTC of the openings from the day before ``around`` to a
        week after it (every opening that can contain, or come next after, an instant that day)."""
        for offset in range(-1, 8):
            day = around + timedelta(days=offset)
            if day.weekday() not in self.days:
                continue
            opens = datetime.combine(day, self.start, tzinfo=tz)
            close_day = day if self.end > self.start else day + timedelta(days=1)
            closes = datetime.combine(close_day, self.end, tzinfo=tz)
            # Compare in UTC: aware datetimes sharing one tzinfo compare by wall time, wrong across DST.
            yield opens.astimezone(UTC), closes.astimezone(UTC)


def parse_windows(data: Any, what: str = "windows") -> tuple[Window, ...]:
    if not isinstance(data, list | tuple):
        raise ScheduleError(f"{what}: expected a list of windows")
    return tuple(Window.from_dict(w, f"{what}[{i}]") for i, w in enumerate(data))


def open_window(windows: Sequence[Window], now: datetime, tz: ZoneInfo) -> tuple[datetime, datetime] | None:
    """The (open, close) UTC span of a window ``now`` falls in (no windows: always open), else None."""
    if not windows:
        return now, now + timedelta(days=3650)
    now = now.astimezone(UTC)
    local_day = now.astimezone(tz).date()
    for w in windows:
        for opens, closes in w.spans(local_day, tz):
            if opens <= now < closes:
                return opens, closes
    return None


def next_opening(windows: Sequence[Window], now: datetime, tz: ZoneInfo) -> datetime:
    """``now`` inside a window (or with none), else the next instant (UTC) one opens."""
    if open_window(windows, now, tz) is not None:
        return now
    now = now.astimezone(UTC)
    local_day = now.astimezone(tz).date()
    later = [
        opens for w in windows for opens, closes in w.spans(local_day, tz) if opens > now and closes > opens
    ]
    # Every window recurs weekly, so one opens within 8 days (a window the DST gap swallowed whole
    # on one night opens on its next day).
    return min(later)


@dataclass(frozen=True, slots=True)
class Hold:
    """Wait: ``reason`` (one of WINDOW, DEFERRED, METERED, BUDGET), a line for the operator, and
    when the answer may change (None: only when something else does, such as the link)."""

    reason: str
    detail: str
    until: datetime | None = None


def _local(at: datetime, tz: ZoneInfo) -> str:
    return at.astimezone(tz).strftime("%a %Y-%m-%d %H:%M %Z")


def activation_hold(
    now: datetime,
    *,
    windows: Sequence[Window],
    tz: ZoneInfo,
    busy_until: datetime | None,
    ready_at: datetime | None,
    max_deferral_s: float,
) -> tuple[Hold | None, datetime | None]:
    """May a staged model be activated now? Returns (hold or None, ``ready_at``).

    ``ready_at`` is when the device first could have activated (staged, inside a window): the
    deferral budget counts from there. An app's deferral (``busy_until``) holds activation until
    it ends or until ``max_deferral_s`` after ``ready_at``, whichever comes first; after that the
    model is activated at the next chance inside a window, busy or not.
    """
    if open_window(windows, now, tz) is None:
        opens = next_opening(windows, now, tz)
        return Hold(WINDOW, f"staged; activates when the window opens ({_local(opens, tz)})", opens), ready_at
    ready = ready_at or now
    if busy_until is not None and now < busy_until:
        limit = ready + timedelta(seconds=max_deferral_s)
        if now < limit:
            until = min(busy_until, limit)
            capped = " (the most the policy allows)" if until < busy_until else ""
            return Hold(DEFERRED, f"deferred by an app until {_local(until, tz)}{capped}", until), ready
    return None, ready


@dataclass(frozen=True, slots=True)
class MeteredRule:
    """What a rollout allows on a metered link: ``download`` ``any`` or ``unmetered_only``, and at
    most ``max_bytes_per_day`` fetched per local day (None: no cap)."""

    download: str = "any"
    max_bytes_per_day: int | None = None

    @classmethod
    def from_dict(cls, data: Any, what: str = "metered") -> MeteredRule:
        if not isinstance(data, dict):
            raise ScheduleError(f"{what}: expected an object")
        unknown = sorted(set(data) - {"download", "max_bytes_per_day"})
        if unknown:
            raise ScheduleError(f"{what}: unknown field(s) {', '.join(unknown)}")
        download = data.get("download", "any")
        if download not in METERED_DOWNLOAD:
            raise ScheduleError(f"{what}.download: one of {', '.join(METERED_DOWNLOAD)}, got {download!r}")
        cap = data.get("max_bytes_per_day")
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, int) or cap < 1):
            raise ScheduleError(f"{what}.max_bytes_per_day: a positive integer or null")
        return cls(download, cap)

    def to_dict(self) -> dict[str, Any]:
        return {"download": self.download, "max_bytes_per_day": self.max_bytes_per_day}


def local_day(now: datetime, tz: ZoneInfo) -> str:
    """The device's local calendar day (``YYYY-MM-DD``): a daily byte budget resets at local midnight."""
    return now.astimezone(tz).date().isoformat()


def download_hold(
    now: datetime,
    *,
    link_class: str,
    rule: MeteredRule | None,
    device_budget: int,
    used_today: int,
    length: int,
    tz: ZoneInfo,
) -> Hold | None:
    """May ``length`` bytes be downloaded now? Only a metered link is ever held.

    The cap is the smaller of the rollout's ``max_bytes_per_day`` and the device's own daily
    budget (``device_budget``, 0: none). A download that does not fit what is left today waits
    for the next local midnight; one larger than a whole day's cap waits for an unmetered link.
    """
    if link_class != "metered":
        return None
    if rule is not None and rule.download == "unmetered_only":
        return Hold(METERED, "the rollout downloads on unmetered links only; this link is metered")
    caps = [c for c in ((rule.max_bytes_per_day if rule else None), device_budget or None) if c]
    if not caps:
        return None
    cap = min(caps)
    if length > cap:
        return Hold(BUDGET, f"{length} bytes exceed the daily cap of {cap} on this metered link")
    if used_today + length > cap:
        midnight = datetime.combine(now.astimezone(tz).date() + timedelta(days=1), time(0), tzinfo=tz)
        return Hold(
            BUDGET,
            f"{used_today} of {cap} bytes used today; {length} more waits for {_local(midnight, tz)}",
            midnight.astimezone(UTC),
        )
    return None


__all__ = [
    "BUDGET",
    "DAYS",
    "DEFERRED",
    "LINK_CLASSES",
    "METERED",
    "METERED_DOWNLOAD",
    "WINDOW",
    "Hold",
    "MeteredRule",
    "ScheduleError",
    "Window",
    "activation_hold",
    "download_hold",
    "local_day",
    "next_opening",
    "open_window",
    "parse_days",
    "parse_hhmm",
    "parse_windows",
    "system_timezone",
    "zone",
]
