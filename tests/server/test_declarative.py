"""`edgefleet apply | diff | plan | get | describe | schema` against a real server: validation with
file, line and field; idempotent applies; the history and the audit log; who may apply."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from typer.testing import CliRunner

from edgefleet.cli import app
from edgefleet.client import ApiClient
from fleet_server import declarative
from fleet_server.experiment_schemas import ExperimentIn
from fleet_server.runner import ServerThread
from fleet_server.schemas import RolloutIn
from signing.keyring import KeyDir

from .conftest import make_bundle, register, upload

runner = CliRunner()
ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "docs" / "schema" / "fleet.schema.json"
EXAMPLE = ROOT / "examples" / "fleet.yaml"

FLEET = """\
apiVersion: edgefleet.dev/v1
kind: RolloutPolicy
metadata:
  name: canary
  labels: {team: vision}
spec:
  stages: [10, 50, 100]
  soak_seconds: 0
  max_error_rate: 0.02
  on_class_failure: skip
---
apiVersion: edgefleet.dev/v1
kind: HardwareTargets
metadata: {name: default}
spec:
  targets:
    qcs8550: qnn-htp-a16
---
apiVersion: edgefleet.dev/v1
kind: Model
metadata: {name: digits}
spec:
  source: digits.onnx
  calib: calib.npz
  gate: {min_top1_agreement: 0.9}
  targets:
    rpi4: {gate: {min_snr_db: 15}}
---
apiVersion: edgefleet.dev/v1
kind: SLO
metadata: {name: digits-availability}
spec:
  model: digits
  objectives:
    - {sli: availability, target: 0.99, window: 30d}
