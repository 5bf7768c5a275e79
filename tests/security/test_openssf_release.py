"""A P-256 release from `edgefleet compile` to a device, checked on the way by the real OpenSSF
``model_signing`` CLI, the real fleet server, python-tuf, and the agent's own verification."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from tuf.api.metadata import Metadata, Root, Targets
from typer.testing import CliRunner

from compiler.examples import train_digits
from device_agent.agent import Agent
from edgefleet.broker import BrokerInfo, server_mqtt_settings
from edgefleet.cli import app
from edgefleet.client import ApiClient
from fleet_server.runner import ServerThread
from fleet_server.settings import ServerSettings
from signing import errors
from signing.keyring import RELEASE_PUB_FILE, SERVER_FILES, KeyDir
from signing.keys import ECDSA_P256
from signing.manifest import ENVELOPE_NAME, manifest_from_envelope, verify_bundle, verify_file
from signing.tuf_client import fetch_target
from signing.tuf_release import release_keys_of, target_name
from tests.agent.harness import LoopThread, X, agent_config, start_agent, wait_for

PASS = "correct horse battery staple"
ENV = {"EDGEFLEET_KEY_PASSPHRASE": PASS}
runner = CliRunner()
MODEL_SIGNING = Path(sys.executable).parent / "model_signing"


@dataclass(frozen=True)
class Release:
    keys: KeyDir
    bundle: Path
    manifest: dict[str, object]


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> Release:
    """`keys init --release-algorithm ecdsa-p256` (encrypted) and `compile`, through the CLI."""
    tmp = tmp_path_factory.mktemp("openssf")
    keys = tmp / "keys"
    init = runner.invoke(
        app, ["keys", "init", "--dir", str(keys), "--release-algorithm", "ecdsa-p256"], env=ENV
    )
    assert init.exit_code == 0, init.output
    digits = train_digits(tmp / "digits")
    args = [
        "compile",
        str(digits.model_path),
        "--calib",
        str(digits.calib_path),
        "--eval",
        str(digits.eval_path),
    ]
    args += [
        "--name",
        "digits",
        "--version",
        "1",
        "--keys",
        str(keys),
        "--out",
        str(tmp / "bundle"),
        "--json",
    ]
    out = runner.invoke(app, args, env=ENV)
    assert out.exit_code == 0, out.output
    return Release(KeyDir(keys), tmp / "bundle", json.loads(out.stdout)["manifest"])


def model_signing_cli(bundle: Path, public_key: Path) -> subprocess.CompletedProcess[str]:
    cmd = [str(MODEL_SIGNING), "verify", "key", str(bundle), "--signature", str(bundle / ENVELOPE_NAME)]
    return subprocess.run(
        [*cmd, "--public_key", str(public_key)], capture_output=True, text=True, timeout=120
    )


def test_model_signing_cli_verifies_a_compiled_bundle_and_so_does_the_agent(
    release: Release, tmp_path: Path
) -> None:
    assert [k.scheme for k in release.keys.trust_root().release_keys.values()] == [ECDSA_P256]
    ok = model_signing_cli(release.bundle, release.keys.path / RELEASE_PUB_FILE)
    assert ok.returncode == 0 and "Verification succeeded" in ok.stdout, ok.stdout + ok.stderr
    # the agent's path: envelope against the release keys of its TUF root, then the file, one pass
    release_keys = {k.keyid: k for k in release_keys_of(release.keys.tuf_root())}
    manifest = manifest_from_envelope((release.bundle / ENVELOPE_NAME).read_bytes(), release_keys)
    verify_file(release.bundle / manifest.model_file.path, manifest.model_file)
    assert manifest.to_dict() == release.manifest
    assert manifest.quantization["gate"]["verdict"] == "passed"  # our fields survive the format
    # one flipped byte: both refuse
    tampered = tmp_path / "tampered"
    shutil.copytree(release.bundle, tampered)
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0x01
    (tampered / "model.onnx").write_bytes(bytes(data))
    refused = model_signing_cli(tampered, release.keys.path / RELEASE_PUB_FILE)
    assert refused.returncode == 1 and "Hash mismatch for 'model.onnx'" in refused.stderr, refused.stderr
    with pytest.raises(errors.DigestMismatch):
        verify_bundle(tampered, release_keys)


@pytest.fixture
def server(tmp_path: Path, release: Release, broker_info: BrokerInfo) -> Iterator[ServerThread]:
    """The server host holds only the encrypted fleet key and the public trust files."""
    keys = tmp_path / "server-keys"
    keys.mkdir()
    for name in SERVER_FILES:
        src = release.keys.path / name
        (shutil.copytree if src.is_dir() else shutil.copy2)(src, keys / name)
    secret = tmp_path / "key-passphrase"
    secret.write_text(PASS)
    settings = ServerSettings(
        data_dir=tmp_path / "server",
        keys_dir=keys,
        key_passphrase_file=secret,
        **server_mqtt_settings(broker_info),
        tick_interval=0.1,
        tuf_refresh_interval=0.1,
    )
    srv = ServerThread(settings).start()
    assert srv.wait_subscribed(10), "the server subscribed before any device speaks"
    yield srv
    srv.stop()


def test_p256_release_is_pushed_verified_by_python_tuf_and_installed(
    release: Release, server: ServerThread, tmp_path: Path, broker_info: BrokerInfo
) -> None:
    # the server verifies the P-256 bundle: a flipped byte is refused with the reason, nothing stored
    tampered = tmp_path / "tampered"
    shutil.copytree(release.bundle, tampered)
    data = bytearray((tampered / "model.onnx").read_bytes())
    data[-1] ^= 0x01
    (tampered / "model.onnx").write_bytes(bytes(data))
    opts = ["--keys", str(release.keys.path), "--json", "--server", server.url, "--token", server.admin_token]
    refused = runner.invoke(app, ["models", "push", str(tampered), *opts], env=ENV)
    assert refused.exit_code == 1 and "digest_mismatch" in refused.output, refused.output
    pushed = runner.invoke(app, ["models", "push", str(release.bundle), *opts], env=ENV)
    assert pushed.exit_code == 0, pushed.output
    model = json.loads(pushed.stdout)
    assert model["sha256"] == release.manifest["files"][0]["sha256"]  # type: ignore[index]
    # the targets metadata is signed by the P-256 release key, and python-tuf's Updater accepts it
    targets = Metadata[Targets].from_bytes(httpx.get(f"{server.url}/tuf/metadata/targets.json").content)
    root = Metadata[Root].from_bytes(release.keys.tuf_root())
    [keyid] = targets.signatures
    assert root.signed.keys[keyid].scheme == ECDSA_P256
    target = fetch_target(
        target_name("digits", "1"),
        tmp_path / "fetched.onnx",
        trusted_root=release.keys.tuf_root(),
        cache_dir=tmp_path / "tuf-cache",
        metadata_url=f"{server.url}/tuf/metadata/",
        targets_url=f"{server.url}/tuf/targets/",
    )
    assert target.sha256 == model["sha256"] and target.custom.release == 1
    assert (tmp_path / "fetched.onnx").read_bytes() == (release.bundle / "model.onnx").read_bytes()
    # a TUF-mode agent installs it (python-tuf, then the envelope with cryptography) and serves it
    config = agent_config(
        broker_info,
        tmp_path / "dev",
        release.keys.trust_path,
        "p256-dev",
        tuf_root_path=release.keys.tuf_root_path,
    )
    agent, loop = Agent(config, release.keys.trust_root()), LoopThread()
    try:
        with ApiClient(server.url, token=server.admin_token) as api:
            api.register_device("p256-dev", "rpi4")
            # the server keeps and serves the Sigstore bundle as it was signed
            served = httpx.get(
                f"{server.url}/api/v1/artifacts/{model['sha256']}/envelope",
                headers={"X-Edgefleet-Device": "p256-dev"},
                timeout=10,
            )
            assert served.content == (release.bundle / ENVELOPE_NAME).read_bytes()
            start_agent(loop, agent)
            api.create_rollout(
                model="digits:1", selector={"hardware_id": "rpi4"}, stages=[100], min_inferences=1
            )
            wait_for(lambda: agent.running_sha256 == model["sha256"], 30, "the P-256 release installed")
            assert agent.infer(X).model_sha256 == model["sha256"]
    finally:
        loop.run(agent.stop())
        loop.close()
