"""The agent's default :class:`device_agent.ports.Fetcher`: HTTP(S) for bundles, python-tuf for metadata.

- envelopes and model files go through :mod:`device_agent.downloader` (bounded,
  resumable, hashed while streaming) on an httpx client;
- TUF mode's release metadata and root chain go through
  :mod:`device_agent.delivery` (python-tuf), fetched with the same TLS settings.

Every request goes through the fetcher's :class:`device_agent.http_clients.HttpClients`:
connection pools kept for the agent's life (closed by :meth:`HttpFetcher.aclose`,
which the agent calls when it stops), so an install's metadata, envelope and model
requests reuse one connection instead of opening one each.

HTTPS is verified against ``http_ca_file`` (the fleet's CA) or, when that is
unset, the system's trust store; a device with a client certificate
(``mqtt_cert_file``/``mqtt_key_file``) presents it to a server that asks. The
TLS context is built with the first pool's client, once (loading the system's trust
store costs ~10-30 ms of CPU) and kept by the fetcher, for its async and its
blocking pool alike. A plain ``http://`` URL (a mirror or cache on
the device's own network) needs no context at all: its client gets one that
trusts nothing, so that were it ever used for TLS (it is not: redirects are not
followed) verification would fail closed. The pools are keyed by these
settings, so a connection is only ever reused with the TLS identity it was
opened with.

httpx and python-tuf are imported on first use: an idle agent does not carry
them (~18 MB RSS).

Failures are named for the agent's retry rule (see :mod:`device_agent.ports`):
no answer at all is :class:`ServerUnreachable`, a busy proxy
:class:`ServerBusy` (both Unavailable), any other HTTP status a final
:class:`DownloadError`.
"""

from __future__ import annotations

import contextlib
import functools
import ssl
from collections.abc import AsyncIterator, Callable, Hashable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from device_agent.downloader import (
    ERROR_BODY_KEPT,
    DownloadError,
    ServerUnreachable,
    download_model,
    fetch_envelope,
)
from device_agent.http_clients import HttpClients

if TYPE_CHECKING:
    import httpx
    from tuf.ngclient import FetcherInterface

    from device_agent.config import AgentConfig
    from device_agent.trust_state import TrustStore
    from device_agent.wire import ModelRef
    from signing.errors import DeliveryError

PLAIN = "http"  # the pool key of plain-HTTP clients (their context trusts nothing)


@dataclass(frozen=True)
class HttpsSettings:
    """Which CA a server's certificate must chain to, and the client certificate to present."""

    ca_file: Path | None = None  # None: the system's trust store
    cert_file: Path | None = None
    key_file: Path | None = None

    def __post_init__(self) -> None:
        # Said when the agent is built, not at its first download hours later.
        for path in (self.ca_file, self.cert_file, self.key_file):
            if path is not None and not Path(path).is_file():
                raise ValueError(f"{path}: no such file (HTTPS settings)")

    def context(self) -> ssl.SSLContext:
        return _context(self)


