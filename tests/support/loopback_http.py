"""One real HTTP(S) server on loopback for tests: artifact and TUF delivery, webhooks, uploads.

Every test server is a ``ThreadingHTTPServer`` on ``127.0.0.1`` with a port the kernel
picks (xdist workers never collide), handler threads that do not keep the process alive,
a short shutdown poll and a ``close`` that releases the socket and the serving thread, so
a module that starts many servers leaves no descriptors behind.
"""

from __future__ import annotations

import functools
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Self

# serve_forever's poll between shutdown checks: close() returns within this
POLL_S = 0.05


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler that keeps the access log off the test output."""

    def log_message(self, format: str, *args: Any) -> None:
        pass


class QuietFiles(QuietHandler, SimpleHTTPRequestHandler):
    """Static files from a directory (pass ``directory=``), without the access log."""


class LoopbackServer:
    """``handler`` served on ``127.0.0.1:port`` (0: a free one) from a daemon thread until ``close``.

    With ``tls`` the listening socket speaks HTTPS (the context decides whether client
    certificates are asked for). Usable as a context manager.
    """

    def __init__(
        self,
        handler: Callable[..., BaseHTTPRequestHandler],
        *,
        port: int = 0,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
        self.httpd.daemon_threads = True
        if tls is not None:
            self.httpd.socket = tls.wrap_socket(self.httpd.socket, server_side=True)
        self.port: int = self.httpd.server_address[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.httpd.serve_forever, args=(POLL_S,), daemon=True)
        self._thread.start()
        self._closed = False

    def close(self) -> None:
        """Stop serving and release the port (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(5)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def file_server(root: Path, tls: ssl.SSLContext | None = None) -> LoopbackServer:
    """The files under ``root`` (a TUF repository, bundles) served over real HTTP(S) until ``close``."""
    return LoopbackServer(functools.partial(QuietFiles, directory=str(root)), tls=tls)


@contextmanager
def serve_directory(root: Path, tls: ssl.SSLContext | None = None) -> Iterator[str]:
    """``file_server`` for the ``with`` block; yields its URL."""
    with file_server(root, tls) as server:
        yield server.url
