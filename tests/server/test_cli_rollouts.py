"""`edgefleet rollouts` against a real server: the new create options, approve and rollback."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from typer.testing import CliRunner

from edgefleet.cli import app
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir

from .conftest import FakeDevice, wait_for
from .test_rollout_flow import directives, serve, status
from .test_rollout_ops import fleet_on_old_model

runner = CliRunner()


def ef(server: ServerThread, *args: str) -> dict[str, Any]:
    result = runner.invoke(app, [*args, "--server", server.url, "--json"])
    assert result.exit_code == 0, result.output
    return dict(json.loads(result.stdout))


def test_create_with_policy_approve_and_rollback(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    _, _, devs = fleet_on_old_model(client, keydir, tmp_path, fake_device, "cl", 2)
    created = ef(
        server,
        "rollouts", "create", "--model", "det:2", "--selector", "site=cl,agent=>=0.1",
        "--stage-counts", "1,2", "--soak", "0", "--min-inferences", "1", "--require-approval",
        "--retry", "timed_out=1", "--retry", "download_failed=2", "--max-latency-ratio", "1.5",
        "--drift-action", "roll_back", "--probation", "5", "--probation-min-inferences", "2",
        "--rate", "10", "--rate-factor", "2", "--delivery-action", "roll_back", "--delivery-retries", "1",
    )  # fmt: skip
    rid = str(created["id"])
    assert created["stage_unit"] == "count" and created["selector"]["agent_version"] == ">=0.1"
    policy = created["policy"]
    assert isinstance(policy, dict)
    assert policy["retry_limits"] == {"timed_out": 1, "download_failed": 2}
    assert (policy["delivery_action"], policy["delivery_retries"]) == ("roll_back", 1)
    assert (policy["require_approval"], policy["max_latency_ratio"], policy["rate_per_minute"]) == (
        True,
        1.5,
        10,
    )
    (first,) = wait_for(lambda: [d for d in devs.values() if directives(d, keydir)])
    probation = directives(first, keydir)[0].probation
    assert probation is not None and (probation.seconds, probation.min_inferences) == (5, 2)
    assert (policy["probation"]["seconds"], policy["probation"]["min_inferences"]) == (5, 2)
    serve(first, directives(first, keydir)[-1], inferences=2)
    wait_for(lambda: status(client, rid)["state"] == "awaiting_approval")
    assert ef(server, "rollouts", "approve", rid)["state"] == "running"
    (second,) = [d for d in devs.values() if d is not first]
    serve(second, wait_for(lambda: directives(second, keydir))[-1], inferences=2)
    wait_for(lambda: status(client, rid)["state"] == "completed")
    assert ef(server, "rollouts", "rollback", rid)["rollback_requested"] is True
    wait_for(lambda: status(client, rid)["state"] == "rolled_back")
    # approving a finished rollout is refused with a reason and exit code 1
    result = runner.invoke(app, ["rollouts", "approve", rid, "--server", server.url])
    assert result.exit_code == 1 and "rollout_finished" in result.output


def test_bad_cli_options_are_usage_errors() -> None:
    for args in (
        ["--stage-counts", "5,2"],
        ["--stage-counts", "a,b"],
        ["--retry", "timed_out=x"],
        ["--probation-min-inferences", "5"],  # a probation limit without the probation itself
    ):
        result = runner.invoke(app, ["rollouts", "create", "--model", "m:1", *args])
        assert result.exit_code == 2, (args, result.output)


def test_create_with_the_accuracy_gate(
    server: ServerThread,
    client: httpx.Client,
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    fleet_on_old_model(client, keydir, tmp_path, fake_device, "acc", 1)
    created = ef(
        server,
        "rollouts", "create", "--model", "det:2", "--selector", "site=acc", "--max-accuracy-drop", "0.02",
        "--accuracy-alpha", "0.01", "--min-labels", "200", "--max-label-wait", "900",
        "--accuracy-action", "pause",
    )  # fmt: skip
    policy = created["policy"]
    assert isinstance(policy, dict)
    assert (
        policy["max_accuracy_drop"],
        policy["accuracy_alpha"],
        policy["min_labels"],
        policy["max_label_wait_seconds"],
        policy["accuracy_action"],
    ) == (0.02, 0.01, 200, 900, "pause")
    assert ef(server, "rollouts", "abort", str(created["id"]))["state"] == "aborted"
