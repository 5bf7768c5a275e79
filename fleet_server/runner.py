"""Run the server: in a background thread (demo, tests) or in the foreground (``edgefleet server``).

HTTPS is an option on both (``tls_cert``/``tls_key``: uvicorn's ``ssl_certfile``/``ssl_keyfile``);
the default public URL devices download from then follows the scheme and the port.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from uvicorn.server import STARTUP_FAILURE

from fleet_server.app import create_app
from fleet_server.context import ServerContext
from fleet_server.logs import uvicorn_log_config
from fleet_server.settings import ServerSettings
from fleet_server.tls_context import default_verify_context
from signing.keys import KeyPair


class ServerThread:
    """uvicorn in a thread. ``start()`` returns once ``/healthz`` answers; ``url`` is its base URL.

    With ``port=0`` a free port is picked before starting, so ``url`` is known up
    front; when ``settings.public_url`` was not set explicitly it becomes ``url``. ``sock``: serve
    on that bound socket instead (its address replaces ``host`` and ``port``; uvicorn closes it
    when the server stops, so hand over a ``dup()`` of a socket that must outlive the server).
    """

    def __init__(
        self,
        settings: ServerSettings,
        host: str = "127.0.0.1",
        port: int = 0,
        tls_cert: Path | None = None,
        tls_key: Path | None = None,
        sock: socket.socket | None = None,
    ) -> None:
        options = tls_options(tls_cert, tls_key)
        self.settings = settings
        self.host = host
        self.tls_cert = tls_cert
        # port=0: bind a free port now and hand uvicorn the bound socket, so nothing can take
        # the port between choosing it and listening on it (a test once lost that race)
        self._socket: socket.socket | None = sock
        if sock is not None:
            host, port = sock.getsockname()[:2]
            self.host = host
        elif not port:
            self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, 0))
            port = int(self._socket.getsockname()[1])
        self.port = port
        if "public_url" not in settings.model_fields_set:
            # devices must reach this server: default the download base to where it listens
            settings = settings.model_copy(update={"public_url": self.url})
            self.settings = settings
        self.app = create_app(settings)
        # log_config=None: a server on a thread of someone else's program leaves that program's
        # logging as it is; uvicorn's default would replace every handler of the process and bind
        # its own to whatever sys.stderr and sys.stdout are at this moment (in a test, a capture
        # closed when the test ends). Its records go to the program's handlers instead.
        config = uvicorn.Config(
            self.app,
            host=host,
            port=self.port,
            log_level="warning",
            log_config=None,
            lifespan="on",
            **options,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return base_url(self.host, self.port, self.tls_cert is not None)

    @property
    def admin_token(self) -> str:
        """The bootstrap admin token (``settings.admin_token`` or ``<data_dir>/admin.token``)."""
        return self.context.admin_token

    @property
    def context(self) -> ServerContext:
        ctx: ServerContext = self.app.state.ctx
        return ctx

    def start(self, timeout: float = 15.0) -> ServerThread:
        sockets = [self._socket] if self._socket is not None else None
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": sockets}, name="ef-uvicorn", daemon=True
        )
        self._thread.start()
        deadline = time.monotonic() + timeout
        # One client for the whole wait: a new one per poll loads the CA bundle into a new TLS
        # context each time (~20 ms of CPU, every 50 ms, beside the server starting on the same GIL).
        with httpx.Client(timeout=1.0, verify=self._verify()) as probe:
            while time.monotonic() < deadline:
                if not self._thread.is_alive():
                    raise RuntimeError("the server thread exited during startup")
                try:
                    if probe.get(f"{self.url}/healthz").status_code == 200:
                        return self
                except httpx.HTTPError:
                    pass
                time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"server did not answer /healthz within {timeout}s")

    def wait_subscribed(self, timeout: float) -> bool:
        """Whether the bridge, its ingest workers included, has every subscription within ``timeout``.

        ``start`` returns once the API answers, which may be before: a device that publishes
        meanwhile on clean sessions loses what it sent (the broker has no subscriber to give it to).
        """
        bridge = self.context.bridge
        return bridge is not None and bridge.subscribed.wait(timeout)

    def _verify(self) -> ssl.SSLContext:
        """The readiness probe trusts exactly the certificate this server was given (a leaf: partial
        chain), whoever issued it."""
        if self.tls_cert is None:
            return default_verify_context()
        ctx = ssl.create_default_context(cafile=str(self.tls_cert))
        ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
        return ctx

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(15)

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def tls_options(tls_cert: Path | None, tls_key: Path | None) -> dict[str, Any]:
    """uvicorn's TLS options; a certificate and its key go together."""
    if (tls_cert is None) != (tls_key is None):
        raise ValueError("HTTPS needs both a certificate and its key")
    if tls_cert is None or tls_key is None:
        return {}
    for path in (tls_cert, tls_key):
        if not Path(path).is_file():
            raise ValueError(f"{path}: no such file")
    return {"ssl_certfile": str(tls_cert), "ssl_keyfile": str(tls_key)}


def base_url(host: str, port: int, tls: bool) -> str:
    """Where this server is reached: its scheme, address (a wildcard bind is given as loopback) and port."""
    shown = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    if ":" in shown:
        shown = f"[{shown}]"
    return f"{'https' if tls else 'http'}://{shown}:{port}"


def main(
    settings: ServerSettings | None = None,
    host: str = "0.0.0.0",
    port: int = 8080,
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    fd: int | None = None,
    before_serve: Callable[[], bool] | None = None,
    fleet_key: KeyPair | None = None,
) -> None:
    """Foreground server for the ``edgefleet server`` command. Unless ``public_url`` was set, devices
    are sent to this server's own scheme and port.

    ``fd``: serve on that inherited, already bound TCP socket (its address replaces ``host`` and
    ``port``): whoever started this process held the port from choosing it, through these imports.

    ``before_serve``: called once the app is built (imports, schema check, keys, TUF metadata) and
    before it serves; ``False`` ends the process without serving. A parent that starts the next
    server while the current one still serves waits there for its turn (``ServerProcess``).

    ``fleet_key``: the fleet key the caller loaded (``edgefleet server`` does, before importing the
    server, so a locked key is reported at once); else the app loads it."""
    settings = settings or ServerSettings()
    options = tls_options(tls_cert, tls_key)
    sock: socket.socket | None = None
    if fd is not None:
        sock = socket.socket(fileno=fd)  # family and type read from the descriptor
        host, port = sock.getsockname()[:2]
    if "public_url" not in settings.model_fields_set:
        settings = settings.model_copy(update={"public_url": base_url(host, port, bool(options))})
    app = create_app(settings, fleet_key)
    if before_serve is not None and not before_serve():
        return
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_config=uvicorn_log_config(settings.log_format),
        access_log=False,
        **options,
    )
    server = uvicorn.Server(config)
    # what uvicorn.run does for one worker without reload, plus the inherited socket
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock] if sock is not None else None)
    if not server.started:
        sys.exit(STARTUP_FAILURE)
