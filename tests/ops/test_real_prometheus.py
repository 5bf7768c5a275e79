"""A real Prometheus scrapes a running server through an incident, and a real Alertmanager gets the
server's page, firing then resolved (Debian's prometheus and prometheus-alertmanager)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from edgefleet.ports import free_port, launch, start_on_free_port
from fleet_server.runner import ServerThread
from fleet_server.tls_context import default_verify_context
from signing.keyring import KeyDir
from tests.ops.test_monitoring import DASHBOARDS, RULES
from tests.ops.test_slo_api import batch
from tests.ops.tools import tool
from tests.server.conftest import FakeDevice, make_bundle, register, upload, wait_for
from tests.support.webhook import Receiver

# short windows so the incident and its end fit in a test; the SLO is otherwise an ordinary one
SLO = {
    "name": "det-avail",
    "model": "det",
    "objectives": [{"sli": "availability", "target": 0.995}],
    "rules": [{"severity": "page", "factor": 14.4, "long": "5m", "short": "30s"}],
}


def start(cmd: Callable[[int], list[str]], log: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``cmd(port)`` on a free port until ``/-/ready`` answers; its process and base URL. When another
    process took the port first (the program says "address already in use"), on a new port."""

    def attempt() -> tuple[subprocess.Popen[bytes], str]:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with httpx.Client(timeout=1) as probe:  # one TLS context for the wait, not one per poll
            proc, out = launch(cmd(port), log, [port], ready=lambda: _answers(probe, f"{url}/-/ready"))
        out.close()  # the child holds its own copy
        return proc, url

    return start_on_free_port(attempt)


def _answers(probe: httpx.Client, url: str) -> bool:
    try:
        return probe.get(url).status_code == 200
    except httpx.HTTPError:
        return False


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


@pytest.fixture
def alertmanager(tmp_path: Path) -> Iterator[tuple[str, Receiver]]:
    binary = tool("prometheus-alertmanager")
    hook = Receiver()
    config = {
        "route": {
            "receiver": "hook",
            "group_by": ["alertname", "model", "cohort", "severity"],
            "group_wait": "1s",
            "group_interval": "1s",
            "repeat_interval": "1h",
        },
        "receivers": [{"name": "hook", "webhook_configs": [{"url": hook.url, "send_resolved": True}]}],
    }
    (tmp_path / "am.yml").write_text(yaml.safe_dump(config))

    def cmd(port: int) -> list[str]:
        return [
            binary,
            f"--config.file={tmp_path / 'am.yml'}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
        ]

    proc, url = start(cmd, tmp_path / "alertmanager.log")
    yield url, hook
    stop(proc)
    hook.close()


def prometheus_for(target: str, tmp_path: Path) -> Callable[[int], list[str]]:
    """A Prometheus scraping ``target`` every second with the shipped rules, evaluated every second."""
    rule_files = []
    for path in RULES:
        rules = yaml.safe_load(path.read_text())
        for group in rules["groups"]:
            group["interval"] = "1s"
        copy = tmp_path / path.name
        copy.write_text(yaml.safe_dump(rules))
        rule_files.append(str(copy))
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": rule_files,
        "scrape_configs": [{"job_name": "edgefleet-server", "static_configs": [{"targets": [target]}]}],
    }
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    binary = tool("prometheus")

    def cmd(port: int) -> list[str]:
        return [
            binary,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ]

    return cmd


def query(prom: str, expr: str) -> list[dict[str, Any]]:
    r = httpx.get(
        f"{prom}/api/v1/query", params={"query": expr}, timeout=5, verify=default_verify_context()
    ).json()
    assert r["status"] == "success", (expr, r)
    return list(r["data"]["result"])


def grafana_durations(expr: str) -> str:
    """An expression as Grafana sends it: its built-in duration variables replaced by durations."""
    for name, duration in (("$__rate_interval", "1m"), ("$__interval", "15s"), ("$__range", "1h")):
        expr = expr.replace(name, duration)
    return expr


