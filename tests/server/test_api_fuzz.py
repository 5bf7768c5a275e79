"""schemathesis against the real server: every documented operation, every check, 0 failures.

The fuzzer reads ``/openapi.json`` from a running ``ServerThread`` (real HTTP, auth on, the
bootstrap admin token) and runs its coverage, fuzzing and stateful phases with a fixed seed
and a bounded number of examples per operation, so a run is repeatable and its wall time
bounded. Every check is on (``not_a_server_error``, ``response_schema_conformance``,
``status_code_conformance``, ``ignored_auth``, ``unsupported_method``, ...), with one
exception, scoped to the operations it cannot hold for (``POSITIVE_ACCEPTANCE_EXEMPT``).

The server holds a released model, registered devices and a running rollout first, and
the fuzzer is told their ids, so it reaches the code behind a found resource (Range
serving, rollout actions, TUF files) and not only the 404 in front of it.

A list's ``cursor`` is valid only if the server made it, and a device ``selector`` has a
grammar (key=value pairs, PEP 440 specifiers) beyond what JSON Schema states: the fuzzer
sends a valid one of each (every other parameter of those operations stays generated, and
the positive-acceptance check stays on). A malformed cursor or selector is a 400 by design,
tested in ``tests/server/test_paging.py``.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest

from edgefleet.client import ApiClient
from edgefleet.provision import fleet_ca
from fleet_server.paging import encode_cursor
from fleet_server.runner import ServerThread
from signing.keyring import KeyDir

from .conftest import make_bundle

pytestmark = pytest.mark.slow

SEED = 20260101
MAX_EXAMPLES = 20  # per operation and phase: ~1,000 requests, well under a minute on 2 busy cores

# ``positive_data_acceptance`` says: a request the schema allows must not be refused with 400.
# These operations take input whose validity no JSON Schema can state, so a schema-valid
# request is refused on purpose:
POSITIVE_ACCEPTANCE_EXEMPT = {
    # the parts must carry a signature by a trusted release key over the uploaded bytes
    ("POST", "/api/v1/models"): "a bundle must be signed by a trusted release key",
    ("POST", "/api/v1/tuf/targets"): "targets metadata must be signed by the root's release role",
    # stages are cumulative (strictly increasing; percents end at or below 100): a rule across
    # array items and fields that JSON Schema cannot express
    ("POST", "/api/v1/rollouts"): "stages must increase strictly, percents end at or below 100",
    # an objective's fields depend on its sli (latency needs a threshold and takes no target,
    # availability the reverse), windows are durations like 28d, one objective per sli
    ("POST", "/api/v1/slos"): "an objective's required fields depend on its sli; windows are durations",
    # arm names must be unique: a rule across array items
    ("POST", "/api/v1/experiments"): "arm names must be unique",
    # promote ends the whole experiment, so it takes no arm: a rule across fields
    ("POST", "/api/v1/experiments/{experiment_id}/stop"): "promote takes no arm",
    # the body must be signed by a device's fleet-CA key (headers the fuzzer cannot make)
    ("PUT", "/api/v1/captures/{device_id}/{batch_id}"): "an upload must be signed by a provisioned device",
    # each document is validated against its kind's schema (docs/schema/fleet.schema.json): the
    # request schema takes any objects, the kinds are chosen by a discriminator inside them
    ("POST", "/api/v1/config/apply"): "each document must match its kind's schema",
}


# ``negative_data_rejection`` says: a request the schema forbids must be refused. A label batch is
# judged item by item on purpose (an invalid label is reported and the valid rest is kept), so an
# item that breaks the documented item schema is a 200 with that item marked invalid.
NEGATIVE_REJECTION_EXEMPT = {
    ("POST", "/api/v1/labels"): "each label is judged on its own: an invalid item is reported, not refused",
}


# A Range the schema allows (any string) may still not be satisfiable for this file, or not
# parse as one ``bytes=a-b``: 416 is the documented answer, so it is an accepted outcome.
RANGE_OPERATION = ("GET", "/api/v1/artifacts/{sha256}")

SELECTOR = "hw=rpi4,site=lab"


def _cursors() -> dict[str, str]:
    """A valid cursor of each list (a position in its key order), by the list's operation."""
    at = datetime(2026, 1, 1, tzinfo=UTC)
    group = ("0" * 64, "rpi4", -1)  # telemetry: (sha256, hardware id, stage or -1)
    return {
        "GET /api/v1/devices": encode_cursor("devices", ("fz-1",)),
        "GET /api/v1/models": encode_cursor("models", ("det", 1)),
        "GET /api/v1/rollouts": encode_cursor("rollouts", (at, "0" * 12)),
        "GET /api/v1/experiments": encode_cursor("experiments", (at, "0" * 12)),
        "GET /api/v1/tokens": encode_cursor("tokens", (at, "0" * 12)),
        "GET /api/v1/audit": encode_cursor("audit", (1,)),
        "GET /api/v1/telemetry": encode_cursor("telemetry", group),
        "GET /api/v1/rollouts/{rollout_id}/devices": encode_cursor("rollout-devices", ("fz-1",)),
        "GET /api/v1/rollouts/{rollout_id}/decisions": encode_cursor("rollout-decisions", (1,)),
        "GET /api/v1/rollouts/{rollout_id}/telemetry": encode_cursor("rollout-telemetry", group),
        "GET /api/v1/drift": encode_cursor("drift", ("fz-1",)),
        "GET /api/v1/slos": encode_cursor("slos", (at, "fz")),
        "GET /api/v1/alerts": encode_cursor("alerts", ("fz/*/page",)),
        "GET /api/v1/alerts/deliveries": encode_cursor("deliveries", (1,)),
        "GET /api/v1/planned-windows": encode_cursor("windows", (1,)),
        "GET /api/v1/captures": encode_cursor("captures", ("0193a5f0-7c1e-7a3b-9c2d-4e5f60718293",)),
        "GET /api/v1/config/documents": encode_cursor("config", ("Model", "fz")),
        "GET /api/v1/config/applies": encode_cursor("applies", (1,)),
    }


