"""`edgefleet devices provision` for a server on https: the agent.toml names the CA that verifies the
server's certificate (``http_ca_file``), and that CA does verify it in a real TLS handshake."""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from device_agent.config import load_config
from device_agent.http_fetcher import HttpsSettings
from edgefleet.cli import app
from edgefleet.provision import fleet_ca, issue_cert, write_cert_and_key
from signing.keyring import KeyDir, init_keys
from tests.support.loopback_http import serve_directory

runner = CliRunner()
NOPASS = "--insecure-no-passphrase"
PROVISION = ["devices", "provision", "cam-1", "--hw", "rpi4", "--broker-host", "mqtt.example"]


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    init_keys(tmp_path / "keys")
    return tmp_path / "keys"


@pytest.fixture
def https_server(keys: Path, tmp_path: Path) -> Iterator[str]:
    """An HTTPS server whose certificate the fleet CA issued (as a private fleet's server has)."""
    cert, key = issue_cert(fleet_ca(KeyDir(keys)), "fleet", server=True, hostnames=["127.0.0.1", "localhost"])
    write_cert_and_key(cert, key, tmp_path / "srv.crt", tmp_path / "srv.key")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(tmp_path / "srv.crt", tmp_path / "srv.key")
    (tmp_path / "www").mkdir()
    with serve_directory(tmp_path / "www", tls=ctx) as url:
        yield url


def provision(keys: Path, out: Path, *extra: str) -> None:
    result = runner.invoke(
        app,
        [*PROVISION, "--keys", str(keys), "--out", str(out), NOPASS, "--json", *extra],
    )
    assert result.exit_code == 0, result.output


def test_https_urls_name_the_fleet_ca_and_it_verifies_the_server(
    keys: Path, tmp_path: Path, https_server: str
) -> None:
    out = tmp_path / "cam-1"
    provision(keys, out, "--metadata-url", f"{https_server}/tuf/metadata/")
    assert 'http_ca_file = "ca.crt"' in (out / "agent.toml").read_text()
    cfg = load_config(out / "agent.toml")
    assert cfg.http_ca_file == out / "ca.crt" and cfg.tuf_url == f"{https_server}/tuf"
    assert (out / "ca.crt").read_bytes() == fleet_ca(KeyDir(keys)).cert_pem
    # the agent's TLS settings from that config verify the server; the system's store alone does not
    verified = HttpsSettings(cfg.http_ca_file, cfg.mqtt_cert_file, cfg.mqtt_key_file).context()
    assert httpx.get(f"{https_server}/", verify=verified).status_code in (200, 404)
    with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
        httpx.get(f"{https_server}/", verify=HttpsSettings().context())


def test_a_given_ca_is_copied_and_named(keys: Path, tmp_path: Path) -> None:
    ca = tmp_path / "public-ca.pem"
    ca.write_bytes(fleet_ca(KeyDir(tmp_path / "other")).cert_pem)
    out = tmp_path / "cam-1"
    provision(keys, out, "--targets-url", "https://cdn.example/targets/", "--http-ca-file", str(ca))
    assert 'http_ca_file = "http-ca.crt"' in (out / "agent.toml").read_text()
    assert (out / "http-ca.crt").read_bytes() == ca.read_bytes()
    assert load_config(out / "agent.toml").http_ca_file == out / "http-ca.crt"


def test_plain_http_names_no_ca(keys: Path, tmp_path: Path) -> None:
    for extra in ([], ["--metadata-url", "http://fleet.example/tuf/metadata/"]):
        out = tmp_path / f"cam-{len(extra)}"
        provision(keys, out, *extra)
        assert "http_ca_file" not in (out / "agent.toml").read_text()
        assert load_config(out / "agent.toml").http_ca_file is None


def test_a_missing_ca_file_is_refused_before_anything_is_written(keys: Path, tmp_path: Path) -> None:
    out = tmp_path / "cam-1"
    result = runner.invoke(
        app,
        [
            *PROVISION,
            "--keys",
            str(keys),
            "--out",
            str(out),
            NOPASS,
            "--http-ca-file",
            str(tmp_path / "nope.pem"),
        ],
    )
    assert result.exit_code == 1 and "nope.pem" in " ".join(result.output.split())
    assert not out.exists() or not any(out.iterdir())