"""


def ef(*args: str) -> Any:
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_the_published_schema_is_the_generated_one() -> None:
    """docs/schema/fleet.schema.json is what the kinds generate: regenerate it with
    `edgefleet schema --write docs/schema/fleet.schema.json` after changing a kind."""
    assert PUBLISHED.read_text(encoding="utf-8") == declarative.schema_text()
    out = runner.invoke(app, ["schema"])
    assert out.exit_code == 0 and json.loads(out.stdout) == declarative.fleet_schema()


def test_the_example_fleet_file_validates_against_the_published_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(PUBLISHED.read_text(encoding="utf-8"))
    docs = [d for d in yaml.safe_load_all(EXAMPLE.read_text(encoding="utf-8")) if d]
    assert {d["kind"] for d in docs} == {
        "Model",
        "RolloutPolicy",
        "SLO",
        "HardwareTargets",
        "MaintenanceWindow",
        "Experiment",
    }
    for doc in docs:
        jsonschema.validate(doc, schema)  # a third party's validator agrees with ours
        declarative.parse_document(doc)
    bad = {**docs[0], "spec": {**docs[0]["spec"], "no_such_field": 1}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)


def test_a_rollout_policy_is_the_rollout_request_less_model_and_selector() -> None:
    """One policy model: every field the API's rollout request takes, but the model and the
    selector, is a RolloutPolicy field, with the same defaults."""
    spec = declarative.find_kind("RolloutPolicy")
    assert spec is not None
    assert set(spec.spec.model_fields) == set(RolloutIn.model_fields) - {"model", "selector"}
    assert "on_class_failure" in spec.spec.model_fields
    slo = declarative.find_kind("slo")
    assert slo is not None and "name" not in slo.spec.model_fields and "objectives" in slo.spec.model_fields
    exp = declarative.find_kind("exp")
    assert exp is not None and set(exp.spec.model_fields) == set(ExperimentIn.model_fields) - {"name"}
    with pytest.raises(declarative.DocumentError, match="arm names must be unique"):  # its validators too
        declarative.parse_document(
            {
                "apiVersion": declarative.API_VERSION,
                "kind": "Experiment",
                "metadata": {"name": "x"},
                "spec": {"arms": [{"name": "a", "model": "m:1", "weight": 1}] * 2},
            }
        )


def test_errors_name_the_file_the_line_and_the_field(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        FLEET.replace("  soak_seconds: 0\n", "  soak_secondz: 0\n")  # line 8: a misspelt setting
        .replace("  max_error_rate: 0.02\n", "  max_error_rate: 2\n")  # line 9: out of range
        .replace("    qcs8550: qnn-htp-a16\n", "    qcs8550: [a, b]\n")  # line 17: a list, not a target
        .replace("kind: SLO", "kind: Slo")  # line 30: no such kind
    )
    result = runner.invoke(app, ["apply", "-f", str(bad), "--server", "http://127.0.0.1:9"])
    assert result.exit_code == 1
    message = result.output
    for expected in (
        f"{bad}:8: spec.soak_secondz: unknown field",
        f"{bad}:9: spec.max_error_rate: Input should be less than or equal to 1",
        f"{bad}:17: spec.targets.qcs8550: Input should be a valid string",
        f"{bad}:30: kind: 'Slo': a kind is one of Model, RolloutPolicy, SLO, HardwareTargets,"
        " MaintenanceWindow, Experiment",
    ):
        assert expected in message, message
    assert "unreachable" not in message  # refused before anything was sent

    twice = tmp_path / "twice.yaml"
    twice.write_text("apiVersion: edgefleet.dev/v1\nkind: Model\nkind: SLO\n")
    out = runner.invoke(app, ["plan", "-f", str(twice), "--json"])
    assert out.exit_code == 1
    assert f"{twice}:3: kind: given twice in one mapping" in json.loads(out.stderr)["error"]["message"]

    broken = tmp_path / "broken.yaml"
    broken.write_text("apiVersion: edgefleet.dev/v1\nkind: Model\nmetadata: {name: x\n")
    out = runner.invoke(app, ["apply", "-f", str(broken)])
    assert out.exit_code == 1 and f"{broken}:4:1: not YAML" in out.output, out.output

    dup = tmp_path / "dup.yaml"
    dup.write_text(FLEET + "---\n" + FLEET.split("---\n")[0])
    out = runner.invoke(app, ["apply", "-f", str(dup)])
    assert out.exit_code == 1
    assert f"{dup}:40: metadata.name: RolloutPolicy/canary is also declared at {dup}:1" in out.output, (
        out.output
    )


def test_apply_is_idempotent_and_each_apply_is_kept_with_its_diff_and_audited(
    server: ServerThread, client: httpx.Client, tmp_path: Path
) -> None:
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET)
    s = ["--server", server.url]

    plan = ef("plan", "-f", str(fleet), *s)
    assert (plan["created"], plan["configured"], plan["unchanged"]) == (4, 0, 0)
    dry = ef("apply", "-f", str(fleet), "--dry-run", *s)
    assert dry["id"] == 0 and dry["dry_run"] is True
    assert client.get("/api/v1/config/documents").json()["items"] == []  # a dry run stores nothing
    assert client.get("/api/v1/slos/digits-availability").status_code == 404  # nor enacts anything

    first = ef("apply", "-f", str(fleet), *s)
    assert [(c["kind"], c["action"]) for c in first["changes"]] == [
        ("RolloutPolicy", "created"),
        ("HardwareTargets", "created"),
        ("Model", "created"),
        ("SLO", "created"),
    ]
    slo = client.get("/api/v1/slos/digits-availability").json()  # the SLO document made the SLO
    assert slo["model"] == "digits" and slo["objectives"][0]["target"] == 0.99

    again = ef("apply", "-f", str(fleet), *s)
    assert {c["action"] for c in again["changes"]} == {"unchanged"} and again["id"] == first["id"] + 1
    text = runner.invoke(app, ["apply", "-f", str(fleet), *s])
    assert text.exit_code == 0 and "rolloutpolicy/canary unchanged" in text.stdout

    fleet.write_text(FLEET.replace("stages: [10, 50, 100]", "stages: [5, 100]").replace("0.99", "0.995"))
    diff = runner.invoke(app, ["diff", "-f", str(fleet), "--exit-code", *s])
    assert diff.exit_code == 1, diff.output  # something would change
    assert (
        "--- live/RolloutPolicy/canary" in diff.stdout and "+++ declared/RolloutPolicy/canary" in diff.stdout
    )
    assert "-  - 10.0" in diff.stdout or "-  - 10" in diff.stdout, diff.stdout
    assert "+  - 5" in diff.stdout, diff.stdout
    table = runner.invoke(app, ["plan", "-f", str(fleet), *s])
    assert "~ change" in table.stdout and "Plan: 0 to create, 2 to change, 2 unchanged." in table.stdout
    changed = ef("apply", "-f", str(fleet), *s)
    assert [c["action"] for c in changed["changes"]] == ["configured", "unchanged", "unchanged", "configured"]
    assert client.get("/api/v1/slos/digits-availability").json()["objectives"][0]["target"] == 0.995

    # get / describe read it back
    listed = ef("get", *s)
    assert {(d["kind"], d["name"], d["generation"]) for d in listed} == {
        ("RolloutPolicy", "canary", 2),
        ("HardwareTargets", "default", 1),
        ("Model", "digits", 1),
        ("SLO", "digits-availability", 2),
    }
    assert [d["name"] for d in ef("get", "rolloutpolicies", *s)] == ["canary"]
    as_yaml = runner.invoke(app, ["get", "policy", "canary", "-o", "yaml", *s])
    assert yaml.safe_load(as_yaml.stdout)["spec"]["stages"] == [5, 100]
    described = ef("describe", "RolloutPolicy", "canary", *s)
    assert described["effective"]["stages"] == [5.0, 100.0] and described["effective"]["min_inferences"] == 20
    assert [h["action"] for h in described["history"]] == ["configured", "created"]
    assert (
        described["history"][0]["apply_id"] == changed["id"] and "+  - 5" in described["history"][0]["diff"]
    )
    text = runner.invoke(app, ["describe", "rp", "canary", *s])
    assert "Effective spec (with defaults):" in text.stdout and "min_inferences: 20" in text.stdout
    missing = runner.invoke(app, ["get", "model", "nope", *s])
    assert missing.exit_code == 1 and "document_not_found" in missing.output

    # every apply is kept with its documents, and audited
    with ApiClient(server.url) as conn:
        applies = conn.config_applies()
        assert [a["id"] for a in applies] == [first["id"], again["id"], again["id"] + 1, changed["id"]]
        kept = conn.config_apply(changed["id"])
        assert kept["source"] == str(fleet) and kept["documents"][0]["spec"]["stages"] == [5, 100]
        audit = [e for e in conn.audit() if e["path"] == "/api/v1/config/apply"]
    assert len(audit) == 8  # 4 applies and 4 dry runs (plan, apply --dry-run, diff, plan)
    assert any(e["detail"].startswith(f"apply {changed['id']}: 2 configured, 2 unchanged") for e in audit)


def test_operators_apply_and_viewers_read(make_server: Callable[..., ServerThread], tmp_path: Path) -> None:
    srv = make_server(auth_required=True)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET.split("---\n")[0])
    with ApiClient(srv.url, token=srv.admin_token) as admin:
        viewer = admin.create_token("dashboards", "viewer")["token"]
        operator = admin.create_token("ci", "operator")["token"]
    s = ["--server", srv.url]
    refused = runner.invoke(app, ["apply", "-f", str(fleet), "--token", viewer, *s])
    assert refused.exit_code == 1 and "forbidden" in refused.output
    assert ef("apply", "-f", str(fleet), "--token", operator, *s)["changes"][0]["action"] == "created"
    assert ef("get", "policy", "canary", "--token", viewer, *s)["generation"] == 1
    anonymous = runner.invoke(app, ["get", *s], env={"EDGEFLEET_TOKEN": ""})
    assert anonymous.exit_code == 1 and "unauthenticated" in anonymous.output


def test_the_server_refuses_what_the_schema_refuses(client: httpx.Client) -> None:
    """An API client that skips the CLI gets the same validation, naming document and field."""
    doc = {
        "apiVersion": "edgefleet.dev/v1",
        "kind": "RolloutPolicy",
        "metadata": {"name": "x"},
        "spec": {"gates": 1},
    }
    r = client.post("/api/v1/config/apply", json={"documents": [doc]})
    assert r.status_code == 422 and r.json()["detail"]["code"] == "invalid_document"
    assert "document 1: spec.gates: unknown field" in r.json()["detail"]["message"]
    slo = {
        "apiVersion": "edgefleet.dev/v1",
        "kind": "SLO",
        "metadata": {"name": "bad-window"},
        "spec": {"model": "m", "objectives": [{"sli": "availability", "target": 0.99, "window": "forever"}]},
    }
    r = client.post("/api/v1/config/apply", json={"documents": [slo], "dry_run": True})
    assert r.status_code == 422 and r.json()["detail"]["code"] == "invalid_slo"  # the dry run enacts too
    assert client.get("/api/v1/config/applies").json()["items"] == []


def test_a_directory_or_stdin_is_read_and_an_slo_keeps_its_model(
    server: ServerThread, client: httpx.Client, tmp_path: Path
) -> None:
    slo = FLEET.split("---\n")[3]
    conf = tmp_path / "conf"
    conf.mkdir()
    (conf / "slo.yaml").write_text(slo)
    (conf / "notes.txt").write_text("not: [yaml")  # not a fleet file: left alone
    assert ef("apply", "-f", str(conf), "--server", server.url)["changes"][0]["action"] == "created"
    moved = runner.invoke(
        app, ["apply", "-f", "-", "--server", server.url], input=slo.replace("model: digits", "model: other")
    )
    assert moved.exit_code == 1 and "slo_cohort_changed" in moved.output, moved.output
    kept = client.get("/api/v1/config/documents/SLO/digits-availability").json()
    assert kept["generation"] == 1 and kept["document"]["spec"]["model"] == "digits"  # nothing half-applied
    assert (
        client.get("/api/v1/config/applies").json()["items"][-1]["id"] == 1
    )  # the refused apply is not kept


def test_apply_and_history_on_postgresql(
    make_server: Callable[..., ServerThread], fresh_pg: str, tmp_path: Path
) -> None:
    srv = make_server(database_url=fresh_pg)
    assert srv.context.engine.dialect.name == "postgresql"
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(FLEET)
    s = ["--server", srv.url]
    assert {c["action"] for c in ef("apply", "-f", str(fleet), *s)["changes"]} == {"created"}
    assert {c["action"] for c in ef("apply", "-f", str(fleet), *s)["changes"]} == {"unchanged"}
    fleet.write_text(FLEET.replace("qcs8550: qnn-htp-a16", "qcs8550: qnn-htp"))
    assert [c["action"] for c in ef("apply", "-f", str(fleet), *s)["changes"]][1] == "configured"
    described = ef("describe", "HardwareTargets", "default", *s)
    assert described["generation"] == 2 and described["effective"]["targets"] == {"qcs8550": "qnn-htp"}
    assert [h["action"] for h in described["history"]] == ["configured", "created"]


WINDOWS = """\
apiVersion: edgefleet.dev/v1
kind: RolloutPolicy
metadata: {name: nightly}
spec:
  soak_seconds: 0
  maintenance_windows: [nights]
  cohorts:
    - hardware_id: qcs8550
      maintenance_windows: [weekends, nights]
