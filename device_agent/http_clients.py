"""The HTTP connection pools a fetcher downloads through, kept for the agent's life.

An install asks one or two places several times: python-tuf's four metadata
requests, the bundle envelope, the golden set, the model file. A client per
request paid for a new httpx client, TCP connection and TLS handshake each
time (a simulated fleet spent a large share of its install CPU on that); a
pool that outlives the request keeps the connection open and reuses it.

One :class:`HttpClients` belongs to one agent (the default, closed when the
agent stops), or is shared by several fetchers that pass it in (its maker
closes it). Clients are keyed by what makes a connection safe to share: the
TLS settings it was opened with (the CA it verifies against, the client
certificate it presents), or plain HTTP. Nothing else about a request is in
the pool: the device header goes with each request, redirects are not
followed, and no cookie is ever kept (a shared pool must not carry one
device's cookie on another's request; a fresh client per request never did).

The simulator does not share one pool between its agents: httpcore walks every
connection of a pool (a ``poll`` on each idle one, and a quadratic count of
the idle ones) whenever a request enters or leaves it, so one pool for a
process's hundreds of concurrently installing devices cost more CPU per install
than a small pool each (``bench.install_fetch --shared``).

Two kinds of client, because the fetcher works from two places:

- async (envelopes, models, deltas) on the agent's event loop. An
  ``httpx.AsyncClient``'s connections belong to the loop that opened them, so
  a client is kept per loop: a call from another loop (a second
  ``asyncio.run``) gets a new one.
- sync (python-tuf, which the agent runs in a worker thread). httpcore's sync
  pool guards its state with a thread lock, so concurrent threads (a root
  refresh beside a release check) may share it.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported on first use: httpx costs ~18 MB RSS, paid only when downloading
    import ssl
    from collections.abc import Callable, Hashable
    from http.cookiejar import CookieJar

    import httpx

TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
# Below the servers' own idle timeouts (uvicorn 5 s, nginx 75 s): a connection the server may
# be closing just then is not reused (that race ends in "server disconnected", a retry).
KEEPALIVE_EXPIRY_S = 4.0


@functools.cache
def default_verify_context() -> ssl.SSLContext:
    """httpx's default verifying context (the CA bundle, or ``SSL_CERT_FILE``/``SSL_CERT_DIR``),
    built once per process for the clients that talk to a server's API (the CLI, the simulator).
    httpx builds one for every client it is not handed one, parsing the whole CA bundle (~20 ms of
    CPU) even for a plain ``http://`` server. (The fleet server keeps its own twin,
    ``fleet_server.tls_context``: of this package it imports only the wire protocol.)"""
    import httpx

    return httpx.create_ssl_context()


def _no_cookies() -> CookieJar:
    """A jar that accepts no cookie (every domain is outside ``allowed_domains``)."""
    from http.cookiejar import CookieJar, DefaultCookiePolicy  # with httpx, which needs it too

    return CookieJar(policy=DefaultCookiePolicy(allowed_domains=[]))


def _options(verify: ssl.SSLContext) -> dict[str, object]:
    import httpx

    return {
        "verify": verify,
        "timeout": httpx.Timeout(TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
        # No cap on connections (a client per request had none): a request never waits for the pool.
        "limits": httpx.Limits(max_connections=None, keepalive_expiry=KEEPALIVE_EXPIRY_S),
        "cookies": _no_cookies(),
        "follow_redirects": False,
    }


class HttpClients:
    """httpx clients by TLS settings: async ones per event loop, sync ones for worker threads."""

    def __init__(self) -> None:
        self._async: dict[Hashable, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = {}
        self._sync: dict[Hashable, httpx.Client] = {}
        self._lock = threading.Lock()  # sync clients are asked for from worker threads

    def async_client(self, key: Hashable, verify: Callable[[], ssl.SSLContext]) -> httpx.AsyncClient:
        """The client for ``key`` on the running loop; ``verify`` builds its TLS context when new."""
        import httpx

        loop = asyncio.get_running_loop()
        held = self._async.get(key)
        if held is not None and held[0] is loop:
            return held[1]
        # None yet, or one opened on a loop that is gone: its connections cannot be used here.
        client = httpx.AsyncClient(**_options(verify()))  # type: ignore[arg-type]
        self._async[key] = (loop, client)
        return client

    def sync_client(self, key: Hashable, verify: Callable[[], ssl.SSLContext]) -> httpx.Client:
        """The blocking client for ``key`` (python-tuf's requests); safe to call from any thread."""
        import httpx

        with self._lock:
            client = self._sync.get(key)
            if client is None:
                client = self._sync[key] = httpx.Client(**_options(verify()))  # type: ignore[arg-type]
            return client

    async def aclose(self) -> None:
        """Close every connection. Call on the loop the async clients ran on; usable again after
        (a client is opened anew on the next request)."""
        with self._lock:
            sync, self._sync = list(self._sync.values()), {}
        held, self._async = list(self._async.values()), {}
        for client in sync:
            client.close()
        loop = asyncio.get_running_loop()
        for owner, aclient in held:
            if owner is loop:
                await aclient.aclose()
            elif not owner.is_closed():  # its own loop still runs: close it there
                with contextlib.suppress(RuntimeError):
                    asyncio.run_coroutine_threadsafe(aclient.aclose(), owner)

    @property
    def open_clients(self) -> int:
        """How many clients are held (one per TLS setting and kind in use)."""
        return len(self._async) + len(self._sync)


__all__ = ["CONNECT_TIMEOUT_S", "KEEPALIVE_EXPIRY_S", "TIMEOUT_S", "HttpClients"]
