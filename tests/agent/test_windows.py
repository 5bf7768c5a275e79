"""Maintenance windows, deferral and metered links on a real agent with an injected wall clock.

The agent runs with its link and fetcher in memory (as in ``test_shell.py``) and a
:class:`~device_agent.clock.SkewedClock`: the test moves the device's clock to the window's
opening instead of waiting for it, and the agent (which re-reads its clock every
``schedule_poll_s``) must download at once, stage, and swap only inside the window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from device_agent import protocol
from device_agent.agent import Agent
from device_agent.clock import SkewedClock
from device_agent.config import AgentConfig
from device_agent.local_api import ApiError, defer_request
from device_agent.memory_link import MemoryLink
from device_agent.schedule import DAYS
from signing.keyring import KeyDir

from .harness import HW, Bundle, LoopThread, X, model_ref, sign_directive, unique_id, wait_for
from .memory_fetcher import MemoryFetcher

DS = protocol.DeploymentState
EVERY_DAY = list(DAYS)


class Device:
    def __init__(self, keydir: KeyDir, data: Path, loop: LoopThread, **config: Any) -> None:
        self.clock = SkewedClock()
        cfg = AgentConfig(
            unique_id(),
            HW,
            data,
            keydir.trust_path,
            telemetry_interval=0.2,
            schedule_poll_s=0.05,
            **config,
        )
        self.link, self.fetcher, self.loop, self.keydir = (
            MemoryLink(cfg.device_id),
            MemoryFetcher(),
            loop,
            keydir,
        )
        self.agent = Agent(cfg, keydir.trust_root(), clock=self.clock, link=self.link, fetcher=self.fetcher)
        loop.run(self.agent.start())
        assert loop.run(self.agent.wait_connected(5))

    @property
    def id(self) -> str:
        return self.agent.device_id

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock(), UTC)

    def direct(self, seq: int, bundle: Bundle, **kw: Any) -> None:
        model_url, envelope_url = self.fetcher.add(bundle)
        ref = model_ref(bundle, model_url=model_url, envelope_url=envelope_url)
        # A long TTL: the test moves the device's clock forward past the usual hour.
        self.link.deliver(sign_directive(self.keydir.key("fleet"), self.id, seq, ref, ttl=30 * 86400, **kw))

    def events(self) -> list[protocol.Event]:
        return [protocol.decode_event(m.payload) for m in self.link.published(protocol.Channel.EVENTS)]

    def wait_event(self, seq: int, state: DS, reason: str | None = None) -> protocol.Event:
        def find() -> protocol.Event | None:
            return next(
                (e for e in self.events() if e.seq == seq and e.state == state and e.reason == reason), None
            )

        return wait_for(find, 15.0, f"{state} {reason} event for seq {seq}")

    def reported(self) -> protocol.Reported:
        return protocol.decode_reported(self.link.published(protocol.Channel.REPORTED)[-1].payload)

    def model_fetched(self, bundle: Bundle) -> bool:
        return f"mem://m/{bundle.sha256}" in self.fetcher.calls

    def set_link(self, link_class: str) -> None:
        async def change() -> None:
            self.agent.set_link_class(link_class)

        self.loop.run(change())


@pytest.fixture
def device(keydir: KeyDir, tmp_path: Path, loop_thread: LoopThread) -> Iterator[Callable[..., Device]]:
    started: list[Device] = []

    def make(**config: Any) -> Device:
        d = Device(keydir, tmp_path / f"dev{len(started)}", loop_thread, **config)
        started.append(d)
        return d

    yield make
    for d in started:
        loop_thread.run(d.agent.stop())


def window_from(opening: datetime, minutes: int = 60) -> dict[str, Any]:
    """An every-day window opening at ``opening`` (UTC, whole minutes) for ``minutes``."""
    closing = opening + timedelta(minutes=minutes)
    return {"days": EVERY_DAY, "start": opening.strftime("%H:%M"), "end": closing.strftime("%H:%M")}


def test_downloads_at_once_and_swaps_only_when_the_window_opens(
    device: Callable[..., Device], two_bundles: tuple[Bundle, Bundle]
) -> None:
    a, _ = two_bundles
    d = device(timezone="UTC")
    opening = (d.now() + timedelta(minutes=30)).replace(second=0, microsecond=0)
    d.direct(1, a, activation={"windows": [window_from(opening)], "max_deferral_seconds": 0})
    staged = d.wait_event(1, DS.STAGED)
    # Downloaded and verified before the window: the bytes were counted on the event ending the install.
    assert d.model_fetched(a)
    envelope = len(d.fetcher.files[f"mem://e/{a.sha256}"])
    assert staged.bytes_fetched == a.length + envelope
    assert sum(e.bytes_fetched or 0 for e in d.events()) == staged.bytes_fetched  # counted once
    waits = d.wait_event(1, DS.STAGED, "maintenance_window")
    assert "window opens" in (waits.detail or "")
    rep = wait_for(lambda: (r := d.reported()).waiting is not None and r, what="the waiting report")
    assert rep.deployment_state == DS.STAGED and rep.waiting is not None
    assert rep.waiting.reason == "maintenance_window" and rep.waiting.until == opening
    assert rep.timezone == "UTC"
    assert d.agent.running_sha256 is None  # nothing was swapped in; nothing was loaded either
    # Still closed a minute before the opening ...
    d.clock.skew_s = (opening - datetime.now(UTC)).total_seconds() - 60
    assert not any(e.state == DS.WARMING for e in d.events())
    # ... and at the opening the model goes in.
    d.clock.skew_s = (opening - datetime.now(UTC)).total_seconds() + 1
    d.wait_event(1, DS.SERVING)
    assert d.agent.infer(X).model_sha256 == a.sha256
    assert wait_for(lambda: d.reported().waiting is None, what="the wait cleared in the report")
    states = [e.state for e in d.events() if e.reason is None]
    assert states.index(DS.STAGED) < states.index(DS.WARMING) < states.index(DS.SWAPPING)


def test_the_window_is_read_in_the_devices_own_time_zone(
    device: Callable[..., Device], two_bundles: tuple[Bundle, Bundle]
) -> None:
    a, _ = two_bundles
    d = device(timezone="Asia/Tokyo")  # UTC+9, no DST
    now_utc = d.now()
    # A window that is open now in UTC wall-clock terms but, read in Tokyo, is nine hours off.
    start = (now_utc - timedelta(minutes=5)).replace(second=0, microsecond=0)
    d.direct(1, a, activation={"windows": [window_from(start)]})
    waits = d.wait_event(1, DS.STAGED, "maintenance_window")
    assert "JST" in (waits.detail or "")
    assert d.agent.running_sha256 is None


def test_a_newer_directive_supersedes_a_staged_one(
    device: Callable[..., Device], two_bundles: tuple[Bundle, Bundle]
) -> None:
    a, b = two_bundles
    d = device(timezone="UTC")
    opening = (d.now() + timedelta(hours=2)).replace(second=0, microsecond=0)
    d.direct(1, a, activation={"windows": [window_from(opening)]})
    d.wait_event(1, DS.STAGED, "maintenance_window")
    d.direct(2, b)  # a roll back, say: no window
    d.wait_event(2, DS.SERVING)
    assert d.agent.running_sha256 == b.sha256
    assert not any(e.seq == 1 and e.state == DS.WARMING for e in d.events())


def test_an_app_defers_activation_up_to_the_maximum(
    device: Callable[..., Device], two_bundles: tuple[Bundle, Bundle]
) -> None:
    a, _ = two_bundles
    d = device(timezone="Europe/Berlin")
    answer = d.agent.defer(7200, "recording a video")  # busy for two hours; the policy allows one
    assert answer["deferred_until"] is not None and answer["max_deferral_seconds"] is None
    d.direct(1, a, activation={"windows": [], "max_deferral_seconds": 3600})
    held = d.wait_event(1, DS.STAGED, "deferred")
    assert "most the policy allows" in (held.detail or "")
    deferrals = [e for e in d.events() if e.reason == "deferred"]
    assert any("recording a video" in (e.detail or "") for e in deferrals)  # the call itself is an event
    # Asking again within the budget answers the cap that applies now.
    again = d.agent.defer(7200, "still recording")
    assert again["max_deferral_seconds"] == 3600 and again["holds_until"] < again["deferred_until"]
    assert d.agent.running_sha256 is None
    d.clock.skew_s = 3601  # past the maximum deferral: activation proceeds though the app is busy
    d.wait_event(1, DS.SERVING)


def test_withdrawing_a_deferral_activates_at_once(
    device: Callable[..., Device], two_bundles: tuple[Bundle, Bundle]
) -> None:
    a, _ = two_bundles
    d = device(timezone="UTC")
    d.agent.defer(600, "busy")
    d.direct(1, a, activation={"windows": [], "max_deferral_seconds": 3600})
    d.wait_event(1, DS.STAGED, "deferred")
    d.agent.defer(0, "done")
    d.wait_event(1, DS.SERVING)


def test_a_metered_link_waits_for_an_unmetered_one(
    device: Callable[..., Device], two_bundles: tuple[Bundle, Bundle]
) -> None:
    a, _ = two_bundles
    d = device(timezone="UTC", link_class="metered")
    d.direct(1, a, metered={"download": "unmetered_only"})
    waits = d.wait_event(1, DS.IDLE, "metered_link")
    assert "unmetered links only" in (waits.detail or "")
    rep = wait_for(lambda: (r := d.reported()).waiting is not None and r, what="the waiting report")
    assert rep.waiting is not None and rep.waiting.reason == "metered_link" and rep.link["class"] == "metered"
    assert not d.model_fetched(a) and not any(e.state == DS.FAILED for e in d.events())
    d.set_link("unmetered")
    d.wait_event(1, DS.SERVING)
    assert d.reported().link["used_bytes_today"] == 0  # an unmetered download spends no budget


def test_a_daily_budget_counts_metered_bytes_and_holds_what_does_not_fit(
    device: Callable[..., Device], two_bundles: tuple[Bundle, Bundle]
) -> None:
    a, b = two_bundles
    d = device(timezone="UTC", link_class="metered")
    d.fetcher.add(a)
    envelope = len(d.fetcher.files[f"mem://e/{a.sha256}"])
    budget = a.length + envelope + a.length // 2  # one model and its envelope fit today, two do not
    d.direct(1, a, metered={"max_bytes_per_day": budget})
    first = d.wait_event(1, DS.SERVING)
    used = wait_for(lambda: d.reported().link["used_bytes_today"], what="the used bytes report")
    assert used >= a.length and first.model_sha256 == a.sha256
    d.direct(2, b, metered={"max_bytes_per_day": budget})
    waits = d.wait_event(2, DS.SERVING, "link_budget")
    assert "bytes used today" in (waits.detail or "") and not d.model_fetched(b)
    # The next local day the budget is fresh.
    midnight = (d.now() + timedelta(days=1)).replace(hour=0, minute=0, second=1, microsecond=0)
    d.clock.skew_s = (midnight - datetime.now(UTC)).total_seconds()
    d.wait_event(2, DS.SERVING)
    assert d.model_fetched(b)


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"{", "bad_json"),
        (b"[]", "bad_defer"),
        (b'{"seconds": -1}', "bad_seconds"),
        (b'{"seconds": "soon"}', "bad_seconds"),
        (b'{"seconds": true}', "bad_seconds"),
        (b'{"seconds": 99999999}', "bad_seconds"),
        (b'{"seconds": 5, "reason": 7}', "bad_reason"),
        (b'{"seconds": 5, "until": "later"}', "bad_defer"),
    ],
)
def test_bad_deferral_requests_get_a_clear_400(body: bytes, code: str) -> None:
    with pytest.raises(ApiError) as err:
        defer_request(body)
    assert err.value.status == 400 and err.value.code == code
    assert defer_request(b'{"seconds": 30}') == (30.0, "busy")


def test_a_restart_while_staged_stages_again_without_downloading(
    device: Callable[..., Device], two_bundles: tuple[Bundle, Bundle], keydir: KeyDir, loop_thread: LoopThread
) -> None:
    a, _ = two_bundles
    d = device(timezone="UTC")
    opening = (d.now() + timedelta(hours=1)).replace(second=0, microsecond=0)
    d.direct(1, a, activation={"windows": [window_from(opening)]})
    d.wait_event(1, DS.STAGED, "maintenance_window")
    payload = d.link.retained[d.link.desired_topic]
    loop_thread.run(d.agent.abort())  # power cut while staged
    # The reboot: the same data dir and clock, the retained directive delivered again.
    link, fetcher = MemoryLink(d.id), MemoryFetcher()
    fetcher.add(a)
    again = Agent(d.agent.config, keydir.trust_root(), clock=d.clock, link=link, fetcher=fetcher)
    loop_thread.run(again.start())
    try:
        # Nothing was ever activated, but the boot must not serve the staged model either: its
        # window is closed.
        assert again.running_sha256 is None
        link.deliver(payload)

        def staged() -> bool:
            events = [protocol.decode_event(m.payload) for m in link.published(protocol.Channel.EVENTS)]
            return any(e.seq == 1 and e.state == DS.STAGED and e.reason is None for e in events)

        wait_for(staged, 15.0, "staged again after the restart")
        assert fetcher.calls == []  # the model was found in its slot and re-hashed, not fetched
        assert again.running_sha256 is None and again.deployment_state == DS.STAGED
    finally:
        loop_thread.run(again.stop())


def test_a_not_before_wait_is_reported_as_waiting(
    device: Callable[..., Device], two_bundles: tuple[Bundle, Bundle]
) -> None:
    a, _ = two_bundles
    d = device(timezone="UTC")
    start = d.now() + timedelta(seconds=1.5)
    d.direct(1, a, not_before=start.isoformat())
    d.wait_event(1, DS.IDLE, "not_before")
    rep = wait_for(lambda: (r := d.reported()).waiting is not None and r, what="the waiting report")
    assert rep.waiting is not None and rep.waiting.reason == "not_before" and rep.waiting.until == start
    d.wait_event(1, DS.SERVING)
    assert d.reported().waiting is None
