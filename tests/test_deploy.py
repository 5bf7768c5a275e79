"""deploy/ comes up: the files are valid for their tools, hardened, and their commands really run.

- systemd units: `systemd-analyze security --offline=yes` exposure below 5, no unknown directive
  (`systemd-analyze verify`), and each ExecStart run outside systemd with the unit's own environment
  file and config shape until it serves, then stopped the way systemd stops it.
- compose: `docker compose config` validates; healthchecks, restart policies, start order on health,
  no plaintext MQTT port, host paths absolute, and the broker files it mounts are the ones
  `edgefleet broker config` writes.
- Dockerfile and .dockerignore agree; Kubernetes manifests pass `kubernetes-validate --strict`.

No container engine serves images here (docs/deploy.md says why), so the image itself is not built.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from edgefleet.broker import (
    SecureBrokerInfo,
    device_mqtt_keys,
    mosquitto_binary,
    start_secure_broker,
)
from edgefleet.ports import free_port, launch, start_on_free_port
from signing.keyring import init_keys
from tests.support.debian import apt_install
from tests.support.deploy_files import DEPLOY, env_file, mqtt_session_settings
from tests.support.waiting import exited_output, wait_for

ROOT = Path(__file__).resolve().parent.parent

UNITS = ["edgefleet-server.service", "edgefleet-agent.service"]
INSTALL_BIN = "/opt/edgefleet/bin/"  # where docs/deploy.md installs the venv
VENV_BIN = str(Path(sys.executable).parent) + "/"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed (Debian: systemd)"
)
needs_mosquitto = pytest.mark.skipif(mosquitto_binary() is None, reason="mosquitto is not installed")


def unit_settings(name: str) -> dict[str, list[str]]:
    """Every ``Key=value`` of a unit file, in order (keys may repeat)."""
    out: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key.strip(), []).append(value.strip())
    return out


# -- systemd --------------------------------------------------------------------------


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_exposure_is_below_5(unit: str) -> None:
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", str(DEPLOY / unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    found = re.search(r"Overall exposure level for \S+: ([0-9.]+)", result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    assert float(found.group(1)) < 5.0, result.stdout


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS)
def test_unit_has_no_unknown_or_bad_directive(unit: str, tmp_path: Path) -> None:
    """`verify` names a misspelt key or a bad value; the install prefix is pointed at this venv."""
    copy = tmp_path / unit
    copy.write_text((DEPLOY / unit).read_text().replace(INSTALL_BIN, VENV_BIN))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0 and not (result.stdout + result.stderr).strip(), result.stderr


def exec_start(unit: str, **replace: str) -> list[str]:
    """The unit's ExecStart as argv, on this venv, with ``replace`` applied to single arguments."""
    (line,) = unit_settings(unit)["ExecStart"]
    argv = [
        a.replace(INSTALL_BIN, VENV_BIN, 1) if a.startswith(INSTALL_BIN) else a for a in shlex.split(line)
    ]
    return [replace.get(a, a) for a in argv]


