"""Resumable, bounded downloads against a real HTTP server."""

from __future__ import annotations

import asyncio
import hashlib
from pathlib import Path

import httpx
import pytest

from device_agent.downloader import download_model
from signing.errors import DigestMismatch, LengthMismatch

from .harness import ArtifactServer


def _serve(artifacts: ArtifactServer, data: bytes) -> tuple[str, str]:
    sha = hashlib.sha256(data).hexdigest()
    artifacts.files[sha] = data
    return sha, f"{artifacts.base}/m/{sha}"


async def _get(url: str, part: Path, length: int, sha: str) -> Path:
    async with httpx.AsyncClient() as client:
        return await download_model(client, url, part, length=length, sha256=sha, device_id="dev-1")


def test_resumes_from_partial_file(artifacts: ArtifactServer, tmp_path: Path) -> None:
    data = bytes(range(256)) * 1000
    sha, url = _serve(artifacts, data)
    part = tmp_path / f"{sha}.part"
    part.write_bytes(data[:100_000])
    asyncio.run(_get(url, part, len(data), sha))
    assert part.read_bytes() == data
    assert artifacts.requests[-1][1] == "bytes=100000-"
    assert artifacts.requests[-1][2] == "dev-1"


def test_refuses_oversize_and_bad_digest(artifacts: ArtifactServer, tmp_path: Path) -> None:
    data = b"m" * 50_000
    sha, url = _serve(artifacts, data)
    artifacts.overrides[sha] = data + b"endless" * 10_000
    part = tmp_path / f"{sha}.part"
    with pytest.raises(LengthMismatch):
        asyncio.run(_get(url, part, len(data), sha))
    assert not part.exists()
    artifacts.overrides[sha] = b"n" * len(data)
    with pytest.raises(DigestMismatch):
        asyncio.run(_get(url, part, len(data), sha))
    assert not part.exists()


def test_partial_longer_than_signed_is_discarded(artifacts: ArtifactServer, tmp_path: Path) -> None:
    data = b"abc" * 1000
    sha, url = _serve(artifacts, data)
    part = tmp_path / f"{sha}.part"
    part.write_bytes(b"z" * 5000)
    asyncio.run(_get(url, part, len(data), sha))
    assert part.read_bytes() == data