---
apiVersion: edgefleet.dev/v1
kind: MaintenanceWindow
metadata: {name: nights}
spec:
  windows:
    - {days: [mon, tue, wed, thu, fri], start: "01:00", end: "05:00"}
---
apiVersion: edgefleet.dev/v1
kind: MaintenanceWindow
metadata: {name: weekends}
spec:
  windows:
    - {days: [sat, sun], start: "00:00", end: "00:00"}
"""
NIGHTS = {"days": ["mon", "tue", "wed", "thu", "fri"], "start": "01:00", "end": "05:00"}
WEEKENDS = {"days": ["sat", "sun"], "start": "00:00", "end": "00:00"}


def test_named_maintenance_windows_are_checked_on_apply_and_resolved_when_a_rollout_is_created(
    server: ServerThread, client: httpx.Client, keydir: KeyDir, tmp_path: Path
) -> None:
    s = ["--server", server.url]
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(WINDOWS.replace("[weekends, nights]", "[weekends, nightz]"))  # line 9: a typo
    typo = runner.invoke(app, ["apply", "-f", str(fleet), *s])
    assert typo.exit_code == 1
    assert (
        f"{fleet}:9: spec.cohorts.0.maintenance_windows.1: no MaintenanceWindow 'nightz' in these documents"
        " or applied to the server" in typo.output
    ), typo.output
    # an API client that skips the CLI gets the same refusal, naming the document and the field
    docs = [d for d in yaml.safe_load_all(fleet.read_text()) if d]
    r = client.post("/api/v1/config/apply", json={"documents": docs})
    assert r.status_code == 422 and r.json()["detail"]["code"] == "invalid_document"
    assert "document 1: spec.cohorts.0.maintenance_windows.1: no MaintenanceWindow 'nightz'" in r.text
    assert client.get("/api/v1/config/documents").json()["items"] == []  # nothing stored

    fleet.write_text(WINDOWS)
    assert {c["action"] for c in ef("apply", "-f", str(fleet), *s)["changes"]} == {"created"}
    # a policy applied later may name a window the server already has
    later = tmp_path / "later.yaml"
    later.write_text(WINDOWS.split("---\n")[0].replace("nightly", "late"))
    assert ef("apply", "-f", str(later), *s)["changes"][0]["action"] == "created"

    # a rollout created from the applied policy (as `edgefleet deploy --policy nightly` does) runs
    # with the windows themselves: the policy's, and the cohort's named ones
    upload(client, make_bundle(tmp_path, keydir.key("release"), version="1", content=b"w" * 64))
    register(client, "decl-win-1", site="decl-win")
    applied = client.get("/api/v1/config/documents/RolloutPolicy/nightly").json()["document"]["spec"]
    body = {**applied, "model": "det:1", "selector": {"tags": {"site": "decl-win"}}}
    r = client.post("/api/v1/rollouts", json=body)
    assert r.status_code == 201, r.text
    rollout = r.json()
    assert rollout["policy"]["windows"] == [NIGHTS] and rollout["policy"]["maintenance_windows"] == []
    cohort = rollout["policy"]["cohorts"][0]
    assert cohort["windows"] == [WEEKENDS, NIGHTS] and cohort["maintenance_windows"] == []

    # the rollout keeps its windows when the named ones change; later rollouts take the new ones
    fleet.write_text(WINDOWS.replace('start: "01:00"', 'start: "02:00"'))
    assert [c["action"] for c in ef("apply", "-f", str(fleet), *s)["changes"]][1] == "configured"
    kept = client.get(f"/api/v1/rollouts/{rollout['id']}").json()
    assert kept["policy"]["windows"] == [NIGHTS]

    # a rollout request naming a window nobody applied is refused, naming it
    r = client.post(
        "/api/v1/rollouts",
        json={"model": "det:1", "selector": {"tags": {"site": "decl-win"}}, "maintenance_windows": ["lunch"]},
    )
    assert r.status_code == 422 and r.json()["detail"]["code"] == "unknown_maintenance_window"
    assert "'lunch'" in r.json()["detail"]["message"]


EXPERIMENT = """\
apiVersion: edgefleet.dev/v1
kind: Experiment
metadata: {name: det-ab}
spec:
  selector: {tags: {site: decl-ab}}
  arms:
    - {name: control, model: "det:1", weight: 1}
    - {name: candidate, model: "det:2", weight: 1}
  min_samples: 50
  policy: {soak_seconds: 0, maintenance_windows: [nights]}
