"""The one verifying TLS context this process's outgoing HTTP clients share.

httpx builds a new context for every client it is not handed one, parsing the whole CA bundle each
time (~20 ms of CPU); a server starts clients for its alert loop and its own readiness probe, and a
process may run many servers (replicas, tests). The context is httpx's default (the CA bundle, or
``SSL_CERT_FILE``/``SSL_CERT_DIR``), built once on first use: ``ssl.SSLContext`` is safe to share
between threads and clients. Never change it (``http2=True`` or ``cert=`` would, for every client).
The CLI and the simulator share ``device_agent.http_clients.default_verify_context``, its twin:
the server imports of the agent's package only its wire protocol.
"""

from __future__ import annotations

import functools
import ssl

import httpx


@functools.cache
def default_verify_context() -> ssl.SSLContext:
    """httpx's default verifying context, built once per process."""
    return httpx.create_ssl_context()


__all__ = ["default_verify_context"]
