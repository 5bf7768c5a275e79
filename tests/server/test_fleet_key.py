"""The server runs with its fleet key encrypted at rest: passphrase from a file, the environment or
systemd's credentials directory; a missing or wrong one stops it with one line naming where it looked."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from tuf.api.metadata import Metadata, Root, Timestamp

from device_agent import protocol
from edgefleet.broker import BrokerInfo, SecureBrokerInfo
from edgefleet.client import ApiClient
from fleet_server.keyload import FleetKeyError, find_passphrase, load_fleet_key, unlock_fleet_key
from fleet_server.runner import ServerThread
from fleet_server.settings import ServerSettings
from signing.dsse import verify_envelope
from signing.keyring import SERVER_FILES, KeyDir, init_keys

from .conftest import FakeDevice, make_bundle, register, server_settings, wait_for

PASS = "correct horse battery staple"


@pytest.fixture
def offline_keys(tmp_path: Path) -> KeyDir:
    """The full key directory, encrypted: it stays on the release host."""
    init_keys(tmp_path / "offline", passphrase=PASS.encode())
    return KeyDir(tmp_path / "offline")


@pytest.fixture
def server_keys(tmp_path: Path, offline_keys: KeyDir) -> KeyDir:
    """What the server host gets: the encrypted fleet key and the public trust files, nothing else."""
    dest = tmp_path / "server-keys"
    dest.mkdir()
    for name in SERVER_FILES:
        src = offline_keys.path / name
        if src.is_dir():
            shutil.copytree(src, dest / name)
        else:
            shutil.copy2(src, dest / name)
    assert sorted(p.name for p in dest.iterdir()) == ["fleet.key", "roots", "trust.json"]
    assert (dest / "fleet.key").read_bytes().startswith(b"-----BEGIN ENCRYPTED PRIVATE KEY-----")
    return KeyDir(dest)


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("EDGEFLEET_KEY_PASSPHRASE", "EDGEFLEET_KEY_PASSPHRASE_FILE", "CREDENTIALS_DIRECTORY"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def _secret(path: Path, value: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(value + "\n")  # as `echo pass > file` leaves it
    path.chmod(0o600)
    return path


@pytest.fixture
def started() -> Iterator[list[ServerThread]]:
    servers: list[ServerThread] = []
    yield servers
    for srv in servers:
        srv.stop()


@pytest.mark.parametrize("source", ["file", "env", "systemd-credential"])
def test_server_runs_and_signs_with_an_encrypted_fleet_key(
    source: str,
    tmp_path: Path,
    offline_keys: KeyDir,
    server_keys: KeyDir,
    broker_info: BrokerInfo,
    clean_env: pytest.MonkeyPatch,
    fake_device: Callable[[str], FakeDevice],
    started: list[ServerThread],
) -> None:
    over: dict[str, object] = {}
    if source == "file":
        over["key_passphrase_file"] = _secret(tmp_path / "secrets" / "pass", PASS)
    elif source == "env":
        clean_env.setenv("EDGEFLEET_KEY_PASSPHRASE", PASS)
    else:
        creds = tmp_path / "credentials"
        _secret(creds / "edgefleet-key-passphrase", PASS)
        clean_env.setenv("CREDENTIALS_DIRECTORY", str(creds))
    srv = ServerThread(server_settings(tmp_path, server_keys, broker_info, **over)).start()
    started.append(srv)
    assert srv.wait_subscribed(10), "the server subscribed"
    trust = offline_keys.trust_root()
    release = offline_keys.key("release", PASS.encode())
    with ApiClient(srv.url, token=srv.admin_token) as api:
        model = api.push_bundle(make_bundle(tmp_path / "bundles", release), release_keys=[release])
    with httpx.Client(base_url=srv.url, timeout=10) as client:
        # the fleet key signs the TUF timestamp of the release ...
        root = Metadata[Root].from_bytes(offline_keys.tuf_root())
        ts = Metadata[Timestamp].from_bytes(client.get("/tuf/metadata/timestamp.json").content)
        root.signed.verify_delegate(Timestamp.type, ts.signed_bytes, ts.signatures)
        # ... and the directive a rollout publishes
        register(client, "locked-1")
        r = client.post("/api/v1/rollouts", json={"model": "det:1", "stages": [100], "soak_seconds": 0})
        assert r.status_code == 201, r.text
        dev = fake_device("locked-1")
        dev.subscribe_desired()
        _topic, raw, _retained = wait_for(lambda: dev.received and dev.received[0])
    payload = verify_envelope(raw, protocol.DIRECTIVE_PAYLOAD_TYPE, trust.fleet_keys)
    directive = protocol.decode_directive(payload)
    assert directive.model is not None and directive.model.sha256 == model["sha256"]
    # no plaintext private key anywhere the server writes or reads
    for path in tmp_path.rglob("*"):
        if path.is_file():
            assert b"-----BEGIN PRIVATE KEY-----" not in path.read_bytes(), path


def _settings(tmp_path: Path, keys: KeyDir, **over: object) -> ServerSettings:
    return ServerSettings(data_dir=tmp_path / "data", keys_dir=keys.path, **over)  # type: ignore[arg-type]


def test_missing_passphrase_is_one_line_naming_the_key_and_every_source(
    tmp_path: Path, server_keys: KeyDir, clean_env: pytest.MonkeyPatch
) -> None:
    clean_env.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds-without-ours"))
    with pytest.raises(FleetKeyError) as exc:
        ServerThread(_settings(tmp_path, server_keys))
    msg = str(exc.value)
    assert "\n" not in msg and str(server_keys.path / "fleet.key") in msg and "encrypted" in msg
    for where in ("EDGEFLEET_KEY_PASSPHRASE_FILE", "$EDGEFLEET_KEY_PASSPHRASE", "edgefleet-key-passphrase"):
        assert where in msg


@pytest.mark.parametrize("source", ["file", "env", "systemd-credential"])
def test_wrong_passphrase_refuses_to_start(
    source: str, tmp_path: Path, server_keys: KeyDir, clean_env: pytest.MonkeyPatch
) -> None:
    over: dict[str, object] = {}
    if source == "file":
        over["key_passphrase_file"] = _secret(tmp_path / "pass", "not the passphrase")
        where = str(tmp_path / "pass")
    elif source == "env":
        clean_env.setenv("EDGEFLEET_KEY_PASSPHRASE", "not the passphrase")
        where = "$EDGEFLEET_KEY_PASSPHRASE"
    else:
        _secret(tmp_path / "creds" / "fleet-pass", "not the passphrase")
        clean_env.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
        over["key_credential"] = "fleet-pass"
        where = "$CREDENTIALS_DIRECTORY/fleet-pass"
    with pytest.raises(FleetKeyError) as exc:
        ServerThread(_settings(tmp_path, server_keys, **over))
    msg = str(exc.value)
    assert "\n" not in msg and msg.startswith(f"wrong passphrase for {server_keys.path / 'fleet.key'}")
    assert f"taken from {where}" in msg


def test_sources_are_tried_in_the_documented_order(
    tmp_path: Path, server_keys: KeyDir, clean_env: pytest.MonkeyPatch
) -> None:
    creds = tmp_path / "creds"
    _secret(creds / "edgefleet-key-passphrase", "from systemd")
    env = {"EDGEFLEET_KEY_PASSPHRASE": "from env", "CREDENTIALS_DIRECTORY": str(creds)}
    with_file = _settings(tmp_path, server_keys, key_passphrase_file=_secret(tmp_path / "f", "from file"))
    without_file = _settings(tmp_path, server_keys)
    found = find_passphrase(with_file, env)
    assert found is not None and (found.value, found.source) == (b"from file", str(tmp_path / "f"))
    found = find_passphrase(without_file, env)
    assert found is not None and found.value == b"from env"
    found = find_passphrase(without_file, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert found is not None and found.source == "$CREDENTIALS_DIRECTORY/edgefleet-key-passphrase"
    assert find_passphrase(without_file, {}) is None
    # a file named explicitly must be there: never fall through to the environment
    gone = _settings(tmp_path, server_keys, key_passphrase_file=tmp_path / "missing")
    with pytest.raises(FleetKeyError, match="cannot read key_passphrase_file"):
        load_fleet_key(gone, {"EDGEFLEET_KEY_PASSPHRASE": PASS})
    empty = _settings(tmp_path, server_keys, key_passphrase_file=_secret(tmp_path / "empty", ""))
    with pytest.raises(FleetKeyError, match="is empty"):
        load_fleet_key(empty, {"EDGEFLEET_KEY_PASSPHRASE": PASS})
    # the right passphrase later in the order does not help when an earlier source is wrong
    with pytest.raises(FleetKeyError, match="wrong passphrase"):
        load_fleet_key(without_file, {**env, "EDGEFLEET_KEY_PASSPHRASE": "nope"})
    assert load_fleet_key(without_file, {"EDGEFLEET_KEY_PASSPHRASE": PASS}).keyid in (
        server_keys.trust_root().fleet_keys
    )


def test_missing_or_broken_key_file_is_one_line(tmp_path: Path, server_keys: KeyDir) -> None:
    (server_keys.path / "fleet.key").write_bytes(b"not a key")
    with pytest.raises(FleetKeyError, match="not a PEM private key") as exc:
        load_fleet_key(_settings(tmp_path, server_keys), {})
    assert "\n" not in str(exc.value)
    (server_keys.path / "fleet.key").unlink()
    with pytest.raises(FleetKeyError, match="cannot read the fleet key"):
        load_fleet_key(_settings(tmp_path, server_keys), {})


def _server_command(
    tmp_path: Path, server_keys: KeyDir, broker_info: SecureBrokerInfo, held: socket.socket
) -> tuple[list[str], dict[str, str]]:
    """``edgefleet server`` on the production broker, serving on ``held`` (a socket bound here and
    handed over: nothing can take its port meanwhile), with no passphrase in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.pop("CREDENTIALS_DIRECTORY", None)
    env["COLUMNS"] = "60"  # a narrow terminal must not wrap the error over lines
    cmd = [sys.executable, "-m", "edgefleet.cli", "server", "--keys", str(server_keys.path)]
    cmd += ["--mqtt", f"{broker_info.host}:{broker_info.server_port}"]
    cmd += ["--mqtt-credentials", str(broker_info.server_credentials)]
    cmd += ["--data-dir", str(tmp_path / "data"), "--fd", str(held.fileno())]
    return cmd, env


