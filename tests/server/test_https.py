"""HTTPS as an option: the server serves TLS with a certificate from the fleet CA, a client that
trusts that CA verifies it, and the URL devices are sent to follows the scheme and the port."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from edgefleet.cli import app
from edgefleet.provision import fleet_ca, issue_cert, write_cert_and_key
from fleet_server.runner import ServerThread, base_url, tls_options
from signing.keyring import KeyDir, init_keys

from .conftest import FakeDevice, make_bundle, register, upload, wait_for
from .test_rollout_flow import directives


def _http_cert(keydir: KeyDir, out: Path) -> tuple[Path, Path]:
    ca = fleet_ca(keydir)
    (out / "ca.crt").write_bytes(ca.cert_pem)
    pem, key = issue_cert(ca, "127.0.0.1", server=True, hostnames=["127.0.0.1", "localhost"])
    write_cert_and_key(pem, key, out / "http.crt", out / "http.key")
    return out / "http.crt", out / "http.key"


def test_the_server_over_https_verified_against_the_fleet_ca(
    make_server: Callable[..., ServerThread],
    keydir: KeyDir,
    tmp_path: Path,
    fake_device: Callable[[str], FakeDevice],
) -> None:
    cert, key = _http_cert(keydir, tmp_path)
    server = make_server(tls_cert=cert, tls_key=key)
    assert server.url.startswith("https://127.0.0.1:")
    trusted = ssl.create_default_context(cafile=str(tmp_path / "ca.crt"))
    with httpx.Client(base_url=server.url, verify=trusted, timeout=10) as client:
        assert client.get("/healthz").status_code == 200
        # devices are sent to the HTTPS URL: the artifact links in their directives
        upload(client, make_bundle(tmp_path, keydir.key("release")))
        register(client, "tls-1")
        dev = fake_device("tls-1")
        dev.subscribe_desired()
        client.post("/api/v1/rollouts", json={"model": "det:1", "stages": [100]})
        d = wait_for(lambda: directives(dev, keydir), 10)[-1]
        assert d.model is not None and d.model.model_url.startswith(f"{server.url}/api/v1/artifacts/")
        got = client.get(d.model.model_url, headers={"X-Edgefleet-Device": "tls-1"})
        assert got.status_code == 200 and len(got.content) == d.model.length
    # a client that trusts another CA refuses the server; plaintext HTTP gets no answer
    init_keys(tmp_path / "other")
    other = fleet_ca(KeyDir(tmp_path / "other"))
    (tmp_path / "other.crt").write_bytes(other.cert_pem)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(
            f"{server.url}/healthz", verify=ssl.create_default_context(cafile=str(tmp_path / "other.crt"))
        )
    with pytest.raises(httpx.HTTPError):
        httpx.get(server.url.replace("https://", "http://") + "/healthz", timeout=3)


def test_tls_options_and_urls(tmp_path: Path) -> None:
    assert tls_options(None, None) == {}
    with pytest.raises(ValueError, match="both"):
        tls_options(tmp_path / "c.pem", None)
    with pytest.raises(ValueError, match="no such file"):
        tls_options(tmp_path / "c.pem", tmp_path / "k.pem")
    assert base_url("0.0.0.0", 8443, True) == "https://127.0.0.1:8443"
    assert base_url("10.0.0.5", 8080, False) == "http://10.0.0.5:8080"
    assert base_url("::1", 8443, True) == "https://[::1]:8443"


def test_the_server_command_refuses_half_a_tls_configuration(keydir: KeyDir, tmp_path: Path) -> None:
    cert, _ = _http_cert(keydir, tmp_path)
    result = CliRunner().invoke(
        app,
        ["server", "--keys", str(keydir.path), "--data-dir", str(tmp_path / "d"), "--tls-cert", str(cert)],
    )
    assert result.exit_code == 2 and "certificate and its key" in " ".join(result.output.split())
    bad = CliRunner().invoke(
        app,
        ["server", "--keys", str(keydir.path), "--data-dir", str(tmp_path / "d"),
         "--mqtt-credentials", str(tmp_path / "missing.json")],
    )  # fmt: skip
    assert bad.exit_code == 2 and "cannot read the broker credentials" in " ".join(bad.output.split())
