"""deploy/monitoring checked with the real tools, and against what /metrics really exposes."""

from __future__ import annotations

import json
import re
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

from fleet_server.runner import ServerThread
from tests.ops.test_slo_api import SLO
from tests.ops.tools import tool

MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
RULES = sorted((MONITORING / "rules").glob("*.yml"))
DASHBOARDS = sorted((MONITORING / "grafana").glob("*.json"))
NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
BUILTIN = {"ALERTS", "up"}  # series Prometheus makes itself


def run(*cmd: str) -> str:
    done = subprocess.run(cmd, cwd=MONITORING, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_promtool_checks_the_config_and_rules() -> None:
    promtool = tool("promtool")
    assert "SUCCESS" in run(promtool, "check", "config", "prometheus.yml")
    assert "SUCCESS" in run(promtool, "check", "rules", *map(str, RULES))


def test_the_rules_fire_as_the_server_does() -> None:
    assert "SUCCESS" in run(tool("promtool"), "test", "rules", "tests/slo-rules.test.yml")


def test_alertmanager_config_is_valid() -> None:
    assert "SUCCESS" in run(tool("amtool"), "check-config", "alertmanager.yml")


def exprs() -> list[tuple[str, str]]:
    """(where, PromQL) of every rule and dashboard panel."""
    out = []
    for path in RULES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                out.append((f"{path.name}:{rule.get('record') or rule.get('alert')}", rule["expr"]))
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                out.append((f"{path.name}:{panel['title']}", target["expr"]))
    return out


def referenced(expr: str) -> set[str]:
    """Series names in a PromQL expression: names not followed by '(' (functions), outside label
    matchers and strings, and not PromQL keywords."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    keywords = {
        "and",
        "or",
        "unless",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "bool",
        "offset",
    }
    names = set()
    for m in NAME.finditer(expr):
        rest = expr[m.end() :].lstrip()
        if rest.startswith("(") or m.group() in keywords or m.group()[0].isdigit():
            continue
        if m.start() > 0 and (expr[m.start() - 1].isdigit() or expr[m.start() - 1] == "."):
            continue
        names.add(m.group())
    return names


def test_every_metric_a_rule_or_dashboard_uses_is_exposed(server: ServerThread, client: httpx.Client) -> None:
    assert client.post("/api/v1/slos", json=SLO).status_code == 201
    assert server.context.slo is not None
    server.context.slo.evaluator.run(datetime.now(UTC) + timedelta(minutes=1))
    exposed = set()
    for family in text_string_to_metric_families(client.get("/metrics").text):
        exposed.add(family.name)
        exposed.update(s.name for s in family.samples)
        if family.type == "counter":
            exposed.add(family.name + "_total")
        if family.type == "histogram":
            exposed.update(family.name + s for s in ("_bucket", "_count", "_sum"))
    recorded = {
        rule["record"]
        for path in RULES
        for group in yaml.safe_load(path.read_text())["groups"]
        for rule in group["rules"]
        if "record" in rule
    }
    found = exprs()
    assert len(found) > 30
    missing = sorted(
        (where, name)
        for where, e in found
        for name in referenced(e)
        if name not in exposed | recorded | BUILTIN
    )
    assert missing == []
    assert referenced('sum by (slo) (rate(edgefleet_slo_events_total{a="b"}[5m])) > 0.5') == {
        "edgefleet_slo_events_total"
    }
