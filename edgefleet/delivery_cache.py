"""A caching nginx in front of the fleet server's delivery paths, the way a CDN or an edge cache sits.

Everything a device downloads to install a model is public and verified on the
device (TUF metadata against the root it trusts, bundle bytes against signed
hashes), and all of it but one file is immutable under its name:

- ``/tuf/metadata/N.root.json``, ``N.snapshot.json``, ``N.targets.json``:
  consistent snapshots, a version never changes its bytes;
- ``/api/v1/artifacts/<sha256>`` (and its ``/envelope`` and ``/files/<name>``):
  named by the model file's hash.

So a cache answers them for as long as it keeps them, and collapses the first
misses of a thousand devices into one request to the server
(``proxy_cache_lock``). ``timestamp.json`` is the one file that changes in
place: it is cached for :data:`TIMESTAMP_TTL_S`, which is what bounds how stale
a device's view of the repository can be (well inside the timestamp's expiry,
so freeze protection is unchanged: a device still refuses an expired one). A
missing root (``N+1.root.json``, the probe every TUF update makes) is cached
for :data:`MISSING_TTL_S`: a rotated root reaches the fleet that much later.

Without the cache the fleet server answers about seven requests per install
(timestamp, snapshot, targets, the root probe, envelope, model, golden set);
with it, a few per release. ``DELIVERY_LOCATIONS`` is the one home of these
rules: ``deploy/nginx.conf`` carries the same block (a test compares them) and
the simulator starts a real nginx with it (:func:`start_delivery_cache`).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

TIMESTAMP_TTL_S = 1
MISSING_TTL_S = 5
IMMUTABLE_TTL = "1h"

# Inside an nginx ``server {}`` whose ``upstream fleet_server`` is the fleet server; needs the
# ``delivery`` cache zone (``proxy_cache_path ... keys_zone=delivery:10m``) at the http level.
DELIVERY_LOCATIONS = f"""\
    # Delivery: public, verified on the device, immutable under its name (consistent TUF
    # snapshots, artifacts named by their sha256): cached, first misses collapsed into one.
    location ~ ^/tuf/metadata/[0-9]+\\.(root|snapshot|targets)\\.json$ {{
        proxy_pass http://fleet_server;
        proxy_cache delivery;
        proxy_cache_valid 200 {IMMUTABLE_TTL};
        proxy_cache_valid 404 {MISSING_TTL_S}s;
        proxy_cache_lock on;
        add_header X-Cache $upstream_cache_status;
    }}
    location ~ "^/api/v1/artifacts/[0-9a-f]{{64}}(/envelope|/files/[^/]+)?$" {{
        proxy_pass http://fleet_server;
        proxy_cache delivery;
        proxy_cache_valid 200 {IMMUTABLE_TTL};
        proxy_cache_lock on;
        add_header X-Cache $upstream_cache_status;
    }}
    # The one file that changes in place: a device sees the repository at most this stale.
    location = /tuf/metadata/timestamp.json {{
        proxy_pass http://fleet_server;
        proxy_cache delivery;
        proxy_cache_valid 200 {TIMESTAMP_TTL_S}s;
        proxy_cache_lock on;
        proxy_cache_use_stale updating;
        add_header X-Cache $upstream_cache_status;
    }}
"""

_CONF = """\
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
{user}
worker_rlimit_nofile {nofile};
events {{
    worker_connections {connections};
}}
http {{
    log_format delivery '$request_method $uri $status $body_bytes_sent $upstream_cache_status';
    access_log {dir}/access.log delivery buffer=64k flush=1s;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    proxy_cache_path {dir}/cache levels=1:2 keys_zone=delivery:10m max_size=1g inactive=1h use_temp_path=off;
    keepalive_requests 10000;
    upstream fleet_server {{
        server {upstream};
        keepalive 16;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        proxy_http_version 1.1;
        proxy_set_header Connection "";
        proxy_set_header Host $host;
        proxy_read_timeout 300s;
{locations}
        location / {{
            proxy_pass http://fleet_server;
        }}
    }}
}}
"""


@dataclass
class DeliveryCache:
    """A running nginx: ``url`` is what devices are given, ``access_log`` one line per request."""

    url: str
    port: int
    workdir: Path
    process: subprocess.Popen[bytes]

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def access_log(self) -> Path:
        return self.workdir / "access.log"

    def stop(self) -> None:
        proc = self.process
        if proc.poll() is None:
            proc.terminate()  # nginx: SIGTERM is a fast shutdown
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def render_conf(workdir: Path, port: int, upstream: str, connections: int = 16384) -> str:
    """The whole nginx configuration of a delivery cache in ``workdir`` proxying to ``upstream``."""
    return _CONF.format(
        dir=workdir,
        port=port,
        upstream=upstream,
        locations=_indent(DELIVERY_LOCATIONS, 4),
        # as root nginx would hand its workers to ``nobody``, who cannot write a private workdir
        user="user root;" if os.geteuid() == 0 else "",
        nofile=connections * 2 + 64,
        connections=connections,
    )


def start_delivery_cache(
    workdir: Path, upstream_port: int, port: int | None = None, timeout: float = 10.0
) -> DeliveryCache:
    """Start nginx as a delivery cache on ``port`` (default: a free one) in front of the server
    on ``127.0.0.1:upstream_port``. Raises ``FileNotFoundError`` without nginx (Debian: ``nginx``)."""
    from edgefleet.broker import free_port

    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (Debian: apt-get install nginx)")
    workdir = Path(workdir).resolve()
    for sub in ("tmp", "cache"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(render_conf(workdir, port, f"127.0.0.1:{upstream_port}"))
    proc = subprocess.Popen(
        [binary, "-p", str(workdir), "-c", str(conf), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=open(workdir / "nginx.stderr", "ab"),  # noqa: SIM115 - handed to the child
    )
    cache = DeliveryCache(f"http://127.0.0.1:{port}", port, workdir, proc)
    deadline = time.monotonic() + timeout
    import socket

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            why = (workdir / "nginx.stderr").read_text(errors="replace")[-1000:]
            raise RuntimeError(f"nginx exited at startup: {why}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return cache
        time.sleep(0.05)
    cache.stop()
    raise TimeoutError(f"nginx did not listen on {port} within {timeout}s")


def read_access_log(path: Path) -> list[tuple[str, str, int, int, str]]:
    """(method, path, status, body bytes, cache status) per request nginx logged."""
    out: list[tuple[str, str, int, int, str]] = []
    with contextlib.suppress(FileNotFoundError), open(path, errors="replace") as fh:
        for line in fh:
            parts = line.split()
            if len(parts) == 5 and parts[2].isdigit() and parts[3].isdigit():
                out.append((parts[0], parts[1], int(parts[2]), int(parts[3]), parts[4]))
    return out


def _indent(text: str, n: int) -> str:
    return "".join((" " * n + line if line.strip() else line) for line in text.splitlines(keepends=True))


__all__ = [
    "DELIVERY_LOCATIONS",
    "DeliveryCache",
    "nginx_binary",
    "read_access_log",
    "render_conf",
    "start_delivery_cache",
]