---
apiVersion: edgefleet.dev/v1
kind: MaintenanceWindow
metadata: {name: nights}
spec:
  windows:
    - {days: [mon, tue, wed, thu, fri], start: "01:00", end: "05:00"}
"""


def test_an_experiment_document_starts_one_experiment_and_is_not_edited_in_place(
    server: ServerThread, client: httpx.Client, keydir: KeyDir, tmp_path: Path
) -> None:
    s = ["--server", server.url]
    for version in ("1", "2"):
        upload(
            client,
            make_bundle(tmp_path, keydir.key("release"), version=version, content=version.encode() * 64),
        )
    for i in range(4):
        register(client, f"decl-ab-{i}", site="decl-ab")
    fleet = tmp_path / "exp.yaml"
    fleet.write_text(EXPERIMENT)

    dry = ef("apply", "-f", str(fleet), "--dry-run", *s)
    assert [c["action"] for c in dry["changes"]] == ["created", "created"]
    assert client.get("/api/v1/experiments").json()["items"] == []  # a dry run starts nothing

    assert [c["action"] for c in ef("apply", "-f", str(fleet), *s)["changes"]] == ["created", "created"]
    (exp,) = client.get("/api/v1/experiments").json()["items"]
    assert exp["name"] == "det-ab" and exp["state"] == "running" and exp["metric"] == "accuracy"
    assert sum(a["devices"] for a in exp["arms"]) == 4
    # the arms' rollouts run with the window declared in the same file (after the experiment)
    arm_rollout = client.get(f"/api/v1/rollouts/{exp['arms'][0]['rollout_id']}").json()
    assert arm_rollout["policy"]["windows"] == [NIGHTS]

    assert {c["action"] for c in ef("apply", "-f", str(fleet), *s)["changes"]} == {"unchanged"}
    assert len(client.get("/api/v1/experiments").json()["items"]) == 1  # unchanged starts nothing

    fleet.write_text(EXPERIMENT.replace("min_samples: 50", "min_samples: 80"))
    refused = runner.invoke(app, ["apply", "-f", str(fleet), *s])
    assert refused.exit_code == 1 and "experiment_running" in refused.output, refused.output
    assert f"experiment {exp['id']}" in refused.output and "not edited in place" in refused.output
    doc = client.get("/api/v1/config/documents/Experiment/det-ab").json()
    assert doc["generation"] == 1 and doc["document"]["spec"]["min_samples"] == 50  # nothing half-applied

    # once it has ended, the changed document starts a new experiment (here on other devices: the
    # stopped one's devices are on their way back to the control)
    for i in range(4):
        register(client, f"decl-ab2-{i}", site="decl-ab2")
    fleet.write_text(
        EXPERIMENT.replace("min_samples: 50", "min_samples: 80").replace("site: decl-ab}", "site: decl-ab2}")
    )
    r = client.post(f"/api/v1/experiments/{exp['id']}/stop", json={"reason": "respecified"})
    assert r.status_code == 200, r.text
    assert [c["action"] for c in ef("apply", "-f", str(fleet), *s)["changes"]] == ["configured", "unchanged"]
    running = [e for e in client.get("/api/v1/experiments").json()["items"] if e["state"] == "running"]
    assert len(running) == 1 and running[0]["id"] != exp["id"] and running[0]["name"] == "det-ab"
