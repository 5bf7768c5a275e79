"""Delta installs: rebuild the new model file from the one the device serves and a zstd patch.

The patch is a zstd frame compressed with the old model file as a raw-content
dictionary (what ``zstd --patch-from`` writes; ``fleet_server.deltas`` makes
them); decision 0024 records the measurements behind the choice. It is found
by name, ``<repository>/targets/`` + :func:`device_agent.wire.delta_path`
(base sha256, new sha256), so a static mirror serves it like any file and no
metadata describes it.

No new trust: a delta is only another encoding of the full file. The rebuilt
bytes are checked against the signed sha256 and length of the FULL file (the
directive's, which TUF mode has already agreed with the release metadata)
before they are committed, as downloaded bytes are. Anything short of a
verified rebuild sends the installer to the full file, and that is a
fallback, never a failure of the install:

- no base (nothing served yet) or a partial full download already under way;
- no delta (404), or the server unreachable for it;
- a delta longer than ``MAX_DELTA_FRACTION`` of the full file's signed length,
  whatever its ``Content-Length`` says (the stream is cut at that bound);
- a corrupt frame, a rebuild longer than the signed length, or a rebuilt file
  whose hash is not the signed one.

Crash safety: the patch and the rebuilt bytes live in the inactive slot under
names (``<sha256>.delta``, ``<sha256>.rebuild``) that the slot's next
``prepare`` deletes; only a rebuild that verified is renamed to the partial
download's name, which the installer then commits. The serving slot is only
read, so a power cut mid-rebuild leaves the served model as it was and the
next attempt starts clean.

Memory on the device: zstd keeps the base file (the dictionary) and a window
as large as the new file, so a rebuild needs about the base's size plus the
new file's in memory (bench/delta.py measures it); the window is bounded by
the signed length, and a frame that asks for more is refused before it
allocates.
"""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import os
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from device_agent.downloader import CHUNK, DEVICE_HEADER, discard
from device_agent.slots import is_disk_full
from device_agent.wire import ModelRef, delta_path, delta_window_log, max_delta_bytes
from signing.errors import CodedError, DigestMismatch, LengthMismatch, Unavailable

if TYPE_CHECKING:
    import httpx


class Fallback(StrEnum):
    """Why an install took the full file instead of a delta (said in the install's event)."""

    NO_BASE = "no_base"
    RESUMING = "resuming_full_download"
    UNSUPPORTED = "fetcher_has_no_deltas"
    NOT_FOUND = "delta_not_found"
    UNREACHABLE = "delta_unreachable"
    TOO_LARGE = "delta_too_large"
    CORRUPT = "delta_corrupt"
    WRONG_REBUILD = "rebuild_mismatch"
    NO_ROOM = "no_room_for_delta"
    DISABLED = "deltas_disabled"  # the agent's delta_updates = false


class DeltaRefused(Exception):
    """The delta cannot give this install its file; ``received`` bytes of it came over the wire."""

    def __init__(self, why: Fallback, detail: str, received: int = 0) -> None:
        super().__init__(f"{why.value}: {detail}")
        self.why, self.received = why, received


@runtime_checkable
class DeltaFetcher(Protocol):
    """A fetcher that can also fetch deltas (:class:`device_agent.http_fetcher.HttpFetcher` can)."""

    async def delta(self, url: str, dest: Path, *, max_bytes: int) -> int:
        """GET ``url`` into ``dest``, at most ``max_bytes``; return the bytes received.

        Raises :class:`DeltaRefused` (missing, too large) or :class:`signing.errors.Unavailable`.
        """
        ...


@dataclass(frozen=True)
class DeltaResult:
    """What the delta attempt gave: the verified file in ``part`` (``rebuilt``), or a fallback."""

    rebuilt: bool
    received: int  # delta bytes that came over the wire, used or not
    note: str  # for the install's event: which way the file came, and why

    @classmethod
    def fallback(cls, why: Fallback, detail: str = "", received: int = 0) -> DeltaResult:
        return cls(False, received, f"full file ({why.value}{': ' + detail if detail else ''})")


def delta_url(repository: str, base_sha256: str, new_sha256: str) -> str:
    """The delta's URL in a repository (``<repository>/targets/...``), on the origin or any mirror."""
    return f"{repository.rstrip('/')}/targets/{delta_path(base_sha256, new_sha256)}"


# -- applying (the device) --------------------------------------------------------------------