def test_unlock_decrypts_an_encrypted_key_and_leaves_a_plain_one_to_the_app(
    tmp_path: Path, server_keys: KeyDir, clean_env: pytest.MonkeyPatch
) -> None:
    settings = _settings(tmp_path, server_keys)
    with pytest.raises(FleetKeyError, match="no passphrase was found"):
        unlock_fleet_key(settings, {})
    assert unlock_fleet_key(settings, {"EDGEFLEET_KEY_PASSPHRASE": PASS}) is not None
    plain = tmp_path / "plain"
    init_keys(plain)  # no passphrase: the app loads it (and warns that it is not encrypted)
    assert unlock_fleet_key(_settings(tmp_path, KeyDir(plain)), {}) is None
    (plain / "fleet.key").unlink()
    with pytest.raises(FleetKeyError, match="cannot read the fleet key"):
        unlock_fleet_key(_settings(tmp_path, KeyDir(plain)), {})


UNLOCK_FIRST = """
import sys
from edgefleet.cli import app
try:
    app(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print("exit", code, "fleet_server.app" in sys.modules)
"""


@pytest.mark.parametrize("case", ["locked", "missing"])
def test_a_locked_or_missing_key_fails_before_the_server_is_imported(
    case: str, tmp_path: Path, server_keys: KeyDir
) -> None:
    if case == "missing":
        (server_keys.path / "fleet.key").unlink()
    env = {k: v for k, v in os.environ.items() if not k.startswith("EDGEFLEET_")}
    env.pop("CREDENTIALS_DIRECTORY", None)
    args = ["server", "--keys", str(server_keys.path), "--data-dir", str(tmp_path / "data")]
    done = subprocess.run(
        [sys.executable, "-c", UNLOCK_FIRST, *args], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.stdout.strip().splitlines()[-1] == "exit 1 False", done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert ("no passphrase was found" if case == "locked" else "cannot read the fleet key") in lines[0]


@pytest.mark.slow
@pytest.mark.parametrize("given", ["nothing", "wrong env", "wrong --key-passphrase-file"])
def test_edgefleet_server_reports_a_locked_key_in_one_line(
    given: str, tmp_path: Path, server_keys: KeyDir, broker_info: SecureBrokerInfo
) -> None:
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        cmd, env = _server_command(tmp_path, server_keys, broker_info, held)
        if given == "wrong env":
            env["EDGEFLEET_KEY_PASSPHRASE"] = "not the passphrase"
        elif given == "wrong --key-passphrase-file":
            cmd += ["--key-passphrase-file", str(_secret(tmp_path / "pass", "not the passphrase"))]
        proc = subprocess.run(
            cmd, env=env, capture_output=True, text=True, timeout=60, pass_fds=(held.fileno(),)
        )
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith("error: ") and str(server_keys.path / "fleet.key") in lines[0]
    assert ("no passphrase was found" if given == "nothing" else "wrong passphrase") in lines[0]


@pytest.mark.slow
def test_edgefleet_server_gets_past_the_key_with_the_right_passphrase(
    tmp_path: Path, server_keys: KeyDir, broker_info: SecureBrokerInfo
) -> None:
    """The other half of the locked-key test above, run once: the same command with the right
    passphrase serves (and is then stopped by the test)."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    port = int(held.getsockname()[1])
    cmd, env = _server_command(tmp_path, server_keys, broker_info, held)
    env["EDGEFLEET_KEY_PASSPHRASE"] = PASS
    log = tmp_path / "server.log"
    with (
        held,
        open(log, "wb") as out,
        subprocess.Popen(cmd, env=env, stdout=out, stderr=out, pass_fds=(held.fileno(),)) as running,
    ):
        try:
            url = f"http://127.0.0.1:{port}/healthz"
            with httpx.Client(timeout=1) as probe:  # one TLS context for the wait, not one per poll
                wait_for(lambda: _answers(probe, url) or running.poll() is not None, 30)
            assert running.poll() is None, log.read_text()
        finally:
            running.terminate()
            running.wait(15)


def _answers(probe: httpx.Client, url: str) -> bool:
    try:
        return probe.get(url).status_code == 200
    except httpx.HTTPError:
        return False
