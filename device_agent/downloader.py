"""Resumable, bounded, hash-while-streaming model downloads.

The model is fetched into ``<slot>/<sha256>.part``; an interrupted download
continues with an HTTP Range request. Bytes are hashed as they arrive (the
existing prefix of a partial file once, then the stream), so no byte is read
twice. The signed length is a hard ceiling: a server streaming endless data
is cut off at ``length + 1`` bytes (``LengthMismatch``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported lazily: httpx costs ~18 MB RSS, paid only when downloading
    import httpx

from signing.errors import CodedError, DigestMismatch, LengthMismatch, Unavailable

DEVICE_HEADER = "X-Edgefleet-Device"
CHUNK = 1 << 16
MAX_ENVELOPE = 1 << 20


class IncompleteDownload(Unavailable):
    """The connection ended before ``length`` bytes arrived; the partial file is kept for resume."""

    code = "download_incomplete"


class DownloadError(CodedError):
    """The server answered with an unexpected status."""

    code = "download_failed"


class ServerBusy(DownloadError, Unavailable):
    """429/502/503/504: a proxy in front of a restarting server, or an overloaded one. Worth a retry."""


class ServerUnreachable(DownloadError, Unavailable):
    """No answer at all (refused, reset, timed out, TLS handshake failed). Worth a retry."""


BUSY_STATUSES = frozenset({429, 502, 503, 504})


def _refused(url: str, status: int) -> DownloadError:
    cls = ServerBusy if status in BUSY_STATUSES else DownloadError
    return cls(f"GET {url}: HTTP {status}")


ERROR_BODY_KEPT = 1 << 16  # an error answer's body up to this size is read, so its connection is reused


async def discard(resp: httpx.Response) -> None:
    """Read a short error body (a 404, a 503 page) so the pooled connection can serve the next
    request; a longer or broken one is not read on, and closing the response drops its connection."""
    import httpx

    got = 0
    try:
        async for chunk in resp.aiter_bytes():
            got += len(chunk)
            if got > ERROR_BODY_KEPT:
                return
    except httpx.HTTPError:
        return


def _hash_prefix(path: Path, length: int) -> tuple[hashlib._Hash, int]:
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while n < length:
            chunk = fh.read(min(1 << 20, length - n))
            if not chunk:
                break
            h.update(chunk)
            n += len(chunk)
    return h, n


async def download_model(
    client: httpx.AsyncClient,
    url: str,
    part: Path,
    *,
    length: int,
    sha256: str,
    device_id: str,
    max_bytes_per_s: int = 0,
) -> Path:
    """Download ``url`` into ``part`` (resuming it) and verify length + sha256; return ``part``.

    Raises LengthMismatch (oversize: more than ``length`` bytes), DigestMismatch
    (the partial file is deleted in both cases, it can never become valid),
    IncompleteDownload (kept for resume), DownloadError, or httpx's errors (the
    caller, :class:`device_agent.http_fetcher.HttpFetcher`, names them).
    ``max_bytes_per_s`` > 0 paces the stream (a metered or shared uplink on the device).
    """
    part.parent.mkdir(parents=True, exist_ok=True)
    have = part.stat().st_size if part.exists() else 0
    if have > length:
        part.unlink()
        have = 0
    h, have = _hash_prefix(part, have) if have else (hashlib.sha256(), 0)
    if have < length:
        headers = {DEVICE_HEADER: device_id}
        if have:
            headers["Range"] = f"bytes={have}-"
        async with client.stream("GET", url, headers=headers) as resp:
            if resp.status_code == 206 and have:
                start = _content_range_start(resp.headers.get("content-range", ""))
                if start != have:
                    raise DownloadError(f"server resumed at byte {start}, asked for {have}")
                mode = "ab"
            elif resp.status_code == 200:
                # Server ignored the Range (or there was none): start over.
                h, have, mode = hashlib.sha256(), 0, "wb"
            else:
                await discard(resp)
                raise _refused(url, resp.status_code)
            t0, got = time.monotonic(), 0
            chunk_size = min(CHUNK, max(1024, max_bytes_per_s // 8)) if max_bytes_per_s > 0 else CHUNK
            with open(part, mode) as fh:
                async for chunk in resp.aiter_bytes(chunk_size):
                    if have + len(chunk) > length:
                        fh.close()
                        part.unlink(missing_ok=True)
                        raise LengthMismatch(f"server sent more than the signed {length} bytes")
                    fh.write(chunk)
                    h.update(chunk)
                    have += len(chunk)
                    if max_bytes_per_s > 0:
                        got += len(chunk)
                        ahead = got / max_bytes_per_s - (time.monotonic() - t0)
                        if ahead > 0:
                            fh.flush()  # a kill while paced keeps what arrived for the resume
                            await asyncio.sleep(ahead)
                fh.flush()
                os.fsync(fh.fileno())
    if have < length:
        raise IncompleteDownload(f"got {have} of {length} bytes")
    if h.hexdigest() != sha256:
        part.unlink(missing_ok=True)
        raise DigestMismatch(f"downloaded sha256 {h.hexdigest()[:12]}..., signed {sha256[:12]}...")
    return part


def _content_range_start(value: str) -> int:
    # "bytes 100-199/200"
    try:
        unit, rng = value.split(" ", 1)
        return int(rng.split("-", 1)[0]) if unit == "bytes" else -1
    except ValueError:
        return -1


async def fetch_envelope(client: httpx.AsyncClient, url: str, device_id: str) -> bytes:
    """GET a bundle envelope (small JSON), refusing anything larger than ``MAX_ENVELOPE``."""
    body = bytearray()
    async with client.stream("GET", url, headers={DEVICE_HEADER: device_id}) as resp:
        if resp.status_code != 200:
            await discard(resp)
            raise _refused(url, resp.status_code)
        async for chunk in resp.aiter_bytes(CHUNK):
            body += chunk
            if len(body) > MAX_ENVELOPE:
                raise LengthMismatch(f"envelope larger than {MAX_ENVELOPE} bytes")
    return bytes(body)
