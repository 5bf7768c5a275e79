"""`edgefleet mirror publish` re-runs the server's publishing from its data directory; `nginx-config`
prints the block docs/trust.md shows."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from edgefleet.cli import app
from fleet_server.settings import ServerSettings
from fleet_server.store import make_engine
from signing.keyring import KeyDir, init_keys
from signing.tuf_repo import TufRepository

runner = CliRunner()


def test_publish_uploads_what_is_missing_then_nothing_and_fails_in_one_line(tmp_path: Path) -> None:
    init_keys(tmp_path / "keys")
    keydir = KeyDir(tmp_path / "keys")
    data = tmp_path / "data"
    data.mkdir()
    make_engine(ServerSettings(data_dir=data)).dispose()  # the server's (empty) database
    TufRepository.create(data / "tuf", keydir.tuf_root(), keydir.keys("release"), keydir.key("fleet"))

    first = runner.invoke(app, ["mirror", "publish", "--data-dir", str(data), "--json"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.output)
    assert report["uploaded"] >= 4 and report["timestamp"] == "uploaded"
    assert report["storage"] == str(data / "mirror")
    assert (data / "mirror" / "metadata" / "timestamp.json").read_bytes() == (
        data / "tuf" / "metadata" / "timestamp.json"
    ).read_bytes()
    again = json.loads(runner.invoke(app, ["mirror", "publish", "--data-dir", str(data), "--json"]).output)
    assert again["uploaded"] == 0 and again["timestamp"] == "unchanged"

    bad = runner.invoke(app, ["mirror", "publish", "--data-dir", str(data), "--to", "https://cdn.example/x"])
    assert bad.exit_code == 1 and "s3://bucket" in bad.output and len(bad.output.strip().splitlines()) == 1
    missing = runner.invoke(app, ["mirror", "publish", "--data-dir", str(tmp_path / "nope")])
    assert missing.exit_code == 1 and "no server data directory" in missing.output


def test_nginx_config_revalidates_the_timestamp_and_caches_the_rest(tmp_path: Path) -> None:
    out = runner.invoke(app, ["mirror", "nginx-config", "--root", str(tmp_path)])
    assert out.exit_code == 0
    assert f"root {tmp_path.resolve()};" in out.output
    assert (
        'location = /metadata/timestamp.json {\n        add_header Cache-Control "no-cache" always;'
        in out.output
    )
    assert "immutable" in out.output
