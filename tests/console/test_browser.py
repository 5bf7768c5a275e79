"""The console in a real browser (Debian's Chromium, headless, driven by Playwright) against a
real fleet server with a real broker and devices: sign in, watch a rollout move, pause it, read
why a gate rolled one back, a viewer refused, a wrong token refused, and axe-core's check of
labels, focus and contrast on the main pages. Screenshots land in test-artifacts/console/."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from fleet_server.runner import ServerThread
from tests.server.test_rollout_flow import directives, serve, status

from .chromium import ARTIFACTS, chromium, launch_args
from .helpers import ConsoleFleet, serve_with_shape, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    path = chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=path, headless=True, args=launch_args())
        yield b
        b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1280, "height": 860})
    context.set_default_timeout(10_000)
    yield context.new_page()
    context.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def sign_in(page: Any, server: ServerThread, token: str) -> None:
    page.goto(f"{server.url}/ui/login")
    page.get_by_label("API token").fill(token)
    page.get_by_role("button", name="Sign in").click()
    page.wait_for_url("**/ui/rollouts")


def test_a_wrong_token_is_refused_and_a_right_one_signs_in(
    page: Any, server: ServerThread, tokens: dict[str, str]
) -> None:
    from playwright.sync_api import expect

    page.goto(f"{server.url}/ui/fleet")
    expect(page).to_have_url(f"{server.url}/ui/login?next=%2Fui%2Ffleet")
    page.get_by_label("API token").fill("ef_this-is-not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.locator("#login-message")).to_have_text("unknown or revoked API token")
    shot(page, "login-refused")
    page.get_by_label("API token").fill(tokens["operator"])
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(f"{server.url}/ui/fleet")  # back where the reader was going
    expect(page.locator(".who")).to_contain_text("console-operator")
    cookies = page.context.cookies()
    (cookie,) = [c for c in cookies if c["name"] == "ef_console"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert page.evaluate("document.cookie") == ""  # out of reach of the page's scripts


def test_watch_a_rollout_progress_live_then_pause_it(page: Any, fleet: ConsoleFleet) -> None:
    from playwright.sync_api import expect

    rid, devs = fleet.rollout("bw", 2, stages=[50, 100], min_inferences=1)
    sign_in(page, fleet.server, fleet.tokens["operator"])
    page.get_by_role("link", name=rid).click()
    expect(page.locator("#rollout-state")).to_have_text("running")
    stage1 = page.locator(".stage").nth(0)
    expect(stage1).to_contain_text("1 of 1 assigned · 0 done")
    page.evaluate("window.__stayed = true")  # gone if the page reloads
    (first,) = wait_for(lambda: [d for d in devs.values() if directives(d, fleet.keydir)])
    serve(first, directives(first, fleet.keydir)[-1], inferences=5)
    # the poller swaps the new state in: stage 1 done, stage 2 under way, no reload
    expect(stage1).to_contain_text("1 done", timeout=15_000)
    expect(page.locator(".stage").nth(1)).to_contain_text("2 of 2 assigned", timeout=15_000)
    assert page.evaluate("window.__stayed") is True
    shot(page, "rollout-live")
    page.get_by_role("link", name="Pause").click()
    expect(page.get_by_role("heading", level=1)).to_contain_text(f"Pause rollout {rid}?")
    shot(page, "rollout-confirm")
    page.get_by_role("button", name="Yes, pause").click()
    expect(page.locator("#rollout-state")).to_have_text("paused")
    expect(page.get_by_role("link", name="Resume")).to_be_visible()
    assert status(fleet.client, rid)["state"] == "paused"
    shot(page, "rollout-paused")


def test_a_rolled_back_rollout_shows_the_gates_reason(page: Any, fleet: ConsoleFleet) -> None:
    from playwright.sync_api import expect

    rid = fleet.rolled_back_by_errors("rb")
    sign_in(page, fleet.server, fleet.tokens["viewer"])
    page.goto(f"{fleet.server.url}/ui/rollouts?state=rolled_back")
    page.get_by_role("link", name=rid).click()
    expect(page.locator("#rollout-state")).to_have_text("rolled_back")
    expect(page.locator("#gate-reason")).to_contain_text("roll back by the error_rate gate")
    expect(page.locator("#gate-reason")).to_contain_text("exceeds 0.1")
    expect(page.locator("tr.verdict-breach")).to_contain_text("error_rate")
    shot(page, "rollout-rolled-back")


def test_a_viewer_sees_no_action_and_is_refused_one(page: Any, fleet: ConsoleFleet) -> None:
    from playwright.sync_api import expect

    rid, _ = fleet.rollout("vw", 1, stages=[100], min_inferences=1000)
    sign_in(page, fleet.server, fleet.tokens["viewer"])
    page.goto(f"{fleet.server.url}/ui/rollouts/{rid}")
    expect(page.get_by_role("button", name="Pause")).to_be_disabled()
    expect(page.get_by_role("link", name="Pause")).to_have_count(0)
    expect(page.locator(".actions")).to_contain_text("may look, not act")
    # the confirmation page itself, and a post with the session's own CSRF token: both refused
    response = page.goto(f"{fleet.server.url}/ui/rollouts/{rid}/pause")
    assert response is not None and response.status == 403
    expect(page.locator("#error-message")).to_contain_text("needs operator")
    shot(page, "viewer-refused")
    page.goto(f"{fleet.server.url}/ui/rollouts/{rid}")
    token = page.locator('input[name="csrf"]').first.get_attribute("value")
    answer = page.evaluate(
        """async ([url, token]) => {
            const r = await fetch(url, {method: "POST", body: new URLSearchParams({csrf: token})});
            return r.status;
        }""",
        [f"{fleet.server.url}/ui/rollouts/{rid}/pause", token],
    )
    assert answer == 403
    assert status(fleet.client, rid)["state"] == "running"


PAGES = ("rollouts", "rollout", "fleet", "device", "models", "model", "observability", "audit")


def test_main_pages_pass_axe_and_take_the_keyboard(page: Any, fleet: ConsoleFleet) -> None:
    from axe_playwright_python.sync_playwright import Axe

    rid, devs = fleet.rollout("ax", 2, stages=[50, 100], min_inferences=1)
    (first,) = wait_for(lambda: [d for d in devs.values() if directives(d, fleet.keydir)])
    serve(first, directives(first, fleet.keydir)[-1], inferences=5)
    new_sha = directives(first, fleet.keydir)[-1].model.sha256  # type: ignore[union-attr]
    serve_with_shape(list(devs.values()), new_sha, 8)
    wait_for(lambda: fleet.client.get(f"/api/v1/devices/{first.device_id}").json()["running_model"])
    axe = Axe()
    page.goto(f"{fleet.server.url}/ui/login")
    problems: dict[str, list[str]] = {}

    def check(name: str) -> None:
        found = axe.run(page).response["violations"]
        bad = [
            f"{v['id']} ({v['impact']}): {v['help']}" for v in found if v["impact"] in ("serious", "critical")
        ]
        if bad:
            problems[name] = bad

    check("login")
    sign_in(page, fleet.server, fleet.tokens["operator"])
    urls = {
        "rollouts": "/ui/rollouts",
        "rollout": f"/ui/rollouts/{rid}",
        "fleet": "/ui/fleet",
        "device": f"/ui/devices/{first.device_id}",
        "models": "/ui/models",
        "model": "/ui/models/det/2",
        "observability": "/ui/observability?model=det:2&window=24h",
        "audit": "/ui/audit",
    }
    for name in PAGES:
        page.goto(fleet.server.url + urls[name])
        check(name)
        if name in ("fleet", "models", "observability", "audit", "device"):
            shot(page, name)
    assert problems == {}, problems
    # keyboard: the first Tab reaches the skip link, which moves focus to the content
    page.goto(f"{fleet.server.url}/ui/fleet")
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "main"
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.closest('main') !== null")


def test_an_experiment_page_shows_the_winner_and_its_interval_chart_and_passes_axe(
    page: Any, fleet: ConsoleFleet
) -> None:
    from axe_playwright_python.sync_playwright import Axe
    from playwright.sync_api import expect

    exp = fleet.experiment_with_a_winner("bx")
    sign_in(page, fleet.server, fleet.tokens["viewer"])
    page.goto(f"{fleet.server.url}/ui/experiments")
    page.get_by_role("link", name=exp["id"]).click()
    expect(page.locator("#experiment-winner")).to_have_text("candidate")
    expect(page.get_by_role("img", name="Effect of each arm against the control").first).to_be_visible()
    expect(page.locator("#effects")).to_contain_text("better")
    found = Axe().run(page).response["violations"]
    assert [v["id"] for v in found if v["impact"] in ("serious", "critical")] == []
    shot(page, "experiment")
