"""Mirrors: the places a device downloads from, in order, and when to go on to the next one.

A mirror is the base URL of a published tree (``fleet_server.mirror``): any static web
server or CDN. The device composes every URL from the directive's hash, name and version,
so the fleet server is in the download path only if it is listed itself:

- TUF metadata: ``<mirror>/metadata/`` (python-tuf's ``metadata_base_url``);
- a TUF-released model file: ``<mirror>/targets/models/<name>/<sha256>.<version>``;
- without TUF: ``<mirror>/bundles/<sha256>/model``;
- the bundle envelope: ``<mirror>/bundles/<sha256>/envelope``, its other files
  ``<mirror>/bundles/<sha256>/files/<name>``.

Failover (:func:`first_of`): a mirror that is down, answers with an error, or delivers
something refused (TUF metadata that is expired, rolled back or inconsistent; bytes with
the wrong hash or length) is passed over for the next. Nothing is trusted for having come
from a mirror, so trying another is always safe: a refusal is about the copy, and another
copy may be good. The outcome when none delivered (:func:`verdict`) keeps the agent's
retry rule: every mirror refused -> the first refusal (final, its reason code is
reported); any mirror out of reach -> :class:`MirrorsUnavailable` (retried; when the
retry budget runs out the refusal it carries, if any, is what the device reports).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, TypeVar
from urllib.parse import quote, urlsplit

from signing.errors import CodedError, DeliveryUnavailable, TrustError

if TYPE_CHECKING:
    from device_agent.wire import ModelRef

log = logging.getLogger(__name__)

_R = TypeVar("_R")


class MirrorsUnavailable(DeliveryUnavailable):
    """No mirror delivered and at least one could not be asked (down, busy, HTTP error): retry.

    ``refusal``: what a mirror that answered refused, reported instead once retrying is over.
    """

    def __init__(self, message: str, refusal: TrustError | None = None) -> None:
        super().__init__(message)
        self.refusal = refusal


def check_mirrors(urls: Sequence[str]) -> list[str]:
    """The configured mirrors, without trailing slashes; a clear error for one that is not a base URL."""
    out = []
    for url in urls:
        parts = urlsplit(str(url))
        if parts.scheme not in ("http", "https") or not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"a mirror is an http(s):// base URL, got {url!r}")
        out.append(str(url).rstrip("/"))
    if len(set(out)) != len(out):
        raise ValueError("a mirror is listed twice")
    return out


# Where the TUF repository is, kept apart from the TUF code (``device_agent.delivery``): a device
# without TUF asks it too (where deltas are looked up), and importing python-tuf costs a device
# a good part of its start-up CPU.
ARTIFACTS_PATH = "/api/v1/artifacts/"
TUF_PATH = "/tuf"


def repository_url(configured: str, ref: ModelRef | None) -> str:
    """The repository base URL (``<base>/metadata/`` holds the metadata).

    The agent's ``tuf_url`` wins; else it is derived from the directive's model
    URL on a fleet server (``<origin>/api/v1/artifacts/...`` -> ``<origin>/tuf``).
    Where the URL comes from does not matter for safety: every byte fetched from
    it is verified against the root the device already trusts.
    """
    if configured:
        return configured.rstrip("/")
    if ref is not None:
        parts = urlsplit(ref.model_url)
        prefix, sep, _ = parts.path.partition(ARTIFACTS_PATH)
        if sep:
            return f"{parts.scheme}://{parts.netloc}{prefix}{TUF_PATH}"
    return ""


def metadata_base(mirror: str) -> str:
    """The repository base the TUF code takes (it appends ``/metadata/``)."""
    return mirror


def envelope_url(mirror: str, sha256: str) -> str:
    return f"{mirror}/bundles/{sha256}/envelope"


def model_url(mirror: str, sha256: str) -> str:
    return f"{mirror}/bundles/{sha256}/model"


def bundle_file_url(mirror: str, sha256: str, name: str) -> str:
    return f"{mirror}/bundles/{sha256}/files/{quote(name)}"


def target_url(mirror: str, target: str, sha256: str) -> str:
    """A TUF target under its consistent-snapshot name (``<dir>/<sha256>.<basename>``)."""
    dirname, _, basename = target.rpartition("/")
    path = f"{dirname}/{sha256}.{basename}" if dirname else f"{sha256}.{basename}"
    return f"{mirror}/targets/{quote(path)}"


def verdict(failures: Sequence[tuple[str, CodedError]]) -> CodedError:
    """The error to raise when no source delivered (see the module doc); one source: its own error."""
    if len(failures) == 1:
        return failures[0][1]
    refusals = [exc for _, exc in failures if isinstance(exc, TrustError)]
    if refusals and len(refusals) == len(failures):
        return refusals[0]
    detail = "; ".join(f"{where}: {exc.code}: {exc}" for where, exc in failures)
    return MirrorsUnavailable(f"no mirror delivered ({detail})", refusal=refusals[0] if refusals else None)


async def first_of(
    sources: Sequence[str], call: Callable[[str], Awaitable[_R]], *, who: str, what: str
) -> _R:
    """``call(source)`` for each source in order until one succeeds; else raise :func:`verdict`."""
    if not sources:
        raise DeliveryUnavailable(f"no source to {what} from")
    failures: list[tuple[str, CodedError]] = []
    for source in sources:
        try:
            return await call(source)
        except CodedError as exc:
            if len(sources) > 1:
                log.info("%s: %s from %s failed (%s: %s)", who, what, source, exc.code, exc)
            failures.append((source, exc))
    raise verdict(failures)


__all__ = [
    "ARTIFACTS_PATH",
    "TUF_PATH",
    "MirrorsUnavailable",
    "bundle_file_url",
    "check_mirrors",
    "envelope_url",
    "first_of",
    "metadata_base",
    "model_url",
    "repository_url",
    "target_url",
    "verdict",
]