def _operation(name: str, *settings: str, why: str | None = None) -> list[str]:
    """A block of settings for one operation, named "METHOD path" (an operation's include-method
    and include-path would each select on their own: every GET, every operation on the path)."""
    return ["", "[[operations]]", *([f"# {why}"] if why else []), f'include-name = "{name}"', *settings]


def _config(known: dict[str, str], tuf_files: dict[str, str]) -> str:
    """The run's configuration: every check, the exemptions above, the ids of resources that
    exist, used for half of the path parameters (the other half stays generated), and a valid
    cursor and selector for the lists."""
    lines = ["[checks]", "enabled = true  # every check, stated rather than left to the tool's default", ""]
    values = {**known, **{f"tuf_{k}": v for k, v in tuf_files.items()}}
    for name, value in values.items():
        lines += [f"[dictionaries.{name}]", f'values = ["{value}"]', ""]
    lines += ["[parameters]"]
    lines += [f'"path.{name}" = {{ dictionary = "{name}", probability = 0.5 }}' for name in known]
    for (method, path), why in POSITIVE_ACCEPTANCE_EXEMPT.items():
        lines += _operation(f"{method} {path}", "checks.positive_data_acceptance.enabled = false", why=why)
    for (method, path), why in NEGATIVE_REJECTION_EXEMPT.items():
        lines += _operation(f"{method} {path}", "checks.negative_data_rejection.enabled = false", why=why)
    method, path = RANGE_OPERATION
    statuses = 'checks.positive_data_acceptance.expected-statuses = ["2xx", "404", "416"]'
    lines += _operation(f"{method} {path}", statuses)
    # /tuf/metadata/{name} shares its parameter name with /models/{name}/{version}
    for path, param, key in (
        ("/tuf/metadata/{name}", "name", "tuf_metadata"),
        ("/tuf/targets/{target}", "target", "tuf_target"),
    ):
        binding = f'"path.{param}" = {{ dictionary = "{key}", probability = 0.5 }}'
        lines += _operation(f"GET {path}", f"parameters = {{ {binding} }}")
    for name, cursor in _cursors().items():
        fixed = [f'"query.cursor" = "{cursor}"']
        if name == "GET /api/v1/devices":
            fixed.append(f'"query.selector" = "{SELECTOR}"')
        lines += _operation(name, f"parameters = {{ {', '.join(fixed)} }}")
    return "\n".join(lines) + "\n"


def _seed(srv: ServerThread, keydir: KeyDir, tmp_path: Path) -> dict[str, str]:
    """A released model, two devices and a rollout of it; return the ids the fuzzer should use."""
    release = keydir.key("release")
    fleet_ca(keydir)  # provisioned devices' CA: capture uploads are checked against it
    with ApiClient(srv.url, token=srv.admin_token) as api:
        model = api.push_bundle(make_bundle(tmp_path / "bundles", release), release_keys=[release])
        for device in ("fz-1", "fz-2"):
            api.register_device(device, "rpi4")
        rollout = api.create_rollout(model="det:1", stages=[50, 100])
    return {
        "sha256": str(model["sha256"]),
        "name": str(model["name"]),
        "version": str(model["version"]),
        "rollout_id": str(rollout["id"]),
        "device_id": "fz-1",
    }


def test_schemathesis_finds_nothing(
    make_server: Callable[..., ServerThread], keydir: KeyDir, tmp_path: Path
) -> None:
    srv = make_server(auth_required=True)
    config = tmp_path / "schemathesis.toml"
    known = _seed(srv, keydir, tmp_path)
    assert srv.context.tuf is not None
    targets_dir = srv.context.tuf.repo.targets_dir
    target = next(p for p in targets_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    tuf_files = {"metadata": "timestamp.json", "target": target.relative_to(targets_dir).as_posix()}
    config.write_text(_config(known, tuf_files))
    command = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--no-color",
        "--config-file",
        str(config),
        "run",
        f"{srv.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {srv.admin_token}",
        "--seed",
        str(SEED),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--workers",
        "1",
        "--generation-database",
        "none",
        "--request-timeout",
        "20",
    ]
    started = time.monotonic()
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=240, check=False)
    elapsed = time.monotonic() - started
    report = run.stdout[-30000:] + run.stderr[-5000:]
    assert run.returncode == 0, report
    methods = {"get", "put", "post", "delete", "patch", "options", "head"}
    spec = httpx.get(f"{srv.url}/openapi.json", timeout=10).json()
    operations = sum(1 for item in spec["paths"].values() for method in item if method in methods)
    assert f"Tested: {operations}" in report, report  # every documented operation was exercised
    print(f"schemathesis: {elapsed:.1f} s\n{run.stdout[-1500:]}")
