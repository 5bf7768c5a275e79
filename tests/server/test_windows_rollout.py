"""Maintenance windows, deferral and metered links through the API, the directives and the status.

Real server, real Mosquitto, paho clients playing the devices (as in ``test_rollout_flow.py``).
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from device_agent import protocol
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir

from .conftest import FakeDevice, make_bundle, register, upload, wait_for
from .test_mqtt import reported
from .test_rollout_flow import directives, serve, status

SAT_NIGHT = {"days": ["sat"], "start": "22:00", "end": "04:00"}
WEEKNIGHTS = {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "01:00", "end": "05:00"}


def test_bad_window_and_link_policies_are_refused_naming_the_field(
    client: httpx.Client, keydir: KeyDir, tmp_path: Path
) -> None:
    upload(client, make_bundle(tmp_path, keydir.key("release")))
    register(client, "win-bad-0")
    base = {"model": "det:1"}
    bad: list[tuple[dict[str, Any], str]] = [
        ({"windows": [{"days": ["sat"], "start": "22:00", "end": "04:00", "tz": "UTC"}]}, "windows.0.tz"),
        ({"windows": [{"days": ["caturday"], "start": "22:00", "end": "04:00"}]}, "windows.0.days"),
        ({"windows": [{"days": ["sat"], "start": "24:00", "end": "04:00"}]}, "HH:MM"),
        ({"windows": [{"days": [], "start": "22:00", "end": "04:00"}]}, "windows.0.days"),
        ({"windows": [{"days": ["sat"], "start": "22:00"}]}, "windows.0.end"),
        ({"max_deferral_seconds": -1}, "max_deferral_seconds"),
        ({"metered": {"download": "sometimes"}}, "metered.download"),
        ({"metered": {"max_mb_per_dya": 5}}, "metered.max_mb_per_dya"),
        ({"metered": {"download": "unmetered_only", "max_mb_per_day": 5}}, "drop max_mb_per_day"),
        ({"cohorts": [{"windows": [SAT_NIGHT]}]}, "names a hardware_id or tags"),
        ({"cohorts": [{"hardware_id": "rpi4", "window": [SAT_NIGHT]}]}, "cohorts.0.window"),
        ({"max_wait_seconds": 0}, "max_wait_seconds"),
    ]
    for extra, needle in bad:
        r = client.post("/api/v1/rollouts", json={**base, **extra})
        assert r.status_code == 400, (extra, r.text)
        detail = r.json()["detail"]
        assert detail["code"] == "invalid_request" and needle in detail["message"], (extra, r.text)
    assert client.get("/api/v1/rollouts").json()["items"] == []  # nothing half-created


def test_cohort_windows_travel_signed_waiting_devices_do_not_time_out_and_bytes_are_summed(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    upload(client, make_bundle(tmp_path, keydir.key("release")))
    register(client, "win-day", site="win")
    register(client, "win-night", site="win", ring="night")
    devs = {i: fake_device(i) for i in ("win-day", "win-night")}
    for dev in devs.values():
        dev.subscribe_desired()
    r = client.post(
        "/api/v1/rollouts",
        json={
            "model": "det:1",
            "selector": {"tags": {"site": "win"}},
            "windows": [WEEKNIGHTS],
            "max_deferral_seconds": 900,
            "cohorts": [
                {"tags": {"ring": "night"}, "windows": [SAT_NIGHT], "metered": {"download": "unmetered_only"}}
            ],
            "metered": {"max_mb_per_day": 2.5},
            "device_timeout_seconds": 1.0,
            "min_inferences": 1,
        },
    )
    assert r.status_code == 201, r.text
    rid = r.json()["id"]
    assert r.json()["policy"]["windows"] == [WEEKNIGHTS]
    got: dict[str, protocol.Directive] = {}
    for i, dev in devs.items():
        got[i] = wait_for(lambda dev=dev: directives(dev, keydir), timeout=10)[-1]  # type: ignore[misc]
    day, night = got["win-day"], got["win-night"]
    assert day.activation is not None and night.activation is not None
    assert [w.model_dump() for w in day.activation.windows] == [WEEKNIGHTS]
    assert [w.model_dump() for w in night.activation.windows] == [SAT_NIGHT]
    assert day.activation.max_deferral_seconds == night.activation.max_deferral_seconds == 900
    assert day.metered == protocol.MeteredRule(download="any", max_bytes_per_day=2_500_000)
    assert night.metered == protocol.MeteredRule(download="unmetered_only")

    # Each device reports why it waits, as an agent does: the day one staged its download.
    model = day.model
    assert model is not None
    DS = protocol.DeploymentState
    for dev, d, state, reason in (
        (devs["win-day"], day, DS.STAGED, "maintenance_window"),
        (devs["win-night"], night, DS.IDLE, "metered_link"),
    ):
        fetched = model.length if state == DS.STAGED else None
        event = protocol.Event(
            device_id=dev.device_id, seq=d.seq, state=state, reason=None, bytes_fetched=fetched
        )
        dev.publish("events", protocol.encode(event))
        waits = protocol.Waiting(seq=d.seq, reason=reason, detail="waits", until=None)
        dev.publish(
            "reported",
            reported(dev.device_id, deployment_seq=d.seq, deployment_state=state, waiting=waits),
            retain=True,
        )
    seen = wait_for(lambda: (s := status(client, rid))["stages"][0]["state"] == "waiting" and s, timeout=10)
    assert seen["devices"] == {"win-day": "waiting", "win-night": "waiting"}
    assert seen["waiting"] == {"maintenance_window": 1, "metered_link": 1}
    assert seen["stages"][0]["waiting"] == 2
    time.sleep(2.0)  # twice the device timeout: waiting is not late
    later = status(client, rid)
    assert later["devices"] == {"win-day": "waiting", "win-night": "waiting"} and later["state"] == "running"
    assert later["delivery"] == {
        "bytes_fetched": model.length,
        "installs": 1,
        "bytes_per_install": model.length,
    }

    # The window opens on the day device: it swaps in and proves the model; the other still waits.
    serve(devs["win-day"], day, inferences=3, ts=datetime.now(UTC))
    final = wait_for(lambda: (s := status(client, rid))["devices"]["win-day"] == "done" and s, timeout=10)
    assert final["devices"]["win-night"] == "waiting" and final["state"] == "running"
    assert final["waiting"] == {"metered_link": 1}
    # The operator's view: bytes per install and who waits for what.
    exe = str(Path(sys.executable).parent / "edgefleet")
    out = subprocess.run(
        [exe, "rollouts", "status", rid, "--server", server.url], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    text = " ".join(out.stdout.split())
    assert "waiting" in text and "waiting: 1 metered_link" in text
    assert "fetched " in text and " in 1 installs (" in text, text
