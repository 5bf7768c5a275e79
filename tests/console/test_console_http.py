"""The console over real HTTP against a real fleet server: sign-in, the cookie, CSRF, roles,
revocation, and every page rendering with real data."""

from __future__ import annotations

import re
import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from fleet_server.console.session import COOKIE
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir
from tests.server.test_https import _http_cert
from tests.server.test_rollout_flow import status

from .helpers import ConsoleFleet

CSRF = re.compile(r'name="csrf" value="([0-9a-f]+)"')


def sign_in(server: ServerThread, token: str) -> httpx.Client:
    browser = httpx.Client(base_url=server.url, timeout=10)
    r = browser.post("/ui/login", data={"token": token})
    assert r.status_code == 303 and r.headers["location"] == "/ui/rollouts", r.text
    return browser


def csrf_of(page: httpx.Response) -> str:
    found = CSRF.search(page.text)
    assert found, page.text[:500]
    return found.group(1)


def test_sign_in_sets_a_strict_httponly_expiring_cookie_and_refuses_a_wrong_token(
    server: ServerThread, tokens: dict[str, str]
) -> None:
    with httpx.Client(base_url=server.url, timeout=10) as anon:
        r = anon.get("/ui/fleet")
        assert r.status_code == 303 and r.headers["location"].startswith("/ui/login?next=%2Fui%2Ffleet")
        for token, why in (
            ("ef_not-a-token", "unknown or revoked API token"),
            ("", "enter an API token"),
            (tokens["labeler"], "may post labels only"),
        ):
            r = anon.post("/ui/login", data={"token": token})
            assert r.status_code == 401 and why in r.text and COOKIE not in r.headers.get("set-cookie", "")
        # a sign-in link may only lead into the console
        r = anon.post("/ui/login", data={"token": tokens["viewer"], "next": "https://evil.example/"})
        assert r.headers["location"] == "/ui/rollouts"
    cookie = sign_in(server, tokens["viewer"]).cookies.jar
    (c,) = [c for c in cookie if c.name == COOKIE]
    assert c.path == "/ui" and not c.secure and c.expires is not None
    assert (
        c.value is not None and tokens["viewer"] not in c.value
    )  # the cookie carries the token's hash, never the token
    r = httpx.post(f"{server.url}/ui/login", data={"token": tokens["viewer"]})
    header = r.headers["set-cookie"].lower()
    assert "httponly" in header and "samesite=strict" in header and "max-age=28800" in header
    assert "secure" not in header  # plain http here; over https it is set (test below)


def test_a_form_body_is_bounded_like_an_api_body(server: ServerThread) -> None:
    r = httpx.post(f"{server.url}/ui/login", data={"token": "x" * (2 << 20)}, timeout=10)
    assert r.status_code == 413 and r.json()["detail"]["code"] == "body_too_large"


def test_a_forged_cookie_is_sent_to_sign_in(server: ServerThread) -> None:
    with httpx.Client(base_url=server.url, timeout=10, cookies={COOKIE: "eyJ0IjoiYSJ9.x.y"}) as c:
        r = c.get("/ui/rollouts")
    assert r.status_code == 303 and "not+valid+here" in r.headers["location"]