def value(prom: str, expr: str) -> float | None:
    found = query(prom, expr)
    return float(found[0]["value"][1]) if found else None


def server_burn(client: httpx.Client, window: str) -> float:
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for s in family.samples:
            if s.name == "edgefleet_slo_burn_rate" and s.labels["window"] == window:
                return float(s.value)
    raise AssertionError("no burn rate on /metrics")


@pytest.mark.slow
def test_prometheus_agrees_with_the_server_and_alertmanager_sees_the_page_fire_and_resolve(
    make_server: Callable[..., ServerThread],
    alertmanager: tuple[str, Receiver],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    am_url, hook = alertmanager
    server = make_server(
        alertmanager_urls=[am_url], slo_interval=1.0, alertmanager_resend_seconds=5.0, slo_resolve_seconds=0
    )
    client = httpx.Client(base_url=server.url, timeout=10)
    v1 = upload(client, make_bundle(tmp_path, keydir.key("release"))).json()
    register(client, "prom-1")
    assert client.post("/api/v1/slos", json=SLO).status_code == 201
    proc, prom = start(
        prometheus_for(server.url.removeprefix("http://"), tmp_path), tmp_path / "prometheus.log"
    )
    try:
        # Prometheus sees the SLO's counters at zero before anything happens
        events = 'edgefleet_slo_events_total{slo="det-avail"}'
        wait_for(lambda: value(prom, events) == 0.0, timeout=30)
        dev = fake_device("prom-1")
        dev.publish("telemetry", batch("prom-1", "b1", v1["sha256"], 1000, 0))
        wait_for(lambda: value(prom, events) == 1000.0, timeout=30)
        dev.publish("telemetry", batch("prom-1", "b2", v1["sha256"], 1000, 200))  # the incident: 20% errors
        wait_for(lambda: value(prom, events) == 2000.0, timeout=30)
        # the server pages, and Alertmanager (the real one) notifies its receiver
        wait_for(
            lambda: any(a["state"] == "firing" for a in client.get("/api/v1/alerts").json()["items"]), 15
        )
        wait_for(lambda: any(b["status"] == "firing" for b in hook.bodies), timeout=30)
        fired = next(b for b in hook.bodies if b["status"] == "firing")["alerts"][0]
        assert fired["labels"] == {
            "alertname": "EdgefleetSLOBurn",
            "model": "det",
            "cohort": "all",
            "severity": "page",
        }
        # its recording rules agree with the server's own burn rate over 5 minutes: 10% errors, 20x
        # (the rule runs every second; wait for a run that saw the incident's scrape)
        wait_for(
            lambda: (value(prom, 'edgefleet:slo_burn_rate:5m{slo="det-avail"}') or 0.0) > 1.0, timeout=15
        )
        ours = server_burn(client, "5m")
        theirs = value(prom, 'edgefleet:slo_burn_rate:5m{slo="det-avail"}')
        assert ours == pytest.approx(20.0, rel=0.01) and theirs == pytest.approx(ours, rel=0.1), (
            ours,
            theirs,
        )
        # every panel's query is valid PromQL to this Prometheus, once Grafana has put in its
        # built-in durations (label variables stay literal strings, which is valid PromQL)
        for path in DASHBOARDS:
            for panel in json.loads(path.read_text())["panels"]:
                for target in panel["targets"]:
                    query(prom, grafana_durations(target["expr"]))
        # no more errors: after the 30 s short window the server resolves the page, and so does Alertmanager
        wait_for(lambda: any(b["status"] == "resolved" for b in hook.bodies), timeout=90)
        resolved = next(b for b in hook.bodies if b["status"] == "resolved")["alerts"][0]
        assert resolved["labels"]["severity"] == "page" and resolved["status"] == "resolved"
        log = client.get("/api/v1/alerts/deliveries").json()["items"]
        assert [(d["status"], d["receiver"], bool(d["delivered_at"])) for d in log] == [
            ("firing", f"alertmanager:{am_url}", True),
            ("resolved", f"alertmanager:{am_url}", True),
        ]
    finally:
        stop(proc)
        client.close()
