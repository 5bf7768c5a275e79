"""Fixtures for the attack suite: a served TUF repository and a device pinned to its root."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from signing.keyring import KeyDir, init_keys
from signing.tuf_repo import TufRepository
from tests.security.delivery_harness import Delivery, serve_directory


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A directory and the URL a real HTTP server serves it at."""
    root = tmp_path / "www"
    root.mkdir()
    yield from ((root, url) for url in serve_directory(root))


@pytest.fixture
def delivery(tmp_path: Path, http_root: tuple[Path, str]) -> Delivery:
    root_dir, url = http_root
    init_keys(tmp_path / "keys")
    keydir = KeyDir(tmp_path / "keys")
    repo = TufRepository.create(root_dir, keydir.tuf_root(), keydir.keys("release"), keydir.key("fleet"))
    return Delivery(keydir, repo, url, tmp_path, keydir.tuf_root(), tmp_path / "device-cache")