def test_every_action_needs_the_sessions_csrf_token_and_an_operator(
    fleet: ConsoleFleet,
) -> None:
    rid, _ = fleet.rollout("cs", 2, stages=[50, 100], min_inferences=1)
    operator = sign_in(fleet.server, fleet.tokens["operator"])
    viewer = sign_in(fleet.server, fleet.tokens["viewer"])
    page = operator.get(f"/ui/rollouts/{rid}/pause")
    assert page.status_code == 200 and "Yes, pause" in page.text
    token = csrf_of(page)
    # no token, a wrong one, and another session's: 403 and the rollout is untouched
    for data in ({}, {"csrf": "0" * 64}, {"csrf": csrf_of(viewer.get("/ui/rollouts"))}):
        r = operator.post(f"/ui/rollouts/{rid}/pause", data=data)
        assert r.status_code == 403 and "CSRF check failed" in r.text
    assert status(fleet.client, rid)["state"] == "running"
    # the right token posted from another site's page is refused too, as is a sign-in from there
    r = operator.post(
        f"/ui/rollouts/{rid}/pause", data={"csrf": token}, headers={"Origin": "https://evil.example"}
    )
    assert r.status_code == 403 and "CSRF check failed" in r.text
    with httpx.Client(base_url=fleet.server.url, timeout=10) as other:
        r = other.post(
            "/ui/login", data={"token": fleet.tokens["viewer"]}, headers={"Origin": "https://evil.example"}
        )
        assert r.status_code == 403 and "ef_console" not in r.headers.get("set-cookie", "")
    # a viewer sees the rollout with its buttons disabled, and is refused the action itself
    seen = viewer.get(f"/ui/rollouts/{rid}")
    assert seen.status_code == 200 and 'disabled title="viewers cannot act"' in seen.text
    assert f'href="/ui/rollouts/{rid}/pause"' not in seen.text
    assert viewer.get(f"/ui/rollouts/{rid}/pause").status_code == 403
    r = viewer.post(f"/ui/rollouts/{rid}/pause", data={"csrf": csrf_of(seen)})
    assert r.status_code == 403 and "needs operator" in r.text
    assert status(fleet.client, rid)["state"] == "running"
    # the operator with the session's token: paused, and the audit log names them
    r = operator.post(f"/ui/rollouts/{rid}/pause", data={"csrf": token})
    assert r.status_code == 303 and r.headers["location"] == f"/ui/rollouts/{rid}"
    assert status(fleet.client, rid)["state"] == "paused"
    assert (
        '<strong class="state state-paused" id="rollout-state">paused</strong>'
        in operator.get(r.headers["location"]).text
    )
    # an action the lifecycle does not allow now says why
    r = operator.post(f"/ui/rollouts/{rid}/approve", data={"csrf": token})
    assert r.status_code == 200 or r.status_code == 303
    r = operator.post(f"/ui/rollouts/{rid}/nonsense", data={"csrf": token})
    assert r.status_code == 404
    audit = fleet.client.get("/api/v1/audit", params={"path": f"/ui/rollouts/{rid}"}).json()["items"]
    outcomes = [(e["actor"].split(":")[-1], e["status"], e["result"]) for e in audit]
    assert ("console-operator", 303, "ok") in outcomes
    assert ("console-viewer", 403, "forbidden") in outcomes
    assert ("console-operator", 403, "csrf_failed") in outcomes
    operator.close()
    viewer.close()


def test_revoking_the_token_ends_its_console_session(
    server: ServerThread, client: httpx.Client, tokens: dict[str, str]
) -> None:
    browser = sign_in(server, tokens["operator"])
    assert browser.get("/ui/fleet").status_code == 200
    (row,) = [t for t in client.get("/api/v1/tokens").json()["items"] if t["name"] == "console-operator"]
    assert client.delete(f"/api/v1/tokens/{row['id']}").status_code == 200
    r = browser.get("/ui/fleet")
    assert r.status_code == 303 and "revoked" in r.headers["location"]
    browser.close()


def test_sign_out_needs_the_csrf_token_and_clears_the_cookie(
    server: ServerThread, tokens: dict[str, str]
) -> None:
    browser = sign_in(server, tokens["viewer"])
    page = browser.get("/ui/rollouts")
    assert browser.post("/ui/logout", data={}).status_code == 403
    r = browser.post("/ui/logout", data={"csrf": csrf_of(page)})
    assert r.status_code == 303 and f'{COOKIE}=""' in r.headers["set-cookie"]
    assert browser.get("/ui/rollouts").status_code == 303
    browser.close()


def test_pages_show_the_fleet_the_rollout_and_the_gate_that_rolled_it_back(
    fleet: ConsoleFleet,
) -> None:
    rid = fleet.rolled_back_by_errors("pg")
    browser = sign_in(fleet.server, fleet.tokens["viewer"])
    page = browser.get(f"/ui/rollouts/{rid}").text
    assert 'id="gate-reason"' in page and "error_rate gate" in page
    # the gate tripped on the first device's telemetry, or on both
    assert re.search(r"error rate 0.500 over (20|40) inferences exceeds 0.1", page)
    assert re.search(
        r'<tr class="verdict-breach"><th scope="row">error_rate</th><td>50.00% of (20|40) inferences', page
    )
    assert "rolled_back</span> 2" in page
    live = browser.get(f"/ui/rollouts/{rid}/live")
    assert live.status_code == 200 and "<html" not in live.text and "error_rate gate" in live.text
    listing = browser.get("/ui/rollouts", params={"state": "rolled_back"}).text
    assert f'href="/ui/rollouts/{rid}"' in listing
    fleet_page = browser.get("/ui/fleet", params={"selector": "site=pg"}).text
    assert "pg-0" in fleet_page and "pg-1" in fleet_page
    assert browser.get("/ui/fleet", params={"selector": "site=nowhere"}).text.count("/ui/devices/") == 0
    bad = browser.get("/ui/fleet", params={"selector": "=oops"})
    assert 'id="filter-problem"' in bad.text and "selector:" in bad.text
    device = browser.get("/ui/devices/pg-0").text
    assert "Slots" in device and "det:2" in device
    models = browser.get("/ui/models").text
    assert "det:1" in models and "det:2" in models and "verified" in models
    assert "det:2" in browser.get("/ui/models/det/2").text
    slo = {"name": "det-avail", "model": "det", "objectives": [{"sli": "availability", "target": 0.99}]}
    assert fleet.client.post("/api/v1/slos", json=slo).status_code == 201
    obs = browser.get("/ui/observability", params={"model": "det:2", "window": "24h"})
    assert obs.status_code == 200 and "Latency (ms)" in obs.text
    assert "<td>det-avail</td>" in obs.text and "SLO error budget left" in obs.text
    audit = browser.get("/ui/audit", params={"path": "/api/v1/rollouts"}).text
    assert "POST /api/v1/rollouts" in audit
    browser.close()


