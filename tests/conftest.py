"""Shared fixtures: a real Mosquitto per test session, a real PostgreSQL database, fresh keys.

The session's Mosquitto runs the production configuration (``edgefleet broker config``: TLS
only, per-device client certificates, the per-device ACL, the server listener), so every test
on it speaks as a device or as the server the way the product does (``tests/mqtt_clients.py``,
``edgefleet.broker.device_mqtt_keys``). mTLS is the session's mode because a device needs no
broker reload to join; ``tests/security`` covers password mode too.

Tests that need a service skip with the reason when it is not on this machine;
everything else runs on the embedded defaults.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import socket
import sys
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import settings

from edgefleet.broker import Broker, BrokerInfo, mosquitto_binary, start_secure_broker
from edgefleet.ports import bound_socket
from signing.keyring import KeyDir, init_keys
from tests.support.descriptors import PROC_FDS, FileDescriptorLeak, open_fds
from tests.support.std_streams import damage, is_closed, std_streams

# --probe-times=PATH: per-test wall time and CPU (tests/support/timing_probe.py).
pytest_plugins = ["tests.support.timing_probe"]

PG_ADMIN_URL = os.environ.get("EDGEFLEET_TEST_PG", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
# More descriptors than this left open by one module is reported: a session fixture a module
# starts first (the session broker, PostgreSQL) keeps a few for the session's lifetime.
FD_LEAK_ALLOWANCE = 4
# Under qemu-user emulation (make test-arm64 sets this) an example runs 5-20x slower, so
# Hypothesis's per-example deadline measures the emulator, not the code.
settings.register_profile("emulated", deadline=None)
if os.environ.get("EDGEFLEET_EMULATED"):
    settings.load_profile("emulated")


# Numerical libraries start a thread per core in every process by default (OpenBLAS, OpenMP, MKL).
# The suite runs more worker processes than cores, plus servers, agents and compilers beside them,
# and OpenBLAS's threads spin while they wait for work: on two busy cores, training the digits MLP
# with 64 hidden units took 14 s of CPU with two BLAS threads and 1.3 s with one.
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


def pytest_configure(config: pytest.Config) -> None:
    """One BLAS thread per process unless the environment says otherwise: set before any test
    module imports numpy, and inherited by the xdist workers and every process a test starts."""
    for var in BLAS_THREAD_VARS:
        os.environ.setdefault(var, "1")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Hand the ``slow`` tests out first: on a few workers, a minute-long test started last
    is the suite's tail, while short tests fill the gaps around the long ones."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: keeps file order


def pytest_collection_finish(session: pytest.Session) -> None:
    """Move what the imports and the collection built (modules, fixtures, the test items) out of
    the collector's sight: it lives for the whole session, and every automatic full collection
    would walk it again."""
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="module", autouse=True)
def fd_leak_check(request: pytest.FixtureRequest) -> Iterator[None]:
    """Warn (``FileDescriptorLeak``) when a test module ends with more descriptors open than it
    began with, naming what they point at, so a leaking fixture is found before it starves a
    long serial session."""
    if not os.path.isdir(PROC_FDS):
        yield
        return
    before = open_fds()
    yield
    after = open_fds()
    if len(after) - len(before) > FD_LEAK_ALLOWANCE:
        # Descriptors of objects dropped but not yet finalised are not leaks. A full collection
        # costs seconds in a worker whose heap holds a session's models, so it runs only when
        # the count says there may be something to report, and only after the young generations'
        # collection (milliseconds: what the module just dropped is mostly young) left it so.
        gc.collect(1)
        after = open_fds()
        if len(after) - len(before) > FD_LEAK_ALLOWANCE:
            gc.collect()
            after = open_fds()
    new = sorted(target for fd, target in after.items() if before.get(fd) != target)
    if len(after) - len(before) > FD_LEAK_ALLOWANCE:
        kinds: dict[str, int] = {}
        for target in new:
            kind = (
                target.split(":", 1)[0] if target.startswith(("socket:", "pipe:", "anon_inode:")) else target
            )
            kinds[kind] = kinds.get(kind, 0) + 1
        summary = ", ".join(f"{n} x {k}" for k, n in sorted(kinds.items(), key=lambda kv: -kv[1]))
        warnings.warn(
            FileDescriptorLeak(
                f"{request.node.nodeid}: {len(after) - len(before)} more file descriptors open after "
                f"the module ({len(before)} -> {len(after)}): {summary}"
            ),
            stacklevel=1,
        )


def sigint_as_set() -> tuple[object, frozenset[int]]:
    """SIGINT's disposition in this process and the signals this thread blocks."""
    return signal.getsignal(signal.SIGINT), frozenset(signal.pthread_sigmask(signal.SIG_BLOCK, []))