def stop_like_systemd(proc: subprocess.Popen[bytes], unit: str) -> bool:
    """KillSignal (default SIGTERM), wait up to TimeoutStopSec (default 90 s); True for a clean exit.

    Clean as systemd counts it for Type=simple: exit code 0, or death by SIGHUP, SIGINT, SIGTERM or
    SIGPIPE (uvicorn re-raises the SIGTERM it handled once it has shut down).
    """
    settings = unit_settings(unit)
    sig = getattr(signal, settings.get("KillSignal", ["SIGTERM"])[0])
    timeout = float(settings.get("TimeoutStopSec", ["90"])[0])
    proc.send_signal(sig)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{unit}: still running {timeout:g}s after {sig.name} (systemd would SIGKILL it)")
    return code == 0 or -code in (signal.SIGHUP, signal.SIGINT, signal.SIGTERM, signal.SIGPIPE)


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[SecureBrokerInfo]:
    """The production broker configuration (TLS, per-device certificates, ACLs), as deployed."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed")
    b = start_secure_broker(tmp_path / "mosquitto")
    assert isinstance(b.info, SecureBrokerInfo)
    yield b.info
    b.stop()


@pytest.mark.slow
@pytest.mark.postgres
@needs_mosquitto
def test_server_unit_command_serves_with_its_environment_file(
    tmp_path: Path, broker: SecureBrokerInfo, pg_url: str
) -> None:
    """ExecStart with deploy/server.env.example's variables (paths, database and broker made real)."""
    init_keys(tmp_path / "keys")
    log = tmp_path / "server.log"

    def serve() -> tuple[subprocess.Popen[bytes], int]:
        # the unit takes its port on the command line: a port another process took first costs a
        # start on a new one (the server says "address already in use" and exits)
        port = free_port()
        argv = exec_start("edgefleet-server.service", **{"8080": str(port), "0.0.0.0": "127.0.0.1"})
        assert argv[:2] == [VENV_BIN + "edgefleet", "server"]
        env = env_file(
            DEPLOY / "server.env.example",
            EDGEFLEET_DATABASE_URL=pg_url,
            EDGEFLEET_DATA_DIR=str(tmp_path / "data"),
            EDGEFLEET_KEYS_DIR=str(tmp_path / "keys"),
            EDGEFLEET_MQTT_CREDENTIALS=str(broker.server_credentials),
            EDGEFLEET_PUBLIC_URL=f"http://127.0.0.1:{port}",
        )
        env["PATH"] = "/usr/bin:/bin"  # systemd's clean environment, not this shell's
        with httpx.Client(timeout=2) as probe:  # one TLS context for the wait, not one per poll
            proc, out = launch(
                argv,
                log,
                [port],
                ready=lambda: probe.get(f"http://127.0.0.1:{port}/healthz").status_code == 200,
                timeout=90,
                env=env,
                what="edgefleet server",
            )
        out.close()  # the child holds its own copy
        return proc, port

    proc, port = start_on_free_port(serve)
    try:
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=5).status_code == 200
    finally:
        if proc.poll() is None:
            clean = stop_like_systemd(proc, "edgefleet-server.service")
            assert clean, (proc.returncode, log.read_text(errors="replace")[-4000:])
    assert (tmp_path / "data").is_dir()


