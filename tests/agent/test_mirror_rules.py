"""The mirror list's pure rules: which error a set of failed mirrors adds up to, URL composition,
and a configuration that names no usable mirror refused with a clear error."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from device_agent.config import config_from_dict
from device_agent.downloader import DownloadError, ServerUnreachable
from device_agent.mirrors import (
    MirrorsUnavailable,
    bundle_file_url,
    check_mirrors,
    envelope_url,
    first_of,
    model_url,
    target_url,
    verdict,
)
from signing.errors import DigestMismatch, MetadataExpired, MetadataRollback
from tests.support.fresh_imports import imported_by


def test_every_mirror_refusing_is_the_first_refusal_and_final() -> None:
    expired, rolled = MetadataExpired("frozen"), MetadataRollback("old")
    assert verdict([("a", expired), ("b", rolled)]) is expired


def test_one_mirror_out_of_reach_makes_it_a_retry_carrying_the_refusal() -> None:
    refused = DigestMismatch("bad bytes")
    out = verdict([("a", ServerUnreachable("refused")), ("b", refused)])
    assert isinstance(out, MirrorsUnavailable) and out.refusal is refused
    assert out.code == "delivery_unavailable" and "a: download_failed" in str(out)
    http = verdict([("a", DownloadError("HTTP 404")), ("b", DownloadError("HTTP 500"))])
    assert isinstance(http, MirrorsUnavailable) and http.refusal is None


def test_a_single_source_keeps_its_own_error() -> None:
    final = DownloadError("HTTP 404")
    assert verdict([("only", final)]) is final  # the directive's URL: a 404 stays final


def test_first_of_stops_at_the_first_mirror_that_delivers() -> None:
    asked: list[str] = []

    async def call(url: str) -> str:
        asked.append(url)
        if url != "b":
            raise MetadataExpired(url)
        return "ok"

    assert asyncio.run(first_of(["a", "b", "c"], call, who="d", what="x")) == "ok"
    assert asked == ["a", "b"]


def test_urls_and_configuration() -> None:
    assert target_url("http://m", "models/tiny/1", "ab") == "http://m/targets/models/tiny/ab.1"
    assert bundle_file_url("http://m", "ab", "golden set.npz") == "http://m/bundles/ab/files/golden%20set.npz"
    assert envelope_url("http://m", "ab") == "http://m/bundles/ab/envelope"
    assert model_url("http://m", "ab") == "http://m/bundles/ab/model"
    assert check_mirrors(["https://cdn.example/ef/", "http://10.0.0.2:8080"]) == [
        "https://cdn.example/ef",
        "http://10.0.0.2:8080",
    ]
    for bad in (["ftp://x"], ["cdn.example"], ["http://x/?q=1"], ["http://a", "http://a/"]):
        with pytest.raises(ValueError, match="mirror"):
            check_mirrors(bad)
    base = {"device_id": "d1", "hardware_id": "hw", "data_dir": "d", "trust_path": "t.json"}
    with pytest.raises(ValueError, match="http\\(s\\)://"):
        config_from_dict({**base, "mirrors": ["s3://bucket"]}, Path("/tmp"))
    assert config_from_dict({**base, "mirrors": ["http://m/"]}, Path("/tmp")).mirrors == ["http://m"]


def test_an_agent_without_tuf_does_not_import_python_tuf() -> None:
    """Building the agent and the URLs of an install imports nothing of python-tuf (nor boto3, which
    securesystemslib's signers pull in): only an agent configured for TUF needs them."""
    code = (
        "import device_agent.agent, device_agent.install, device_agent.mirrors as m\n"
        "m.repository_url('http://fleet.example:8080/tuf', None)"
    )
    assert imported_by(code, ("tuf", "securesystemslib", "boto3"), timeout=60) == []