def test_an_experiments_page_shows_its_arms_effects_with_intervals_and_decisions(
    fleet: ConsoleFleet,
) -> None:
    exp = fleet.experiment_with_a_winner("xp", guardrails=[{"metric": "latency_ms", "max_harm": 5}])
    browser = sign_in(fleet.server, fleet.tokens["viewer"])
    listing = browser.get("/ui/experiments").text
    assert f'href="/ui/experiments/{exp["id"]}"' in listing and "det:1, det:2" in listing
    page = browser.get(f"/ui/experiments/{exp['id']}").text
    assert '<strong id="experiment-winner">candidate</strong>' in page
    assert "<svg" in page and "Effect of each arm against the control" in page and "always valid" in page
    # the table beside the chart: the candidate's accuracy effect (+0.19) with its interval, proven better
    assert re.search(r"<td>candidate</td><td>accuracy</td><td class=\"num\">\+0\.19</td>", page), page
    assert "<td>better</td>" in page and "winner" in page and "created" in page
    assert browser.get("/ui/experiments/nope").status_code == 404
    browser.close()


@pytest.mark.parametrize("path", ["/ui/rollouts/nope", "/ui/devices/nope", "/ui/models/no/1"])
def test_missing_things_are_a_404_page(server: ServerThread, tokens: dict[str, str], path: str) -> None:
    browser = sign_in(server, tokens["viewer"])
    r = browser.get(path)
    assert r.status_code == 404 and 'id="error-message"' in r.text
    browser.close()


def test_over_https_the_cookie_is_secure(
    make_server: Callable[..., ServerThread], keydir: KeyDir, tmp_path: Path
) -> None:
    cert, key = _http_cert(keydir, tmp_path)
    server = make_server(tls_cert=cert, tls_key=key)
    trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    r = httpx.post(f"{server.url}/ui/login", data={"token": server.admin_token}, verify=trusted)
    assert r.status_code == 303
    assert (
        "; secure" in r.headers["set-cookie"].lower() and "samesite=strict" in r.headers["set-cookie"].lower()
    )


def test_behind_a_proxy_ending_tls_the_cookie_is_secure_too(make_server: Callable[..., ServerThread]) -> None:
    server = make_server(public_url="https://fleet.example")
    r = httpx.post(f"{server.url}/ui/login", data={"token": server.admin_token})
    assert r.status_code == 303 and "; secure" in r.headers["set-cookie"].lower()
    # the proxy passes the host without the browser's port: the origin check compares host names
    r = httpx.post(
        f"{server.url}/ui/login",
        data={"token": server.admin_token},
        headers={"Origin": "https://127.0.0.1:8443"},
    )
    assert r.status_code == 303


def test_a_compiled_bundle_links_its_signed_report_served_without_scripts(
    server: ServerThread, client: httpx.Client, keydir: KeyDir, tmp_path: Path, tokens: dict[str, str]
) -> None:
    """The compiler signs report.html into the bundle; after a push the model page links it, and it
    is served sandboxed (an uploader's HTML must not run as the console's origin)."""
    pytest.importorskip("sklearn", reason="compiling needs the compiler extra")
    from compiler import compile_model
    from compiler.examples import train_digits
    from edgefleet.client import ApiClient

    ex = train_digits(tmp_path / "ex")
    result = compile_model(
        ex.model_path,
        target="arm64-cpu",
        calib_path=ex.calib_path,
        eval_path=ex.eval_path,
        out_dir=tmp_path / "bundle",
        release_key=keydir.key("release"),
        name="digits",
        version="7",
        release=7,
        latency_repeats=0,
        mixed_precision_seconds=0,
    )
    assert "report.html" in [f.path for f in result.manifest.files]
    with ApiClient(server.url, token=server.admin_token) as api:
        api.push_bundle(result.bundle_dir)
    browser = sign_in(server, tokens["viewer"])
    page = browser.get("/ui/models/digits/7")
    assert page.status_code == 200 and 'href="/ui/models/digits/7/report"' in page.text
    report = browser.get("/ui/models/digits/7/report")
    assert report.status_code == 200 and "digits:7 for arm64-cpu" in report.text
    assert report.headers["content-security-policy"] == "sandbox"
    assert browser.get("/ui/models/digits/9/report").status_code == 404
