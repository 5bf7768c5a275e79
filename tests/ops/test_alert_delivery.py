"""Alerts from real telemetry delivered to a real webhook over HTTP, with retries and a delivery log."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from fleet_server.runner import ServerThread
from signing.keyring import KeyDir
from tests.ops.test_slo_api import SLO, batch
from tests.server.conftest import FakeDevice, make_bundle, register, upload, wait_for
from tests.support.webhook import Receiver


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver(script=[503, 503])
    yield r
    r.close()


def test_a_burn_fires_and_resolves_through_a_flaky_webhook_with_a_delivery_log(
    make_server: Callable[..., ServerThread],
    receiver: Receiver,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    server = make_server(alert_webhook_urls=[receiver.url], slo_interval=3600, slo_resolve_seconds=0)
    assert server.context.slo is not None
    evaluator = server.context.slo.evaluator
    with httpx.Client(base_url=server.url, timeout=10) as client:
        v1 = upload(client, make_bundle(tmp_path, keydir.key("release"))).json()
        register(client, "hook-1")
        assert client.post("/api/v1/slos", json=SLO).status_code == 201
        t0 = datetime.now(UTC) + timedelta(minutes=1)
        evaluator.run(t0)
        fake_device("hook-1").publish("telemetry", batch("hook-1", "b1", v1["sha256"], 1000, 100))
        wait_for(lambda: client.get("/api/v1/stats").json()["telemetry_batches"] >= 1)
        evaluator.run(t0 + timedelta(minutes=1))
        # two 503s, then accepted: the sender backs off 2 s, then 4 s
        wait_for(lambda: len(receiver.accepted) == 2, timeout=20)
        firing = sorted((b["status"], b["alert"]["id"]) for b in receiver.accepted)
        assert firing == [("firing", "det/*/page"), ("firing", "det/*/ticket")]
        # the sender records a pass's attempts when the pass ends, after the receiver has answered
        log = wait_for(
            lambda: (
                len(items := client.get("/api/v1/alerts/deliveries").json()["items"]) == 2
                and all(d["delivered_at"] for d in items)
                and items
            ),
            what="both deliveries recorded as delivered",
        )
        assert sorted(d["attempts"] for d in log) == [1, 3] or sorted(d["attempts"] for d in log) == [2, 2]
        assert receiver.refused == 2
        # no more errors: the pages' short windows (5 and 30 min) empty out and the page resolves;
        # the ticket's 6 h window still holds the burst, so it stays open (and is not sent again)
        evaluator.run(t0 + timedelta(minutes=40))
        wait_for(lambda: len(receiver.accepted) == 3, timeout=10)
        assert (receiver.accepted[2]["status"], receiver.accepted[2]["alert"]["id"]) == (
            "resolved",
            "det/*/page",
        )
        alerts = client.get("/api/v1/alerts").json()["items"]
        assert [(a["id"], a["state"]) for a in alerts] == [
            ("det/*/page", "resolved"),
            ("det/*/ticket", "firing"),
        ]