def agent_config(tmp_path: Path, broker: SecureBrokerInfo) -> Path:
    """deploy/agent.example.toml with this machine's paths, broker and the device's certificate
    (every other line as shipped)."""
    credentials = device_mqtt_keys(broker, "deploy-test-0001")
    values = {
        "device_id": '"deploy-test-0001"',
        "data_dir": f'"{tmp_path / "data"}"',
        "trust_path": f'"{tmp_path / "keys" / "trust.json"}"',
        "tuf_root_path": f'"{tmp_path / "keys" / "root.json"}"',
        "mqtt_host": f'"{broker.host}"',
        "mqtt_port": str(broker.port),
        "mqtt_ca_file": f'"{credentials["mqtt_ca_file"]}"',
        "mqtt_cert_file": f'"{credentials["mqtt_cert_file"]}"',
        "mqtt_key_file": f'"{credentials["mqtt_key_file"]}"',
        "api_listen": f'"unix:{tmp_path / "run" / "agent.sock"}"',
    }
    text = (DEPLOY / "agent.example.toml").read_text()
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key}\s*=\s*[^#\n]*", f"{key} = {value}  ", text)
        assert n == 1, f"agent.example.toml has no single {key} line"
    path = tmp_path / "agent.toml"
    path.write_text(text)
    return path


@pytest.mark.slow
@needs_mosquitto
def test_agent_unit_command_serves_its_local_api_and_stops_on_sigterm(
    tmp_path: Path, broker: SecureBrokerInfo
) -> None:
    """`python -m device_agent --config ...` as the unit runs it: API socket up, exit 0 on SIGTERM."""
    init_keys(tmp_path / "keys")
    (tmp_path / "run").mkdir()  # RuntimeDirectory=edgefleet makes /run/edgefleet for the unit
    config = agent_config(tmp_path, broker)
    argv = exec_start("edgefleet-agent.service", **{"/etc/edgefleet/agent.toml": str(config)})
    assert argv[:3] == [VENV_BIN + "python", "-m", "device_agent"]
    env = {"PATH": "/usr/bin:/bin"}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    sock = tmp_path / "run" / "agent.sock"
    try:
        transport = httpx.HTTPTransport(uds=str(sock))

        def healthy() -> bool:
            with httpx.Client(transport=transport, base_url="http://agent") as client:
                return client.get("/healthz", timeout=2).status_code == 200

        assert wait_for(
            healthy,
            90,
            "the local API's /healthz",
            interval=0.3,
            proc=proc,
            ignore=(OSError, httpx.HTTPError),
            output=lambda: exited_output(proc),
        )
        assert oct(sock.stat().st_mode & 0o777) == "0o660"  # group members of edgefleet may connect
    finally:
        if proc.poll() is None:
            clean = stop_like_systemd(proc, "edgefleet-agent.service")
            out = proc.stdout.read().decode(errors="replace")[-4000:] if proc.stdout else ""
            assert clean and proc.returncode == 0, (proc.returncode, out)  # the agent exits 0 itself
    assert (tmp_path / "data").is_dir()


def test_unit_commands_accept_their_options() -> None:
    """Each ExecStart's program takes the options the unit gives it (`--help` exits 0 and names them)."""
    for unit, wanted in (
        ("edgefleet-server.service", ["--host", "--port"]),
        ("edgefleet-agent.service", ["--config"]),
    ):
        argv = exec_start(unit)
        program = argv[: argv.index("server") + 1] if "server" in argv else argv[:3]
        result = subprocess.run([*program, "--help"], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        for option in wanted:
            assert option in argv and option in result.stdout, (unit, option)


# -- compose --------------------------------------------------------------------------


def compose_cli() -> list[str] | None:
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    legacy = shutil.which("docker-compose")
    return [legacy] if legacy else None


@pytest.fixture(scope="module")
def compose(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`config` of deploy/compose.yaml with the host directories under a temporary /srv."""
    cli = compose_cli()
    if cli is None:
        # Debian's docker-compose (1.29, no daemon needed for `config`); the compose plugin, where
        # Docker has it, is found first
        why = apt_install("docker-compose")
        cli = compose_cli()
        if cli is None:
            pytest.skip(f"neither `docker compose` nor docker-compose is installed ({why or 'not found'})")
    srv = tmp_path_factory.mktemp("srv")
    env = os.environ | {
        "EDGEFLEET_KEYS_DIR": str(srv / "keys"),
        "EDGEFLEET_BROKER_DIR": str(srv / "broker"),
        "EDGEFLEET_SECRETS_DIR": str(srv / "secrets"),
        "EDGEFLEET_TLS_DIR": str(srv / "tls"),
    }
    quiet = subprocess.run(
        [*cli, "-f", str(DEPLOY / "compose.yaml"), "config", "-q"], env=env, capture_output=True
    )
    assert quiet.returncode == 0, quiet.stderr.decode()
    full = subprocess.run(
        [*cli, "-f", str(DEPLOY / "compose.yaml"), "config"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return {"config": yaml.safe_load(full.stdout), "srv": srv}


def test_compose_services_are_healthchecked_restarted_and_started_in_order(compose: dict[str, Any]) -> None:
    services = compose["config"]["services"]
    assert set(services) == {"postgres", "mosquitto", "server", "nginx"}
    for name, svc in services.items():
        assert svc.get("restart") == "unless-stopped", name
        test = svc.get("healthcheck", {}).get("test")
        assert test and test[0] == "CMD", name
    healthy = {"condition": "service_healthy"}
    assert services["server"]["depends_on"] == {"postgres": healthy, "mosquitto": healthy}
    assert services["nginx"]["depends_on"] == {"server": healthy}


def published(svc: dict[str, Any]) -> set[int]:
    return {
        int(p["published"]) if isinstance(p, dict) else int(str(p).split(":")[-2])
        for p in svc.get("ports", [])
    }


def test_compose_publishes_only_tls_ports(compose: dict[str, Any]) -> None:
    services = compose["config"]["services"]
    assert published(services["mosquitto"]) == {8883}  # devices: TLS + per-device credentials
    assert published(services["nginx"]) == {443}
    assert not published(services["postgres"]) and not published(services["server"])
    assert all(1883 not in published(s) for s in services.values())
    assert compose["config"]["networks"]["backend"]["internal"] is True
    assert set(services["postgres"]["networks"]) == {"backend"}  # internal: no route out


def host_paths(compose: dict[str, Any]) -> list[str]:
    cfg = compose["config"]
    paths = [str(s["file"]) for s in cfg.get("secrets", {}).values()]
    for svc in cfg["services"].values():
        for vol in svc.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else vol.split(":")[0]
            if source.startswith("/") or source.startswith("."):
                paths.append(source)
    return paths


def test_compose_host_paths_are_absolute_and_only_nginx_conf_is_read_from_deploy(
    compose: dict[str, Any],
) -> None:
    paths = host_paths(compose)
    assert paths and all(Path(p).is_absolute() for p in paths), paths
    from_deploy = [p for p in paths if Path(p).resolve().is_relative_to(DEPLOY)]
    assert from_deploy == [str(DEPLOY / "nginx.conf")]
    assert (DEPLOY / "nginx.conf").is_file()


def test_compose_mounts_what_broker_config_writes(compose: dict[str, Any]) -> None:
    """The one command in compose.yaml's header makes every broker file the stack mounts or names."""
    from edgefleet.broker_config import write_broker_config
    from signing.keyring import KeyDir

    srv: Path = compose["srv"]
    init_keys(srv / "keys")
    write_broker_config(KeyDir(srv / "keys"), srv / "broker", hostnames=["mosquitto", "mqtt.example.com"])
    services = compose["config"]["services"]
    broker_dir = str(srv / "broker")
    conf = services["mosquitto"]["command"][-1]
    assert conf == f"{broker_dir}/mosquitto.conf" and Path(conf).is_file()
    mounts = [
        v["source"] if isinstance(v, dict) else v.split(":")[0] for v in services["mosquitto"]["volumes"]
    ]
    targets = [
        v["target"] if isinstance(v, dict) else v.split(":")[1] for v in services["mosquitto"]["volumes"]
    ]
    assert mounts == [broker_dir] == targets  # mosquitto.conf names its files by absolute path
    named = [a for a in services["mosquitto"]["healthcheck"]["test"] if a.startswith(broker_dir)]
    named += [
        v["source"] if isinstance(v, dict) else v.split(":")[0]
        for v in services["server"]["volumes"]
        if broker_dir in str(v)
    ]
    assert len(named) == 6 and all(Path(p).is_file() for p in named), named
    header = (DEPLOY / "compose.yaml").read_text()
    assert "edgefleet broker config --keys keys --out /srv/edgefleet/broker" in header
    assert "--hostname mosquitto" in header


# -- image ----------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    text = (DEPLOY / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]


def test_dockerfile_runs_as_edgefleet_owning_its_data_dir_with_a_healthcheck() -> None:
    steps = dockerfile()
    kinds = [k for k, _ in steps]
    assert kinds.count("USER") == 1
    user_at = kinds.index("USER")
    assert steps[user_at][1] == "edgefleet"
    created = [arg for kind, arg in steps[:user_at] if kind == "RUN" and "/var/lib/edgefleet" in arg]
    assert created and re.search(
        r"install -d -o edgefleet -g edgefleet -m 0750 /var/lib/edgefleet", created[0]
    )
    assert ("VOLUME", '["/var/lib/edgefleet"]') in steps
    (health,) = [arg for kind, arg in steps if kind == "HEALTHCHECK"]
    assert "/healthz" in health and "8080" in health
    assert any(kind == "ENV" and "EDGEFLEET_DATA_DIR=/var/lib/edgefleet" in arg for kind, arg in steps)


def test_dockerignore_lets_in_exactly_what_the_dockerfile_copies() -> None:
    """An allowlist: a COPY of anything else fails the build, and keys or venvs never reach the context."""
    rules = [r for r in (ROOT / ".dockerignore").read_text().splitlines() if r and not r.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    copied = {source for kind, arg in dockerfile() if kind == "COPY" for source in arg.split()[:-1]}
    assert copied == allowed
    for secret in ("keys", ".venv", "edgefleet-data", "secrets", ".cache"):
        assert secret not in allowed


# -- Kubernetes -----------------------------------------------------------------------


def test_kubernetes_manifests_validate_against_the_api_schemas() -> None:
    import kubernetes_validate

    manifests = sorted((DEPLOY / "k8s").glob("*.yaml"))
    kustomization = yaml.safe_load((DEPLOY / "k8s" / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(
        p.name for p in manifests if p.name not in ("kustomization.yaml", "secrets.example.yaml")
    )
    kinds = []
    for path in manifests:
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
            kinds.append((doc["kind"], doc["metadata"]["name"]))
    assert {
        ("Deployment", "edgefleet-server"),
        ("Service", "edgefleet-server"),
        ("ConfigMap", "edgefleet-server"),
    } <= set(kinds)
    assert {
        ("StatefulSet", "postgres"),
        ("Deployment", "mosquitto"),
        ("PersistentVolumeClaim", "edgefleet-server-data"),
    } <= set(kinds)


def test_the_validator_catches_a_misspelt_field() -> None:
    import kubernetes_validate

    def deployment() -> dict[str, Any]:
        docs = yaml.safe_load_all((DEPLOY / "k8s" / "server.yaml").read_text())
        return dict(next(d for d in docs if d["kind"] == "Deployment"))

    kubernetes_validate.validate(deployment(), kubernetes_validate.latest_version(), strict=True)
    bad = deployment()
    container = bad["spec"]["template"]["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, kubernetes_validate.latest_version(), strict=True)


def test_server_deployment_probes_and_secrets() -> None:
    docs = {
        (d["kind"], d["metadata"]["name"]): d
        for d in yaml.safe_load_all((DEPLOY / "k8s" / "server.yaml").read_text())
    }
    pod = docs[("Deployment", "edgefleet-server")]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    for probe in ("startupProbe", "livenessProbe"):
        assert server[probe]["httpGet"]["path"] == "/healthz"
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert (
        pod["securityContext"]["runAsUser"] == 10001 and server["securityContext"]["readOnlyRootFilesystem"]
    )
    config = docs[("ConfigMap", "edgefleet-server")]["data"]
    mounts = {m["mountPath"] for m in server["volumeMounts"]}
    assert Path(config["EDGEFLEET_KEY_PASSPHRASE_FILE"]).parent.as_posix() in mounts
    assert config["EDGEFLEET_KEYS_DIR"] in mounts and config["EDGEFLEET_DATA_DIR"] in mounts
    keys = next(v for v in pod["volumes"] if v["name"] == "keys")["secret"]["items"]
    assert {i["path"].split("/")[0] for i in keys} == {
        "fleet.key",
        "trust.json",
        "roots",
    }  # SERVER_FILES only


def test_each_single_replica_deployment_keeps_the_device_streams_across_restarts() -> None:
    """A stable client id and plain subscriptions in every shipped configuration (one replica each):
    what devices send while the server or the broker restarts is queued for it, not dropped
    (tests/agent/test_event_outbox.py runs the server and a device through a broker restart on
    server.env.example's values)."""
    compose_env = yaml.safe_load((DEPLOY / "compose.yaml").read_text())["services"]["server"]["environment"]
    k8s = {
        (d["kind"], d["metadata"]["name"]): d
        for d in yaml.safe_load_all((DEPLOY / "k8s" / "server.yaml").read_text())
    }
    assert k8s[("Deployment", "edgefleet-server")]["spec"]["replicas"] == 1
    for where, env in (
        ("server.env.example", env_file(DEPLOY / "server.env.example")),
        ("compose.yaml", compose_env),
        ("k8s/server.yaml", k8s[("ConfigMap", "edgefleet-server")]["data"]),
    ):
        session = mqtt_session_settings(env)
        assert session["mqtt_client_id"] and not session["shared_subscriptions"], where