def rebuild(base: Path, patch: Path, out: Path, *, length: int, sha256: str) -> None:
    """Rebuild ``out`` from ``base`` and ``patch``, streaming, and prove it is the signed file.

    Raises DeltaRefused(CORRUPT) for a frame zstd refuses (or one wanting a window
    larger than the file), LengthMismatch for a rebuild of another length,
    DigestMismatch for other bytes. ``out`` is removed on any failure. Blocking.
    """
    import zstandard

    h, n = hashlib.sha256(), 0
    try:
        with mapped(base) as dictionary, open(patch, "rb") as src, open(out, "wb") as dst:
            dctx = zstandard.ZstdDecompressor(
                dict_data=zstandard.ZstdCompressionDict(dictionary, dict_type=zstandard.DICT_TYPE_RAWCONTENT),
                max_window_size=1 << delta_window_log(length),
            )
            with dctx.stream_reader(src, read_size=CHUNK) as reader:
                while chunk := reader.read(CHUNK):
                    n += len(chunk)
                    if n > length:
                        raise LengthMismatch(f"the delta rebuilds more than the signed {length} bytes")
                    h.update(chunk)
                    dst.write(chunk)
            dst.flush()
            os.fsync(dst.fileno())
        if n != length:
            raise LengthMismatch(f"the delta rebuilt {n} bytes, signed {length}")
        if h.hexdigest() != sha256:
            raise DigestMismatch(f"rebuilt sha256 {h.hexdigest()[:12]}..., signed {sha256[:12]}...")
    except zstandard.ZstdError as exc:
        out.unlink(missing_ok=True)
        raise DeltaRefused(Fallback.CORRUPT, str(exc)) from exc
    except BaseException:
        out.unlink(missing_ok=True)
        raise


async def install_from_delta(
    fetcher: object, *, base: Path | None, base_sha256: str | None, ref: ModelRef, part: Path, repository: str
) -> DeltaResult:
    """Try to put the verified model file of ``ref`` at ``part`` from a delta against ``base``.

    Never raises for a delta's fault: any reason not to use it is a
    :class:`DeltaResult` fallback, and the caller downloads the full file.
    """
    if base is None or base_sha256 is None or not base.is_file():
        return DeltaResult.fallback(Fallback.NO_BASE)
    if not isinstance(fetcher, DeltaFetcher):
        return DeltaResult.fallback(Fallback.UNSUPPORTED)
    if part.exists() and part.stat().st_size > 0:
        return DeltaResult.fallback(Fallback.RESUMING, f"{part.stat().st_size} bytes already here")
    if not repository:
        return DeltaResult.fallback(Fallback.NOT_FOUND, "no repository URL to find deltas in")
    patch = part.with_name(f"{ref.sha256}.delta")
    rebuilt = part.with_name(f"{ref.sha256}.rebuild")
    received = 0
    try:
        received = await fetcher.delta(
            delta_url(repository, base_sha256, ref.sha256), patch, max_bytes=max_delta_bytes(ref.length)
        )
        await asyncio.to_thread(rebuild, base, patch, rebuilt, length=ref.length, sha256=ref.sha256)
    except DeltaRefused as exc:
        return DeltaResult.fallback(exc.why, str(exc).partition(": ")[2], received or exc.received)
    except (DigestMismatch, LengthMismatch) as exc:
        return DeltaResult.fallback(Fallback.WRONG_REBUILD, str(exc), received)
    except Unavailable as exc:
        return DeltaResult.fallback(Fallback.UNREACHABLE, str(exc), received)
    except CodedError as exc:  # the server refused in some other way: the full file may still come
        return DeltaResult.fallback(Fallback.NOT_FOUND, str(exc), received)
    except OSError as exc:
        if not is_disk_full(exc):
            raise
        # The patch is extra room the free-space check did not count; the full file needs none.
        rebuilt.unlink(missing_ok=True)
        return DeltaResult.fallback(Fallback.NO_ROOM, str(exc), received)
    finally:
        patch.unlink(missing_ok=True)
    os.replace(rebuilt, part)
    return DeltaResult(True, received, f"rebuilt from a {received}-byte delta against {base_sha256[:12]}")


async def download_delta(
    client: httpx.AsyncClient, url: str, dest: Path, *, max_bytes: int, device_id: str
) -> int:
    """GET a delta into ``dest``, refusing one longer than ``max_bytes`` (declared or streamed)."""
    async with client.stream("GET", url, headers={DEVICE_HEADER: device_id}) as resp:
        if resp.status_code != 200:  # no delta published for this pair: the usual case
            await discard(resp)
            raise DeltaRefused(Fallback.NOT_FOUND, f"GET {url}: HTTP {resp.status_code}")
        declared = resp.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise DeltaRefused(Fallback.TOO_LARGE, f"{declared} bytes declared, at most {max_bytes} wanted")
        n = 0
        with open(dest, "wb") as fh:
            async for chunk in resp.aiter_bytes(CHUNK):
                n += len(chunk)
                if n > max_bytes:
                    raise DeltaRefused(Fallback.TOO_LARGE, f"more than {max_bytes} bytes sent", n)
                fh.write(chunk)
    return n


@dataclass
class mapped:
    """A file's bytes, mapped read-only (file-backed pages the kernel may drop), as a memoryview.

    zstandard copies a dictionary into its own memory, so the map can close while the
    dictionary lives on.
    """

    path: Path

    def __enter__(self) -> memoryview:
        self._fh = open(self.path, "rb")
        size = os.fstat(self._fh.fileno()).st_size
        self._map = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size else None
        self._view = memoryview(self._map if self._map is not None else b"")
        return self._view

    def __exit__(self, *exc: object) -> None:
        self._view.release()
        if self._map is not None:
            self._map.close()
        self._fh.close()


__all__ = [
    "DeltaFetcher",
    "DeltaRefused",
    "DeltaResult",
    "Fallback",
    "delta_url",
    "download_delta",
    "install_from_delta",
    "mapped",
    "rebuild",
]
