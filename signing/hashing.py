"""Streaming SHA-256: bundles are hashed once, in chunks, never read whole into memory."""

from __future__ import annotations

import hashlib
from pathlib import Path

CHUNK = 1 << 20


def file_digest(path: Path, max_length: int | None = None) -> tuple[str, int]:
    """Return (hex sha256, length) of a file, reading it once.

    With ``max_length`` the read stops one byte past it, so an oversized file is
    detected without hashing all of it.
    """
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while True:
            chunk = fh.read(CHUNK)
            if not chunk:
                break
            n += len(chunk)
            h.update(chunk)
            if max_length is not None and n > max_length:
                break
    return h.hexdigest(), n