@pytest.fixture(autouse=True)
def sigint_left_as_found() -> Iterator[None]:
    """Fail the test that leaves SIGINT handled otherwise (ignored, or by a handler of the code under
    test) or any signal blocked: both pass to every later test in this worker, and an ignored or
    blocked SIGINT passes through ``exec`` into the processes they start, which then never see
    Ctrl-C. Autouse in the root conftest, it is set up before the test's other function-scoped
    fixtures and torn down after them, so it catches what they leave too. (A suite started with
    SIGINT ignored, as a shell without job control starts a command run with ``&``, passes: only a
    change made during a test fails it.)"""
    before = sigint_as_set()
    yield
    after = sigint_as_set()
    if after != before:
        if before[0] is not None:  # None: set outside Python, nothing Python can put back
            signal.signal(signal.SIGINT, before[0])  # type: ignore[arg-type]
        signal.pthread_sigmask(signal.SIG_SETMASK, before[1])
        pytest.fail(
            f"the test left SIGINT's handler or the signal mask changed: {before} -> {after} "
            "(restore them where they are set)",
            pytrace=False,
        )


@pytest.fixture(autouse=True)
def std_streams_left_as_found(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test that leaves ``sys.stdout`` or ``sys.stderr`` closed or replaced (itself, or a
    thread it started: a redirect that outlives the test, a log handler's stream closed): between
    tests they are pytest's capture files, and once one is closed every later test in the worker
    errors at setup and teardown, far from the cause. Torn down after the test's other fixtures
    (``capsys`` puts its own streams back first), it puts back what it can, so the worker goes on,
    and releases a capture fixture that could not close (its stream closed under it), which would
    otherwise stay installed for every later test."""
    before = std_streams()
    yield
    problems = damage(before, std_streams())
    # pytest has no public way to ask whether a capture fixture is still installed
    capman = request.config.pluginmanager.getplugin("capturemanager")
    stuck = getattr(capman, "_capture_fixture", None)
    if stuck is not None:
        problems.append(
            f"pytest's {stuck.request.fixturename} could not close (a stream it installed was closed)"
        )
        capman.unset_fixture()
    for name, stream in before.items():
        if not is_closed(stream):
            setattr(sys, name, stream)
    _fail_if_broken(problems)


def _fail_if_broken(problems: list[str]) -> None:
    if problems:
        pytest.fail(
            "the test left the standard streams broken: "
            + "; ".join(problems)
            + " (restore a redirect where it is made, and close only streams you opened)",
            pytrace=False,
        )


@pytest.hookimpl(wrapper=True, trylast=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """The same check around the test function itself, inside pytest's capture: pytest puts its
    own streams back when the call ends, so a stream the test's code swapped and left (a
    ``redirect_stdout`` exited out of order on another thread) is only seen here."""
    before = std_streams()
    result = yield
    problems = damage(before, std_streams())
    for name, stream in before.items():
        setattr(sys, name, stream)
    _fail_if_broken(problems)
    return result


@pytest.fixture
def refused_port() -> Iterator[Callable[[], int]]:
    """Ports where a connection is refused for the whole test: each is bound here and never
    listened on. A port merely found free could be taken by another process (another test worker
    starting a server) and start answering."""
    held: list[socket.socket] = []

    def port() -> int:
        held.append(bound_socket())
        return int(held[-1].getsockname()[1])

    yield port
    for sock in held:
        sock.close()


@pytest.fixture(scope="session")
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """One Mosquitto for the session, from the production config on free loopback ports."""
    if mosquitto_binary() is None:
        pytest.skip("mosquitto is not installed (apt-get install mosquitto): MQTT tests skipped")
    broker = start_secure_broker(tmp_path_factory.mktemp("mosquitto"), auth="mtls")
    yield broker
    broker.stop()


@pytest.fixture
def broker_info(mosquitto: Broker) -> BrokerInfo:
    return mosquitto.info


@pytest.fixture
def keydir(tmp_path: Path) -> KeyDir:
    init_keys(tmp_path / "keys")
    return KeyDir(tmp_path / "keys")


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A fresh PostgreSQL database for this session, dropped afterwards."""
    try:
        import psycopg
    except ImportError:
        pytest.skip("psycopg is not installed: PostgreSQL tests skipped")
    admin = PG_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"edgefleet_{uuid.uuid4().hex[:10]}"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"PostgreSQL not reachable at {admin}: {exc}")
    yield PG_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    with contextlib.suppress(Exception), psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
