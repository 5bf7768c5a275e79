"""`edgefleet slo` against a real server: create, list, status, alerts, windows and overrides."""

from __future__ import annotations

import json
from typing import Any

from typer.testing import CliRunner

from edgefleet.cli import app
from fleet_server.runner import ServerThread

runner = CliRunner()


def ef(server: ServerThread, *args: str, code: int = 0, as_json: bool = True) -> Any:
    result = runner.invoke(app, [*args, "--server", server.url, *(["--json"] if as_json else [])])
    assert result.exit_code == code, result.output
    if not as_json:
        return result.stdout
    return json.loads(result.stdout if code == 0 else result.stderr)


def test_slo_create_list_status_and_the_errors(server: ServerThread) -> None:
    out = ef(
        server,
        "slo",
        "create",
        "det-edge",
        "--model",
        "det",
        "--hardware-id",
        "rpi4",
        "--availability",
        "99.5%",
        "--latency-p99",
        "50ms",
        "--fast-page",
    )
    assert [o["sli"] for o in out["objectives"]] == ["availability", "latency_p99"]
    assert out["objectives"][0]["target"] == 0.995 and out["objectives"][1]["threshold"] == 50.0
    assert [r["long"] for r in out["rules"]] == ["5m", "1h", "6h", "3d"]
    assert [s["name"] for s in ef(server, "slo", "list")] == ["det-edge"]
    assert ef(server, "slo", "list", "--model", "other") == []
    status = ef(server, "slo", "status", "det-edge")
    assert status["budget_spent"] is False and len(status["objectives"]) == 2
    assert [s["name"] for s in ef(server, "slo", "status")] == ["det-edge"]
    table = ef(server, "slo", "status", as_json=False)
    assert "availability" in table and "latency_p99" in table
    # refusals: one JSON error on stderr with the server's code, or a usage error
    assert (
        ef(server, "slo", "create", "det-edge", "--model", "det", "--availability", "0.9", code=1)["error"][
            "code"
        ]
        == "slo_exists"
    )
    bad = ef(server, "slo", "create", "x", "--model", "det", "--availability", "1.2", code=1)
    assert bad["error"]["code"] == "invalid_slo" and "between 0 and 1" in bad["error"]["message"]
    assert ef(server, "slo", "create", "y", "--model", "det", code=2)["error"]["code"] == "usage_error"
    assert ef(server, "slo", "create", "y", "--model", "det", "--availability", "lots", code=2)
    workbook = ef(
        server, "slo", "create", "det-wb", "--model", "det", "--availability", "99%", "--no-fast-page"
    )
    assert [r["long"] for r in workbook["rules"]] == ["1h", "6h", "3d"]


def test_slo_window_override_and_alerts(server: ServerThread) -> None:
    window = ef(server, "slo", "window", "det", "--minutes", "30", "--reason", "det:8 rollout")
    assert window["model"] == "det" and window["reason"] == "det:8 rollout"
    assert (
        ef(server, "slo", "override", "nope", "--reason", "INC-1", code=1)["error"]["code"]
        == "model_not_found"
    )
    assert ef(server, "slo", "alerts") == []
    assert ef(server, "slo", "alerts", "--deliveries") == []