@functools.cache
def _trusts_nothing() -> ssl.SSLContext:
    """For ``http://`` URLs, where httpx still wants a context: no CA, so any TLS use fails closed."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # CERT_REQUIRED and hostname checks on, no anchors
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


@functools.lru_cache(maxsize=8)
def _context(settings: HttpsSettings) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(settings.ca_file) if settings.ca_file else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if settings.cert_file is not None and settings.key_file is not None:
        ctx.load_cert_chain(str(settings.cert_file), str(settings.key_file))
    return ctx


class HttpFetcher:
    """Bundles over HTTP(S) with the device's header and TLS settings; TUF metadata through python-tuf.

    ``clients``: connection pools shared with other fetchers (closed by whoever made them);
    None: the fetcher's own, closed by :meth:`aclose`.
    """

    def __init__(
        self,
        device_id: str,
        https: HttpsSettings = HttpsSettings(),
        max_bytes_per_s: int = 0,
        *,
        clients: HttpClients | None = None,
    ) -> None:
        self.device_id = device_id
        self.https = https
        self.max_bytes_per_s = max_bytes_per_s  # bandwidth cap for model files (0: none)
        self.clients = clients or HttpClients()
        self._owns_clients = clients is None
        self._context: ssl.SSLContext | None = None

    def _verify(self, url: str) -> ssl.SSLContext:
        """The TLS context for ``url``: this device's, built once; none needed for plain HTTP."""
        if not url.lower().startswith("https:"):
            return _trusts_nothing()
        if self._context is None:
            self._context = self.https.context()
        return self._context

    def _pool(self, url: str) -> tuple[Hashable, Callable[[], ssl.SSLContext]]:
        """Which pool serves ``url`` (plain HTTP, or this device's TLS settings) and its context."""
        key = self.https if url.lower().startswith("https:") else PLAIN
        return key, lambda: self._verify(url)

    def _client(self, url: str) -> httpx.AsyncClient:
        return self.clients.async_client(*self._pool(url))

    async def aclose(self) -> None:
        """Close the fetcher's own connections (a shared pool is left to its owner). The agent
        calls it when it stops; a request after it opens a new connection."""
        if self._owns_clients:
            await self.clients.aclose()

    async def envelope(self, url: str) -> bytes:
        async with _named_errors():
            return await fetch_envelope(self._client(url), url, self.device_id)

    async def model(self, url: str, part: Path, *, length: int, sha256: str) -> None:
        async with _named_errors():
            await download_model(
                self._client(url),
                url,
                part,
                length=length,
                sha256=sha256,
                device_id=self.device_id,
                max_bytes_per_s=self.max_bytes_per_s,
            )

    async def delta(self, url: str, dest: Path, *, max_bytes: int) -> int:
        """A delta (device_agent.delta), bounded by ``max_bytes``; its bytes are checked by the rebuild."""
        from device_agent.delta import download_delta

        async with _named_errors():
            return await download_delta(
                self._client(url), url, dest, max_bytes=max_bytes, device_id=self.device_id
            )

    def release(
        self, store: TrustStore, base_url: str, ref: ModelRef, hardware_id: str, now: datetime
    ) -> None:
        from device_agent.delivery import verify_release

        verify_release(store, base_url, ref, hardware_id, now, fetcher=self._tuf_fetcher(base_url))

    def root(self, store: TrustStore, base_url: str, now: datetime) -> DeliveryError | None:
        from device_agent.delivery import refresh_root

        return refresh_root(store, base_url, now, fetcher=self._tuf_fetcher(base_url))

    def _tuf_fetcher(self, base_url: str) -> FetcherInterface:
        """python-tuf's fetcher over this device's blocking pool (python-tuf runs in a worker thread)."""
        return _tuf_fetcher_type()(self.clients.sync_client(*self._pool(base_url)))


def fetcher_for(config: AgentConfig, clients: HttpClients | None = None) -> HttpFetcher:
    """The fetcher an agent with ``config`` downloads through (its TLS settings and bandwidth cap);
    ``clients``: pools shared with other agents (None: its own)."""
    return HttpFetcher(
        config.device_id,
        HttpsSettings(config.http_ca_file, config.mqtt_cert_file, config.mqtt_key_file),
        max_bytes_per_s=config.download_max_bytes_per_s,
        clients=clients,
    )


@contextlib.asynccontextmanager
async def _named_errors() -> AsyncIterator[None]:
    """httpx's exceptions as the fetcher contract names them."""
    import httpx

    try:
        yield
    except httpx.TransportError as exc:
        raise ServerUnreachable(f"{type(exc).__name__}: {exc}") from exc
    except httpx.HTTPError as exc:
        raise DownloadError(f"{type(exc).__name__}: {exc}") from exc


def _discard(resp: httpx.Response) -> None:
    """Read a short error body and close ``resp``: the connection then goes back to the pool.

    python-tuf asks for the next root on every update, and until a rotation that is a 404:
    closed unread, it took its connection with it. A longer body (or a broken one) is not
    read on: closing then drops the connection, as before.
    """
    import httpx

    try:
        got = 0
        for chunk in resp.iter_bytes():
            got += len(chunk)
            if got > ERROR_BODY_KEPT:
                break
    except httpx.HTTPError:
        pass
    finally:
        resp.close()


@functools.cache
def _tuf_fetcher_type() -> Callable[[httpx.Client], FetcherInterface]:
    """The class, built on first use: python-tuf is imported only by agents in TUF mode."""
    import httpx
    from tuf.api import exceptions
    from tuf.ngclient import FetcherInterface

    class HttpxTufFetcher(FetcherInterface):
        def __init__(self, client: httpx.Client) -> None:
            self.client = client

        def _fetch(self, url: str) -> Iterator[bytes]:
            # Errors raised here (no connection, TLS refused) become python-tuf DownloadErrors in fetch().
            resp = self.client.send(self.client.build_request("GET", url), stream=True)
            if resp.status_code >= 400:
                _discard(resp)
                raise exceptions.DownloadHTTPError(f"GET {url}: HTTP {resp.status_code}", resp.status_code)
            return self._chunks(resp)

        @staticmethod
        def _chunks(resp: httpx.Response) -> Iterator[bytes]:
            try:
                yield from resp.iter_bytes()
            except httpx.HTTPError as exc:
                raise exceptions.DownloadError(f"{type(exc).__name__}: {exc}") from exc
            finally:
                resp.close()

    return HttpxTufFetcher


__all__ = ["HttpFetcher", "HttpsSettings", "fetcher_for"]
